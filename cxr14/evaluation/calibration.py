"""Calibration math shared by the calibrate stage and the predict command: calibrators, thresholds, ECE/Brier.

Everything here is a pure function of arrays (no files but the calibrator's own JSON), so the stage
re-runs in seconds and `predict` applies exactly what the stage fitted. Calibrators are plain JSON
(no pickle): a per-class temperature, Platt pair or isotonic step function, `null` for a class
that could not be fitted (no positives or no negatives in val), which then passes through unchanged.
Labels may be unknown (NaN: a finding an own-data table lacks): each class is fitted, thresholded and measured on
its known labels only, and a class with none known gets null.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr14.data.nih import CLASSES
from cxr14.evaluation.metrics import drop_unknown, has_both, known, mean_defined
from cxr14.runtime.errors import PipelineError, warn
from cxr14.runtime.outputs import rounded

if TYPE_CHECKING:  # pandas only where a table is built: predict's ONNX path imports this module, fast
    import pandas as pd

METHODS = ("none", "temperature", "platt", "isotonic")
POLICIES = ("max_f1", "youden", "target_recall")
EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] before taking logits
# T >= 0.4 keeps |logit / T| <= 34.5, so sigmoid never rounds to exactly 1.0 and merges scores into ties
# (it would on a val set that separates a class, where the likelihood pushes T to 0); T = 100 is a model of noise.
LOG_T_BOUNDS = (np.log(0.4), np.log(100.0))


def logit(p: np.ndarray) -> np.ndarray:
    """Inverse sigmoid, clipped so that saved probabilities of exactly 0 or 1 stay finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function, accurate in both tails (tiny probabilities stay distinct instead of rounding to 0).

    Plain numpy rather than scipy's expit: predict applies calibrators, and importing scipy and
    scikit-learn there would slow its start (they are imported only where calibrators are fitted).
    """
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def separable(y: np.ndarray, p: np.ndarray) -> bool:
    """Every val positive scores above every negative: the calibration fit then runs to its extreme."""
    y, p = drop_unknown(y, p)
    y, p = np.asarray(y).astype(bool), np.asarray(p)
    return has_both(y) and bool(p[~y].max() < p[y].min())


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """One scalar T minimising the BCE of sigmoid(logit / T); searched on log T so T stays positive."""
    z, y = logit(p), np.asarray(y, dtype=np.float64)

    def bce(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    from scipy.optimize import minimize_scalar

    res = minimize_scalar(bce, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-7})
    return float(np.exp(res.x))


def fit_platt(y: np.ndarray, p: np.ndarray) -> list[float]:
    """[a, b] of sigmoid(a * logit + b), a logistic regression on the logit, effectively unregularised."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():  # separable val data: the fit still orders scores correctly
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(logit(p)[:, None], np.asarray(y, dtype=int))
    return [float(lr.coef_[0, 0]), float(lr.intercept_[0])]


def fit_isotonic(y: np.ndarray, p: np.ndarray) -> dict[str, list[float]]:
    """The fitted monotone step function's knots; np.interp over them reproduces IsotonicRegression.predict."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(np.asarray(p, float), np.asarray(y, float))
    return {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}


FITTERS = {"temperature": fit_temperature, "platt": fit_platt, "isotonic": fit_isotonic}


def fit_calibrator(method: str, labels: np.ndarray, probs: np.ndarray,
                   classes: Sequence[str] = CLASSES) -> dict[str, Any]:
    """Fit one calibrator per class on (N, C) labels and probabilities; `null` where a class is one-sided."""
    if method not in METHODS:
        raise PipelineError(f"calibration method {method!r}; expected one of {', '.join(METHODS)}")
    params: dict[str, Any] = {}
    if method != "none":
        for j, name in enumerate(classes):
            params[name] = FITTERS[method](*drop_unknown(labels[:, j], probs[:, j])) if has_both(labels[:, j]) \
                else None
    return {"method": method, "split": "val", "params": params}


def apply_one(method: str, param: Any, p: np.ndarray) -> np.ndarray:
    if param is None or method == "none":
        return np.asarray(p, dtype=np.float64).copy()
    if method == "temperature":
        return sigmoid(logit(p) / param)
    if method == "platt":
        return sigmoid(param[0] * logit(p) + param[1])
    return np.interp(np.asarray(p, dtype=np.float64), param["x"], param["y"])


def apply_calibrator(spec: dict[str, Any], probs: np.ndarray, classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Calibrated copy of (N, C) probabilities (or one (C,) row) in `classes` order, as the stage fitted them."""
    probs = np.asarray(probs, dtype=np.float64)
    rows = np.atleast_2d(probs)
    if rows.shape[1] != len(classes):
        raise PipelineError(f"calibrator: got {rows.shape[1]} probability columns; expected {len(classes)}")
    out = np.empty_like(rows)
    for j, name in enumerate(classes):
        out[:, j] = apply_one(spec["method"], spec["params"].get(name), rows[:, j])
    return out.reshape(probs.shape)


CALIBRATOR_PARAMS = {"temperature": "a finite number above 0", "platt": "[a, b], two finite numbers",
                     "isotonic": "{'x': ascending finite numbers, 'y': as many numbers in [0, 1]}"}


def check_calibrator(spec: Any, where: str, classes: Sequence[str] = CLASSES, key: str | None = None
                     ) -> dict[str, Any]:
    """Refuse a calibrator that would fail (or silently pass through) at prediction time: the one check for the
    calibrate stage's calibrator.json (`where`) and the copy an exported model carries (`key`: its field there)."""
    if not isinstance(spec, dict) or spec.get("method") not in METHODS or not isinstance(spec.get("params"), dict):
        found = f"{key}: {shown(spec)}; expected" if key else "expected"
        raise PipelineError(f"{where}: {found} {{'method': one of {', '.join(METHODS)}, 'params': {{class: ...}}}}")
    method, params = spec["method"], spec["params"]
    if method == "none":
        return spec
    for name in classes:
        entry = f"{key}.params.{name}" if key else f"class {name}"
        if name not in params:
            missing = f"{entry}: no {method} parameters" if key else f"no {method} parameters for class {name}"
            raise PipelineError(f"{where}: {missing}; expected {CALIBRATOR_PARAMS[method]} or null")
        v = params[name]
        ok = (v is None or (method == "temperature" and finite(v) and v > 0)
              or (method == "platt" and isinstance(v, list) and len(v) == 2 and all(map(finite, v)))
              or (method == "isotonic" and isinstance(v, dict) and isinstance(v.get("x"), list)
                  and isinstance(v.get("y"), list) and len(v["x"]) == len(v["y"]) > 0
                  and all(map(finite, v["x"] + v["y"])) and all(0 <= b <= 1 for b in v["y"])
                  and all(a <= b for a, b in zip(v["x"], v["x"][1:], strict=False))))
        if not ok:
            raise PipelineError(f"{where}: {entry}: {shown(v)} is not a valid {method} calibrator; expected "
                                f"{CALIBRATOR_PARAMS[method]} or null")
    return spec


def load_calibrator(path: Path | str) -> dict[str, Any]:
    """Read models/calibrator.json as written by the calibrate stage, validated for `apply_calibrator`."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro calibrate`") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    return check_calibrator(spec, str(path))


def choose_threshold(policy: str, y: np.ndarray, p: np.ndarray, target_recall: float | None = None) -> float | None:
    """Val threshold for one class (positive = p >= threshold); None if the labels are one-sided.

    The policy picks which val images are positive (a cut at one of their scores); the threshold is then
    placed between that score and the next lower one (`separating`), so it never sits on a plateau.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    if not has_both(y):
        return None
    y, p = drop_unknown(y, p)
    p = np.asarray(p, dtype=np.float64)
    if policy == "max_f1":  # the original recipe's rule: best F1 on the PR curve, without its (P=1, R=0) end point
        precision, recall, thresholds = precision_recall_curve(y, p)
        precision, recall = precision[:-1], recall[:-1]
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        cut = thresholds[np.argmax(f1)]
    elif policy == "youden":  # max TPR - FPR; the first point (threshold inf) predicts nothing
        fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
        keep = np.isfinite(thresholds)
        cut = thresholds[keep][np.argmax((tpr - fpr)[keep])]
    elif policy == "target_recall":  # recall falls as the threshold rises: the highest one still reaching the target
        if target_recall is None:
            raise PipelineError("threshold policy target_recall needs calibrate.target_recall")
        _, recall, thresholds = precision_recall_curve(y, p)
        cut = thresholds[recall[:-1] >= target_recall].max()
    else:
        raise PipelineError(f"threshold policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return separating(p, float(cut))


def separating(p: np.ndarray, cut: float) -> float:
    """Halfway between `cut` (the lowest val score taken as positive) and the highest val score below it.

    Val decisions are the same as at `cut`, but the threshold lies where the scores separate: an isotonic
    calibrator maps val images onto plateaus, and a threshold at a plateau's own level (often the top one,
    1.0) would turn the rule into `p == 1`, make margins meaningless and divide by zero in them. Only when
    no val score lies below the cut (the policy takes every val image as positive) is the cut itself returned.
    """
    below = p[p < cut]
    if below.size == 0:
        return float(cut)
    low = float(below.max())
    mid = low + (cut - low) / 2
    return mid if low < mid <= cut else float(cut)


def ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def decision_metrics(y: np.ndarray, p: np.ndarray, threshold: float | None) -> dict[str, float | None] | None:
    """Seed-style F1/Precision/Recall at p >= threshold; a value is None where its denominator is zero."""
    if threshold is None:
        return None
    y, p = drop_unknown(y, p)
    y, pred = np.asarray(y).astype(bool), np.asarray(p) >= threshold
    tp, fp, fn = int(np.sum(pred & y)), int(np.sum(pred & ~y)), int(np.sum(~pred & y))
    return {"F1": ratio(2 * tp, 2 * tp + fp + fn), "Precision": ratio(tp, tp + fp), "Recall": ratio(tp, tp + fn)}


def bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1]; p = 1 falls in the last bin."""
    return np.minimum((np.asarray(p, dtype=np.float64) * bins).astype(int), bins - 1)


def reliability(y: np.ndarray, p: np.ndarray, bins: int) -> list[dict[str, float | int]]:
    """Non-empty bins: mean predicted probability, fraction of positives and count (the reliability diagram), over
    the known labels."""
    y, p = drop_unknown(np.asarray(y).ravel(), np.asarray(p).ravel())
    p, y = np.asarray(p, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    idx = bin_index(p, bins)
    count = np.bincount(idx, minlength=bins)
    sum_p, sum_y = np.bincount(idx, p, minlength=bins), np.bincount(idx, y, minlength=bins)
    return [{"bin": b, "mean_predicted": sum_p[b] / count[b], "fraction_positive": sum_y[b] / count[b],
             "count": int(count[b])} for b in np.flatnonzero(count)]


def ece(y: np.ndarray, p: np.ndarray, bins: int) -> float | None:
    """Expected calibration error: sum over bins of |mean p - positive rate| weighted by the bin's share (known
    labels only; None where there are none)."""
    y, p = drop_unknown(np.asarray(y).ravel(), np.asarray(p).ravel())
    n = np.asarray(p).size
    if n == 0:
        return None
    gaps = [r["count"] / n * abs(r["mean_predicted"] - r["fraction_positive"]) for r in reliability(y, p, bins)]
    return float(sum(gaps))


def brier(y: np.ndarray, p: np.ndarray) -> float | None:
    """Mean squared error of the probability against the 0/1 label (known labels only)."""
    y, p = drop_unknown(np.asarray(y).ravel(), np.asarray(p).ravel())
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.mean((p - y) ** 2)) if p.size else None


def finite(value: Any) -> bool:
    """A real number (not a bool, a string, NaN or an infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error line quotes it: its repr, cut short (an isotonic calibrator has thousands of knots)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def check_thresholds(thresholds: Any, where: str, classes: Sequence[str] = CLASSES, key: str | None = None
                     ) -> dict[str, float | None]:
    """Refuse thresholds that would decide wrongly (NaN, out of [0, 1], not a number) or not at all without a word
    (a class missing): the one check for the calibrate stage's thresholds.json (`where`) and the copy an exported
    model carries (`key`: its field there). null is a class val could not set a threshold for: decided `n/a`."""
    if not isinstance(thresholds, dict):
        raise PipelineError(f"{where}: {key or repr('thresholds')} is {shown(thresholds)}; expected a mapping of "
                            "class to threshold")
    for name in classes:
        if name not in thresholds:
            raise PipelineError((f"{where}: {key}.{name} missing" if key else f"{where}: no threshold for class {name}")
                                + "; expected one per class (null where undefined)")
        v = thresholds[name]
        if v is not None and not (finite(v) and 0 <= v <= 1):
            entry = f"{key}.{name}:" if key else f"class {name}: threshold"
            raise PipelineError(f"{where}: {entry} {shown(v)}; expected a number in [0, 1] or null")
    return thresholds


def load_thresholds(path: Path | str, classes: Sequence[str] = CLASSES) -> tuple[dict[str, float | None], str | None]:
    """Per-class thresholds from the calibrate stage's thresholds.json (None where val had no positives), and the
    calibration method whose probabilities they apply to (None for files that do not say)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        thresholds = data["thresholds"]
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the calibrate stage (dvc repro calibrate)") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a thresholds file ({exc}); expected the calibrate stage's output") from None
    check_thresholds(thresholds, str(path), classes)
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return thresholds, metadata.get("calibration")


def check_pairing(thresholds_path: Path | str, applies_to: str | None, calibrator: dict[str, Any] | None,
                  calibrator_path: Path | str) -> None:
    """Thresholds chosen on calibrated probabilities must meet those, not the raw ones (a class flips otherwise)."""
    method = calibrator["method"] if calibrator is not None else "none"
    if applies_to is not None and applies_to != method:
        found = f"{calibrator_path} is {method}" if calibrator is not None else f"{calibrator_path} was not found"
        raise PipelineError(f"{thresholds_path}: these thresholds apply to {applies_to}-calibrated probabilities, "
                            f"but {found}; use the calibrate stage's calibrator.json from the same run")


def split_metrics(labels: np.ndarray, raw: np.ndarray, cal: np.ndarray, thresholds: dict, bins: int) -> dict:
    """Per class and macro: ECE and Brier before/after calibration, precision/recall/F1 at the val thresholds."""
    out: dict = {}
    for j, name in enumerate(CLASSES):
        y = labels[:, j]
        m = decision_metrics(y, cal[:, j], thresholds[name]) or {"F1": None, "Precision": None, "Recall": None}
        out[name] = {"ece_before": ece(y, raw[:, j], bins), "ece_after": ece(y, cal[:, j], bins),
                     "brier_before": brier(y, raw[:, j]), "brier_after": brier(y, cal[:, j]),
                     "precision": m["Precision"], "recall": m["Recall"], "f1": m["F1"]}
    keys = next(iter(out.values())).keys()
    return {"macro": {k: mean_defined([out[n][k] for n in CLASSES]) for k in keys}, **out}


def headline(report: dict) -> dict:
    """metrics/calibrate.json: test macro F1 at the val thresholds and macro ECE before/after calibration, picked
    from the report (reports/calibrate.json keeps the per-class, val, subgroup and expert figures)."""
    macro = report["test"]["macro"]
    return {"f1": macro["f1"], "ece_before": macro["ece_before"], "ece_after": macro["ece_after"]}


def reliability_frame(labels: np.ndarray, raw: np.ndarray, cal: np.ndarray, bins: int) -> pd.DataFrame:
    """Long table: one row per non-empty bin of each curve (pooled over classes, then each class), before/after."""
    import pandas as pd

    rows = []
    for stage, probs in (("before", raw), ("after", cal)):
        curves = [("pooled", labels, probs)] + [(n, labels[:, j], probs[:, j]) for j, n in enumerate(CLASSES)]
        for curve, y, p in curves:
            rows += [{"curve": curve, "stage": stage, **r} for r in reliability(y, p, bins)]
    return pd.DataFrame(rows, columns=["curve", "stage", "bin", "mean_predicted", "fraction_positive", "count"])


def check_classes(method: str, val: np.ndarray, val_probs: np.ndarray, test: np.ndarray,
                  classes: Sequence[str] = CLASSES) -> None:
    """Warn, per class, where val or test cannot support what calibrate reports (one-sided labels, a val set
    that separates the class perfectly and so drives the calibrator to its extreme)."""
    for j, name in enumerate(classes):
        if not known(val[:, j]).any():
            warn(f"class {name} has no known labels in val: its threshold and metrics are null, its calibration the "
                 "identity")
            continue
        if not has_both(val[:, j]):
            side = "no positives" if np.nansum(val[:, j]) == 0 else "no negatives"
            warn(f"class {name} has {side} in val: its threshold and metrics are null, its calibration the identity")
        elif method != "none" and separable(val[:, j], val_probs[:, j]):
            warn(f"class {name}: val separates it perfectly ({np.nansum(val[:, j]):g} positives), so its {method} "
                 "calibration is extreme and unreliable; a larger val set fixes this")
        if has_both(val[:, j]) and not has_both(test[:, j]):
            warn(f"class {name} has only one outcome in test: its test recall or precision is null")


def thresholds_file(thresholds: dict[str, float | None], policy: str, method: str,
                    data: dict[str, tuple[np.ndarray, np.ndarray]], cal: dict[str, np.ndarray],
                    classes: Sequence[str] = CLASSES) -> dict[str, Any]:
    """models/thresholds.json in the original recipe's schema (metadata, thresholds, val metrics) plus test_metrics."""
    def at_thresholds(split: str) -> dict:
        return {n: rounded(decision_metrics(data[split][0][:, j], cal[split][:, j], thresholds[n]))
                for j, n in enumerate(classes)}

    return {"metadata": {"method": policy, "split": "val", "num_classes": len(classes), "policy": policy,
                         "calibration": method},
            "thresholds": thresholds,  # not rounded: `calibrated prob >= threshold` must reproduce the metrics exactly
            "metrics": at_thresholds("val"), "test_metrics": at_thresholds("test")}

"""Calibrate stage: per-class probability calibration and decision thresholds, fitted on val, measured on test.

Works only on the evaluate stage's saved predictions (no model, no torch), so a changed `calibrate`
parameter re-runs in seconds. Calibrators and thresholds are fitted on val; test only measures them,
which the seed never did (it tuned and reported thresholds on the same val set).
Writes models/calibrator.json (for `predict`), models/thresholds.json (the seed's schema),
metrics/calibrate.json (ECE and Brier before/after, precision/recall/F1 at the val thresholds)
and reliability-diagram data under plots/calibrate/.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from stages.calibration import (
    METHODS,
    POLICIES,
    apply_calibrator,
    brier,
    choose_threshold,
    decision_metrics,
    ece,
    fit_calibrator,
    has_both,
    mean_defined,
    reliability,
    rounded,
    separable,
)
from stages.common import PipelineError, atomic_path, load_params, run_main, write_json
from stages.nih import CLASSES

SPLITS = ("val", "test")
PROB_PREFIX = "prob_"


def check_params(c: dict) -> None:
    """Refuse settings that would fail half-way or quietly mean something else."""
    if c.get("policy") not in POLICIES:
        raise PipelineError(f"params.yaml calibrate.policy: {c.get('policy')!r}; expected one of {', '.join(POLICIES)}")
    if c.get("method") not in METHODS:
        raise PipelineError(f"params.yaml calibrate.method: {c.get('method')!r}; expected one of {', '.join(METHODS)}")
    r = c.get("target_recall")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise PipelineError(f"params.yaml calibrate.target_recall: {r!r}; expected a number in (0, 1]")
    b = c.get("ece_bins")
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise PipelineError(f"params.yaml calibrate.ece_bins: {b!r}; expected a positive integer")


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities), both (N, 14) in CLASSES order, from the evaluate stage's CSV; checked."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro evaluate` first") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable CSV ({exc})") from None
    prob_columns = [PROB_PREFIX + n for n in CLASSES]
    missing = [c for c in [*CLASSES, *prob_columns] if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {', '.join(missing)}; expected <Class> and prob_<Class> per class")
    if frame.empty:
        raise PipelineError(f"{path}: no rows")
    labels = numeric(path, frame, list(CLASSES), lambda v: np.isin(v, (0, 1)), "0 or 1")
    probs = numeric(path, frame, prob_columns, lambda v: (v >= 0) & (v <= 1), "a probability in [0, 1]")
    return labels.astype(np.int64), probs


def numeric(path: Path, frame: pd.DataFrame, columns: list[str], valid: Callable, expected: str) -> np.ndarray:
    """The columns as floats; the first bad cell is named by file row (the header is row 1) and column."""
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ok = valid(values)  # NaN (empty or not a number) fails every check
    if not ok.all():
        row, col = np.argwhere(~ok)[0]
        cell = frame[columns[col]].iloc[row]
        raise PipelineError(f"{path}: row {row + 2}, column {columns[col]}: {cell!r}; expected {expected}")
    return values


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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


def reliability_frame(labels: np.ndarray, raw: np.ndarray, cal: np.ndarray, bins: int) -> pd.DataFrame:
    """Long table: one row per non-empty bin of each curve (pooled over classes, then each class), before/after."""
    rows = []
    for stage, probs in (("before", raw), ("after", cal)):
        curves = [("pooled", labels, probs)] + [(n, labels[:, j], probs[:, j]) for j, n in enumerate(CLASSES)]
        for curve, y, p in curves:
            rows += [{"curve": curve, "stage": stage, **r} for r in reliability(y, p, bins)]
    return pd.DataFrame(rows, columns=["curve", "stage", "bin", "mean_predicted", "fraction_positive", "count"])


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6f")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section calibrate)")
    parser.add_argument("--predictions", type=Path, default=Path("data/predictions"),
                        help="folder with the evaluate stage's val.csv and test.csv")
    parser.add_argument("--out-models", type=Path, default=Path("models"),
                        help="folder for thresholds.json and calibrator.json")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/calibrate.json"), help="metrics file")
    parser.add_argument("--plots", type=Path, default=Path("plots/calibrate"), help="folder for reliability CSVs")
    args = parser.parse_args(argv)
    c = load_params("calibrate", path=args.params)
    check_params(c)
    data = {s: read_predictions(args.predictions / f"{s}.csv") for s in SPLITS}

    labels, raw = data["val"]
    for j, name in enumerate(CLASSES):
        if not has_both(labels[:, j]):
            side = "no positives" if labels[:, j].sum() == 0 else "no negatives"
            warn(f"class {name} has {side} in val: its threshold and metrics are null, its calibration the identity")
        elif c["method"] != "none" and separable(labels[:, j], raw[:, j]):
            warn(f"class {name}: val separates it perfectly ({labels[:, j].sum()} positives), so its {c['method']} "
                 "calibration is extreme and unreliable; a larger val set fixes this")
        if has_both(labels[:, j]) and not has_both(data["test"][0][:, j]):
            warn(f"class {name} has only one outcome in test: its test recall or precision is null")
    spec = fit_calibrator(c["method"], labels, raw)
    cal = {s: apply_calibrator(spec, data[s][1]) for s in SPLITS}
    thresholds = {n: choose_threshold(c["policy"], labels[:, j], cal["val"][:, j], c["target_recall"])
                  for j, n in enumerate(CLASSES)}

    def at_thresholds(split: str) -> dict:
        return {n: rounded(decision_metrics(data[split][0][:, j], cal[split][:, j], thresholds[n]))
                for j, n in enumerate(CLASSES)}

    write_json(args.out_models / "calibrator.json", spec)
    write_json(args.out_models / "thresholds.json", {
        "metadata": {"method": c["policy"], "split": "val", "num_classes": len(CLASSES), "policy": c["policy"],
                     "calibration": c["method"]},
        "thresholds": thresholds,  # not rounded: `calibrated prob >= threshold` must reproduce the metrics exactly
        "metrics": at_thresholds("val"),
        "test_metrics": at_thresholds("test"),
    })
    metrics = rounded({s: split_metrics(*data[s], cal[s], thresholds, c["ece_bins"]) for s in SPLITS})
    write_json(args.metrics, metrics)
    for s in SPLITS:
        frame = reliability_frame(data[s][0], data[s][1], cal[s], c["ece_bins"])
        write_csv(args.plots / f"reliability_{s}.csv", frame)
        for stage in ("before", "after"):  # one file per line: DVC colours series by file, not by a column
            pooled = frame[(frame["curve"] == "pooled") & (frame["stage"] == stage)]
            write_csv(args.plots / f"reliability_{s}_{stage}.csv", pooled.drop(columns=["curve", "stage"]))
    test = metrics["test"]["macro"]
    print(f"calibrate: {c['method']} + {c['policy']}: test macro ECE {test['ece_before']} -> {test['ece_after']}, "
          f"F1 {test['f1']}, precision {test['precision']}, recall {test['recall']}")


if __name__ == "__main__":
    run_main(main)

"""The calibrate stage: thresholds, ECE/Brier, calibrators and the stage's files, against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import project_params, run_module
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import precision_recall_curve

from cxr14.data.nih import CLASSES
from cxr14.evaluation.calibration import (
    apply_calibrator,
    brier,
    choose_threshold,
    decision_metrics,
    ece,
    fit_calibrator,
    fit_isotonic,
    fit_temperature,
    load_calibrator,
    logit,
    reliability,
    separable,
    separating,
    sigmoid,
)
from cxr14.evaluation.metrics import mean_defined
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import write_json
from cxr14.runtime.signals import run_main
from stages import calibrate

PARAMS = {"policy": "max_f1", "target_recall": 0.9, "method": "temperature", "ece_bins": 15}

# 8 images, 4 positives; scores tied at 0.7 (a positive and a negative) and at 0.4 (two negatives).
# By hand, at each distinct threshold t (positive = p >= t):
#   t     TP FP  precision recall  F1 = 2TP / (2TP + FP + FN)
#   0.9   1  0   1         0.25    2/5  = 0.4
#   0.7   2  1   2/3       0.5     4/7  = 0.571
#   0.6   3  1   0.75      0.75    6/8  = 0.75   <- max F1
#   0.4   3  3   0.5       0.75    6/10 = 0.6
#   0.2   4  3   4/7       1       8/11 = 0.727
#   0.1   4  4   0.5       1       8/12 = 0.667
TIE_Y = np.array([1, 1, 0, 1, 0, 0, 1, 0])
TIE_P = np.array([0.9, 0.7, 0.7, 0.6, 0.4, 0.4, 0.2, 0.1])

# 2 positives in 12 (ranks 1 and 5): F1 prefers the top score alone (2/3 vs 4/7), Youden's J = TPR - FPR
# prefers catching both (1 - 3/10 = 0.7 vs 1/2 - 0 = 0.5).
RARE_Y = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
RARE_P = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])

# A policy picks a cut at a val score (the lowest score taken as positive); the threshold is then placed
# halfway between that score and the next lower val score, so the val decisions are those of the cut.


def halfway(low: float, cut: float) -> object:
    """The threshold expected for a cut at `cut` whose next lower val score is `low`."""
    return pytest.approx((low + cut) / 2, abs=1e-12)


def test_max_f1_threshold_and_metrics_with_ties() -> None:
    t = choose_threshold("max_f1", TIE_Y, TIE_P)
    assert t == halfway(0.4, 0.6)  # the cut 0.6, the next lower score 0.4 (tied twice)
    assert decision_metrics(TIE_Y, TIE_P, t) == {"F1": 0.75, "Precision": 0.75, "Recall": 0.75}
    assert decision_metrics(TIE_Y, TIE_P, 0.6) == decision_metrics(TIE_Y, TIE_P, t)
    # The tie at 0.7 is decided together: both tied images are positive decisions.
    assert decision_metrics(TIE_Y, TIE_P, 0.7) == pytest.approx({"F1": 4 / 7, "Precision": 2 / 3, "Recall": 0.5})
    assert decision_metrics(TIE_Y, TIE_P, 0.4) == pytest.approx({"F1": 0.6, "Precision": 0.5, "Recall": 0.75})


def test_youden_and_target_recall_by_hand() -> None:
    # (cut, next lower val score) by hand; the threshold is halfway between them
    assert choose_threshold("max_f1", RARE_Y, RARE_P) == halfway(0.9, 0.95)
    assert choose_threshold("youden", RARE_Y, RARE_P) == halfway(0.7, 0.75)
    assert choose_threshold("youden", TIE_Y, TIE_P) == halfway(0.4, 0.6)  # J: .25 .25 .5 0 .25 0
    assert choose_threshold("target_recall", RARE_Y, RARE_P, 0.9) == halfway(0.7, 0.75)
    assert choose_threshold("target_recall", RARE_Y, RARE_P, 0.5) == halfway(0.9, 0.95)
    assert choose_threshold("target_recall", TIE_Y, TIE_P, 0.9) == halfway(0.1, 0.2)
    assert choose_threshold("target_recall", TIE_Y, TIE_P, 0.75) == halfway(0.4, 0.6)  # recall at the target counts
    assert choose_threshold("target_recall", TIE_Y, TIE_P, 0.5) == halfway(0.6, 0.7)  # the tie at 0.7 taken whole
    assert choose_threshold("target_recall", TIE_Y, TIE_P, 1.0) == halfway(0.1, 0.2)


def test_threshold_is_the_cut_itself_when_no_val_score_lies_below() -> None:
    # Recall 1 needs the lowest score, a positive: every val image is positive and nothing lies below the cut.
    y, p = np.array([1, 0, 1]), np.array([0.9, 0.5, 0.1])
    assert choose_threshold("target_recall", y, p, 1.0) == 0.1
    assert separating(p, 0.1) == 0.1
    assert separating(p, 0.9) == halfway(0.5, 0.9)
    assert separating(np.array([0.3, 1.0, 1.0]), 1.0) == halfway(0.3, 1.0)  # a plateau at 1.0: never 1.0 itself


def test_one_sided_class_has_no_threshold() -> None:
    for policy in ("max_f1", "youden", "target_recall"):
        assert choose_threshold(policy, np.zeros(5, int), np.linspace(0, 1, 5)) is None
        assert choose_threshold(policy, np.ones(5, int), np.linspace(0, 1, 5)) is None
    assert decision_metrics(np.zeros(3), np.ones(3), None) is None


def test_undefined_ratios_are_null_not_zero() -> None:
    # No positives in test but two positive decisions: precision 0, recall undefined, F1 = 0 / 2 = 0.
    assert decision_metrics(np.array([0, 0, 0]), np.array([0.9, 0.8, 0.1]), 0.5) == {
        "F1": 0.0, "Precision": 0.0, "Recall": None}
    # No positives and no positive decisions: nothing is defined.
    nothing = {"F1": None, "Precision": None, "Recall": None}
    assert decision_metrics(np.array([0, 0]), np.array([0.1, 0.2]), 0.5) == nothing
    # Positives but no positive decisions: precision undefined, recall 0, F1 0.
    missed = {"F1": 0.0, "Precision": None, "Recall": 0.0}
    assert decision_metrics(np.array([1, 0]), np.array([0.1, 0.2]), 0.5) == missed
    assert mean_defined([None, 0.5, 1.0]) == 0.75
    assert mean_defined([None, None]) is None


@pytest.mark.parametrize("seed", range(5))
def test_max_f1_agrees_with_sklearn_pr_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for prevalence in (0.02, 0.1, 0.5):
        y = (rng.uniform(size=300) < prevalence).astype(int)
        y[:2] = (0, 1)
        p = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1), 2)  # rounded: many ties
        precision, recall, thresholds = precision_recall_curve(y, p)
        with np.errstate(invalid="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
        cut = thresholds[np.argmax(f1)]
        t = choose_threshold("max_f1", y, p)
        assert t == halfway(p[p < cut].max(), cut)
        assert np.array_equal(p >= t, p >= cut)  # the same val decisions as sklearn's cut
        # and it is the best F1 over every possible cut (brute force over the distinct scores)
        best = max(decision_metrics(y, p, s)["F1"] for s in np.unique(p))
        assert decision_metrics(y, p, t)["F1"] == pytest.approx(best, abs=1e-12)


def test_ece_brier_and_reliability_by_hand() -> None:
    # 5 bins of width 0.2: bin 0 {0.1, 0.15} (mean .125, 1 of 2 positive), bin 2 {0.5, 0.55} (mean .525, 1 of 2),
    # bin 4 {0.9} (1 of 1). ECE = 2/5 * .375 + 2/5 * .025 + 1/5 * .1 = 0.18.
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.1, 0.15, 0.5, 0.55, 0.9])
    assert ece(y, p, 5) == pytest.approx(0.18)
    assert brier(y, p) == pytest.approx((0.01 + 0.7225 + 0.25 + 0.3025 + 0.01) / 5)
    rows = reliability(y, p, 5)
    assert [r["bin"] for r in rows] == [0, 2, 4]
    assert [r["count"] for r in rows] == [2, 2, 1]
    assert [r["mean_predicted"] for r in rows] == pytest.approx([0.125, 0.525, 0.9])
    assert [r["fraction_positive"] for r in rows] == pytest.approx([0.5, 0.5, 1.0])
    assert ece(np.array([1, 0]), np.array([1.0, 0.0]), 15) == 0.0  # p = 1 lands in the last bin, not past it
    assert ece(np.array([1, 1, 0, 0]), np.full(4, 0.5), 15) == 0.0
    assert brier(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0


def miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a true probability; the reported probability is overconfident (logit * 3)."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0.05, 0.95, n)
    return (rng.uniform(size=n) < true).astype(int), sigmoid(3 * logit(true))


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_calibrators_lower_ece_on_held_out_data(method: str) -> None:
    y_fit, p_fit = miscalibrated(4000, 0)
    y, p = miscalibrated(4000, 1)
    spec = fit_calibrator(method, y_fit[:, None], p_fit[:, None], classes=["A"])
    before, after = ece(y, p, 15), ece(y, apply_calibrator(spec, p[:, None], classes=["A"])[:, 0], 15)
    assert before > 0.1
    assert after < before / 3
    calibrated = apply_calibrator(spec, p[:, None], classes=["A"])[:, 0]
    assert brier(y, calibrated) < brier(y, p)
    if method == "temperature":
        assert spec["params"]["A"] == pytest.approx(3, rel=0.15)
    if method == "platt":
        a, b = spec["params"]["A"]
        assert a == pytest.approx(1 / 3, rel=0.15) and abs(b) < 0.15


def test_temperature_minimises_bce() -> None:
    y, p = miscalibrated(2000, 2)
    t = fit_temperature(y, p)

    def bce(temp: float) -> float:
        q = np.clip(sigmoid(logit(p) / temp), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    assert bce(t) <= min(bce(t * 0.99), bce(t * 1.01))


def test_temperature_on_separable_val_keeps_scores_apart() -> None:
    # Perfectly separated: the likelihood wants T -> 0; the bound keeps sigmoid(logit / T) below 1.0 so no ties.
    y, p = np.array([0, 0, 0, 1, 1, 1]), np.array([0.01, 0.1, 0.3, 0.6, 0.9, 1.0])
    assert separable(y, p) and not separable(TIE_Y, TIE_P)
    t = fit_temperature(y, p)
    assert t == pytest.approx(0.4, rel=1e-4)
    calibrated = sigmoid(logit(p) / t)
    assert len(np.unique(calibrated)) == 6 and calibrated.max() < 1.0


def test_isotonic_json_reproduces_sklearn_predict() -> None:
    y, p = miscalibrated(1000, 3)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p, y)
    knots = fit_isotonic(y, p)
    probe = np.concatenate([p, np.linspace(0, 1, 101)])
    np.testing.assert_allclose(np.interp(probe, knots["x"], knots["y"]), iso.predict(probe), atol=1e-12)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 14) labels and overconfident probabilities; Hernia has no positives."""
    pairs = [miscalibrated(n, seed * 100 + j) for j in range(len(CLASSES))]
    labels = np.stack([y for y, _ in pairs], axis=1)
    labels[:, CLASSES.index("Hernia")] = 0
    return labels, np.stack([p for _, p in pairs], axis=1)


@pytest.mark.parametrize("method", ["none", "temperature", "platt", "isotonic"])
def test_calibrator_json_round_trip(method: str, tmp_path: Path) -> None:
    labels, probs = synthetic(500, 0)
    spec = fit_calibrator(method, labels, probs)
    if method != "none":
        assert spec["params"]["Hernia"] is None
    write_json(tmp_path / "calibrator.json", spec)
    loaded = load_calibrator(tmp_path / "calibrator.json")
    _, new = synthetic(50, 1)
    np.testing.assert_array_equal(apply_calibrator(loaded, new), apply_calibrator(spec, new))
    np.testing.assert_array_equal(apply_calibrator(loaded, new[0]), apply_calibrator(spec, new)[0])  # one image
    np.testing.assert_array_equal(apply_calibrator(loaded, new)[:, CLASSES.index("Hernia")], new[:, -1])


def test_load_calibrator_refuses_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "calibrator.json"
    with pytest.raises(PipelineError, match="not found"):
        load_calibrator(path)
    for bad, message in (("{", "not valid JSON"), ('{"method": "magic", "params": {}}', "expected"),
                         ('{"method": "temperature", "params": {}}', "class Atelectasis"),
                         (json.dumps({"method": "temperature", "params": dict.fromkeys(CLASSES, -1)}), "not a valid")):
        path.write_text(bad)
        with pytest.raises(PipelineError, match=message):
            load_calibrator(path)


def write_split(path: Path, labels: np.ndarray, probs: np.ndarray) -> None:
    """One split's predictions in the evaluate stage's format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    frame = pd.DataFrame({"Image Index": [f"{k:08d}_000.png" for k in range(n)], "Patient ID": np.arange(n)})
    for j, name in enumerate(CLASSES):
        frame[name] = labels[:, j]
        frame[f"prob_{name}"] = probs[:, j]
    frame.to_csv(path, index=False)


def write_predictions(folder: Path, n: int = 300, seed: int = 0) -> None:
    """val.csv and test.csv in the evaluate stage's format."""
    for i, split in enumerate(("val", "test")):
        write_split(folder / f"{split}.csv", *synthetic(n, seed + i))


def top_block(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 14) labels and scores where, per class, the top tenth of the scores is all positive and another
    twentieth of positives is scattered below: isotonic regression maps the top block onto a plateau at 1.0,
    and for most classes max F1 takes exactly that plateau (F1 0.8 there; lower cuts add mostly negatives)."""
    rng = np.random.default_rng(seed)
    labels, probs = np.zeros((n, len(CLASSES)), dtype=int), rng.uniform(0.05, 0.95, (n, len(CLASSES)))
    for j in range(len(CLASSES) - 1):  # Hernia: no positives
        order = np.argsort(-probs[:, j])
        labels[order[: n // 10], j] = 1
        labels[rng.choice(order[n // 10:], n // 20, replace=False), j] = 1
    return labels, probs


def stage_args(tmp_path: Path, **params: object) -> list[str]:
    """The stage's arguments, with the project's params.yaml (calibrate section: PARAMS and `params`) in tmp_path."""
    project_params(tmp_path / "params.yaml", {"calibrate": {**PARAMS, **params}})
    return ["--params", str(tmp_path / "params.yaml"), "--predictions", str(tmp_path / "pred"),
            "--out-models", str(tmp_path / "models"), "--metrics", str(tmp_path / "metrics/calibrate.json"),
            "--report", str(tmp_path / "reports/calibrate.json"), "--plots", str(tmp_path / "plots")]


@pytest.mark.parametrize("method", ["none", "temperature", "platt", "isotonic"])
def test_stage_writes_seed_schema_and_metrics(method: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_predictions(tmp_path / "pred", n=2000)
    calibrate.main(stage_args(tmp_path, method=method))
    assert "class Hernia has no positives in val" in capsys.readouterr().err

    doc = json.loads((tmp_path / "models/thresholds.json").read_text())
    assert list(doc) == ["metadata", "thresholds", "metrics", "test_metrics"]
    assert doc["metadata"] == {"method": "max_f1", "split": "val", "num_classes": 14, "policy": "max_f1",
                               "calibration": method}
    assert list(doc["thresholds"]) == list(CLASSES)
    assert doc["thresholds"]["Hernia"] is None and doc["metrics"]["Hernia"] is None
    assert doc["test_metrics"]["Hernia"] is None
    assert set(doc["metrics"]["Atelectasis"]) == {"F1", "Precision", "Recall"}

    # The saved calibrator and thresholds reproduce the reported test metrics (decision: prob >= threshold).
    spec = load_calibrator(tmp_path / "models/calibrator.json")
    assert spec["method"] == method
    test = pd.read_csv(tmp_path / "pred/test.csv")
    cal = apply_calibrator(spec, test[[f"prob_{n}" for n in CLASSES]].to_numpy())
    for j, name in enumerate(CLASSES[:-1]):
        expected = decision_metrics(test[name].to_numpy(), cal[:, j], doc["thresholds"][name])
        assert doc["test_metrics"][name] == pytest.approx(expected, abs=1e-6)

    metrics = json.loads((tmp_path / "reports/calibrate.json").read_text())  # the report: every figure
    assert json.loads((tmp_path / "metrics/calibrate.json").read_text()) == {  # the headline, picked from it
        "f1": metrics["test"]["macro"]["f1"], "ece_before": metrics["test"]["macro"]["ece_before"],
        "ece_after": metrics["test"]["macro"]["ece_after"]}
    keys = {"ece_before", "ece_after", "brier_before", "brier_after", "precision", "recall", "f1"}
    for split in ("val", "test"):
        assert list(metrics[split]) == ["macro", *CLASSES]
        assert set(metrics[split]["macro"]) == keys
        assert metrics[split]["Hernia"]["f1"] is None and metrics[split]["Hernia"]["ece_before"] is not None
    test_f1 = [doc["test_metrics"][n]["F1"] for n in CLASSES[:-1]]
    assert metrics["test"]["macro"]["f1"] == pytest.approx(np.mean(test_f1), abs=1e-6)
    if method == "none":
        assert metrics["test"]["macro"]["ece_after"] == metrics["test"]["macro"]["ece_before"]
    else:
        assert metrics["test"]["macro"]["ece_after"] < metrics["test"]["macro"]["ece_before"] / 2

    long = pd.read_csv(tmp_path / "plots/reliability_test.csv")
    assert list(long.columns) == ["curve", "stage", "bin", "mean_predicted", "fraction_positive", "count"]
    assert set(long["curve"]) == {"pooled", *CLASSES} and set(long["stage"]) == {"before", "after"}
    pooled = pd.read_csv(tmp_path / "plots/reliability_test_after.csv")
    assert list(pooled.columns) == ["bin", "mean_predicted", "fraction_positive", "count"]
    assert pooled["count"].sum() == 2000 * 14
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes left nothing behind


def test_target_recall_policy_reaches_the_target_on_val(tmp_path: Path) -> None:
    write_predictions(tmp_path / "pred")
    calibrate.main(stage_args(tmp_path, policy="target_recall", target_recall=0.8, method="isotonic"))
    doc = json.loads((tmp_path / "models/thresholds.json").read_text())
    assert doc["metadata"]["policy"] == "target_recall"
    assert all(doc["metrics"][n]["Recall"] >= 0.8 for n in CLASSES[:-1])


def test_isotonic_max_f1_thresholds_lie_between_val_scores(tmp_path: Path) -> None:
    # Regression: on isotonic's top plateau the max-F1 cut is 1.0, and the threshold was that cut, exactly 1.0.
    write_split(tmp_path / "pred/val.csv", *top_block(400, 0))
    write_split(tmp_path / "pred/test.csv", *top_block(400, 1))
    calibrate.main(stage_args(tmp_path, method="isotonic", policy="max_f1"))
    doc = json.loads((tmp_path / "models/thresholds.json").read_text())
    labels, probs = top_block(400, 0)
    cal = apply_calibrator(load_calibrator(tmp_path / "models/calibrator.json"), probs)
    plateau = 0
    for j, name in enumerate(CLASSES[:-1]):
        y, p, t = labels[:, j], cal[:, j], doc["thresholds"][name]
        precision, recall, cuts = precision_recall_curve(y, p)
        with np.errstate(invalid="ignore"):
            cut = cuts[np.argmax(np.nan_to_num(2 * precision * recall / (precision + recall))[:-1])]
        plateau += cut == 1.0
        assert 0.0 < t < 1.0
        assert t == halfway(p[p < cut].max(), cut)
        assert np.array_equal(p >= t, p >= cut)  # the val decisions are still those of the max-F1 cut
        assert doc["metrics"][name] == pytest.approx(decision_metrics(y, p, t), abs=1e-6)
        assert doc["metrics"][name]["F1"] == pytest.approx(0.8, abs=0.05)
    assert plateau >= 10  # the case the fix is for: most classes' max-F1 cut is the plateau at 1.0
    assert doc["thresholds"]["Hernia"] is None


def test_separable_val_class_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_predictions(tmp_path / "pred")
    val = pd.read_csv(tmp_path / "pred/val.csv")
    val["prob_Edema"] = 0.2 + 0.6 * val["Edema"]  # every positive above every negative
    val.to_csv(tmp_path / "pred/val.csv", index=False)
    calibrate.main(stage_args(tmp_path, method="platt"))
    err = capsys.readouterr().err
    assert "class Edema: val separates it perfectly" in err and "class Mass" not in err
    assert json.loads((tmp_path / "models/thresholds.json").read_text())["metrics"]["Edema"]["F1"] == 1.0


METHODS = "one of none, temperature, platt, isotonic"
RECALL = "a number in (0.0, 1.0]"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("method", "beta", METHODS), ("method", None, METHODS),
    ("policy", "max_auc", "one of max_f1, youden, target_recall"),
    ("target_recall", 0, RECALL), ("target_recall", 1.5, RECALL), ("target_recall", "high", RECALL),
    ("target_recall", True, RECALL), ("ece_bins", 0, "an integer >= 1"), ("ece_bins", 2.5, "an integer >= 1"),
])
def test_bad_params_are_named(key: str, value: object, expected: str, tmp_path: Path) -> None:
    write_predictions(tmp_path / "pred", n=20)
    with pytest.raises(PipelineError) as error:
        calibrate.main(stage_args(tmp_path, **{key: value}))
    assert str(error.value) == f"{tmp_path / 'params.yaml'} calibrate.{key}: {value!r}; expected {expected}"
    assert not any((tmp_path / d).exists() for d in ("models", "metrics", "reports"))  # refused before any work


def test_unknown_and_missing_params_are_named(tmp_path: Path) -> None:
    write_predictions(tmp_path / "pred", n=20)
    args = stage_args(tmp_path)
    path = tmp_path / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["calibrate"]["ece_bin"] = params["calibrate"].pop("ece_bins")  # a typo
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError) as error:
        calibrate.main(args)
    assert str(error.value) == f"{path} calibrate.ece_bin: unknown key; did you mean ece_bins?"
    del params["calibrate"]["ece_bin"]  # the key left out: its default lives in params.yaml only
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError) as error:
        calibrate.main(args)
    assert str(error.value) == (f"{path} calibrate.ece_bins: missing; expected an integer >= 1 "
                                "(the defaults live in params.yaml)")
    assert not (tmp_path / "models").exists()


def test_bad_predictions_are_named(tmp_path: Path) -> None:
    args = stage_args(tmp_path)
    with pytest.raises(PipelineError, match="val.csv: not found"):
        calibrate.main(args)
    write_predictions(tmp_path / "pred", n=20)
    val = pd.read_csv(tmp_path / "pred/val.csv")
    val.drop(columns=["prob_Edema"]).to_csv(tmp_path / "pred/val.csv", index=False)
    with pytest.raises(PipelineError, match="missing column prob_Edema"):
        calibrate.main(args)
    val.loc[3, "prob_Mass"] = 1.5
    val.to_csv(tmp_path / "pred/val.csv", index=False)
    with pytest.raises(PipelineError, match=r"row 5, column prob_Mass: .*1\.5.*expected a probability"):
        calibrate.main(args)
    val.loc[3, "prob_Mass"] = 0.5
    val["Nodule"] = val["Nodule"].astype(object)
    val.loc[0, "Nodule"] = "yes"
    val.to_csv(tmp_path / "pred/val.csv", index=False)
    with pytest.raises(PipelineError, match="row 2, column Nodule: 'yes'; expected 0, 1 or empty"):
        calibrate.main(args)


def test_command_line_runs_and_prints_the_test_summary(tmp_path: Path) -> None:
    write_predictions(tmp_path / "pred", n=2000)
    result = run_module("calibrate", *stage_args(tmp_path, method="isotonic"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["warning: class Hernia has no positives in val: its threshold and metrics "
                                          "are null, its calibration the identity"]
    test = json.loads((tmp_path / "reports/calibrate.json").read_text())["test"]["macro"]
    assert result.stdout.splitlines() == [
        f"calibrate: isotonic + max_f1: test macro ECE {test['ece_before']} -> {test['ece_after']}, F1 {test['f1']}, "
        f"precision {test['precision']}, recall {test['recall']}",
        "calibrate: underdiagnosis rate, worst-to-best gap: sex n/a (no column), age n/a (no column), "
        "view n/a (no column)"]


def test_bad_param_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        run_main(calibrate.main, stage_args(tmp_path, method="magic"))
    assert stop.value.code == 1
    assert capsys.readouterr().err.splitlines() == [  # the message names the params file actually read
        f"error: {tmp_path / 'params.yaml'} calibrate.method: 'magic'; expected one of none, temperature, platt, "
        "isotonic"]

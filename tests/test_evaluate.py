"""Evaluate's numbers against hand-computed values and scikit-learn: AUC with ties, patient bootstrap, curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr14.data.nih import CLASSES
from cxr14.evaluation.metrics import (
    auc,
    auc_with_interval,
    has_both,
    mean_defined,
    patient_bootstrap_weights,
    pr_on_grid,
    roc_on_grid,
    weighted_auc,
)
from cxr14.evaluation.scoring import clean_labels, curves, score_test


def test_weighted_auc_by_hand_with_ties() -> None:
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.4])
    labels = np.array([0, 0, 1, 1, 0])
    # positives 0.4 and 0.8 vs negatives 0.1, 0.4, 0.4: (1 + 0.5 + 0.5) + 3 = 5 of 6 pairs
    assert weighted_auc(scores, labels, np.ones((1, 5)))[0] == pytest.approx(5 / 6)
    # weight 2 on the 0.1 negative: pairs 2*2 + 0.5*2 + 2 = 7 of 8
    assert weighted_auc(scores, labels, np.array([[2.0, 1, 1, 1, 1]]))[0] == pytest.approx(7 / 8)
    assert np.isnan(weighted_auc(scores, np.zeros(5), np.ones((1, 5)))[0])


def test_auc_and_macro_mean_only_where_both_labels_exist() -> None:
    assert has_both(np.array([0, 1, 0])) and not has_both(np.zeros(3)) and not has_both(np.ones(3))
    assert not has_both(np.array([], dtype=int))
    assert auc(np.array([0.1, 0.4, 0.4, 0.8, 0.4]), np.array([0, 0, 1, 1, 0])) == pytest.approx(5 / 6)
    assert auc(np.array([0.1, 0.2]), np.array([1, 1])) is None and auc(np.array([0.1, 0.2]), np.zeros(2)) is None
    assert mean_defined([0.5, None, 1.0, float("nan")]) == 0.75  # None and NaN are skipped, not counted as 0
    assert mean_defined([None, float("nan")]) is None


def test_weighted_auc_matches_sklearn_on_tied_random_data() -> None:
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 20, 500) / 20, rng.random(500) < 0.2
    weights = rng.integers(0, 3, (5, 500)).astype(float)
    for w in weights:
        expected = roc_auc_score(labels, scores, sample_weight=w)
        assert weighted_auc(scores, labels, w[None])[0] == pytest.approx(expected)


def test_patient_bootstrap_moves_whole_patients() -> None:
    patients = np.array([7, 7, 7, 3, 3, 9])
    w = patient_bootstrap_weights(patients, resamples=50, seed=1)
    assert w.shape == (50, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 3] == w[:, 4]).all()
    assert (w[:, [0, 3, 5]].sum(axis=1) == 3).all()  # three patients drawn per resample
    assert np.array_equal(w, patient_bootstrap_weights(patients, 50, seed=1))


def test_interval_contains_the_point_and_is_null_without_positives() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random(400) < 0.3
    scores = labels * 0.3 + rng.random(400)
    weights = patient_bootstrap_weights(np.arange(400) // 2, 200, seed=0)
    auc, low, high = auc_with_interval(scores, labels, weights)
    assert auc == pytest.approx(roc_auc_score(labels, scores)) and low < auc < high and high - low < 0.2
    assert auc_with_interval(scores, np.zeros(400), weights) == (None, None, None)


def test_curves_on_grid() -> None:
    scores, labels = np.array([0.9, 0.8, 0.7, 0.6, 0.2]), np.array([1, 0, 1, 0, 0])
    grid = np.array([0.0, 1 / 3, 0.5, 1.0])
    # ROC points: (0,0.5) (1/3,0.5) (1/3,1) (1,1)
    assert roc_on_grid(scores, labels, grid).tolist() == [0.5, 1.0, 1.0, 1.0]
    # precision at recall >= r: r<=0.5 -> 1.0 (top score); r=1 -> 2/3
    assert pr_on_grid(scores, labels, np.array([0.0, 0.5, 1.0])).tolist() == pytest.approx([1.0, 1.0, 2 / 3])


def predictions(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"Image Index": [f"{i:08d}_000.png" for i in range(n)], "Patient ID": np.arange(n) // 3})
    for name in CLASSES:
        y = (rng.random(n) < 0.25).astype(int) if name != "Hernia" else np.zeros(n, dtype=int)
        frame[name] = y
        frame[f"prob_{name}"] = np.clip(0.5 * y + rng.random(n) * 0.6, 0, 1).round(2)  # ties on purpose
    return frame


def test_score_test_values_and_a_class_without_positives(capsys) -> None:
    pred = predictions()
    clean = pred[list(CLASSES)].to_numpy().copy()
    clean[:5, 0] = 1 - clean[:5, 0]  # the noisy labels disagree with the clean ones on 5 images
    m = score_test(pred, clean, resamples=100, seed=0)
    y, p = pred["Atelectasis"], pred["prob_Atelectasis"]
    a = m["per_class"]["Atelectasis"]
    assert a["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert a["average_precision"] == pytest.approx(average_precision_score(y, p), abs=1e-6)
    assert a["prevalence"] == pytest.approx(y.mean(), abs=1e-6) and a["positives"] == y.sum()
    assert a["auc_ci_low"] <= a["auc"] <= a["auc_ci_high"]
    assert a["oracle_auc"] == pytest.approx(roc_auc_score(y, clean[:, 0]), abs=1e-6) and a["oracle_auc"] < 1
    assert m["per_class"]["Cardiomegaly"]["oracle_auc"] == 1.0
    h = m["per_class"]["Hernia"]
    assert h["auc"] is None and h["auc_ci_low"] is None and h["average_precision"] is None and h["positives"] == 0
    assert "Hernia has no positives" in capsys.readouterr().err
    defined = [v["auc"] for k, v in m["per_class"].items() if k != "Hernia"]
    assert m["mean_auc"] == pytest.approx(np.mean(defined), abs=1e-6)
    assert m["gap_to_oracle"] == pytest.approx(m["oracle_mean_auc"] - m["mean_auc"], abs=1e-6)
    assert m["patients"] == 40 and m["images"] == 120


def test_clean_labels_follow_the_given_order_and_are_none_on_real_data(tmp_path: Path) -> None:
    assert clean_labels(tmp_path, pd.Series(["a.png"])) is None  # real data: no clean_labels.csv
    pd.DataFrame({"Image Index": ["a.png", "b.png", "c.png"],
                  "Finding Labels": ["Mass|Nodule", "No Finding", "Hernia"]}).to_csv(tmp_path / "clean_labels.csv")
    clean = clean_labels(tmp_path, pd.Series(["c.png", "a.png", "b.png"]))
    assert clean.shape == (3, 14)
    assert [[CLASSES[k] for k in np.flatnonzero(row)] for row in clean] == [["Hernia"], ["Mass", "Nodule"], []]


def test_curve_tables_skip_classes_without_both_labels() -> None:
    roc, pr = curves(predictions())
    assert "Hernia" not in roc.columns and "Atelectasis" in roc.columns
    assert roc["fpr"].iloc[0] == 0 and roc["fpr"].iloc[-1] == 1 and (roc["Atelectasis"].diff().dropna() >= 0).all()
    assert len(pr) == 101 and pr["Atelectasis"].between(0, 1).all()

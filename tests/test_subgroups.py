"""Who the model fails (evaluation/subgroups.py): age bands, bad values counted, a planted subgroup failure shows up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr14.data.nih import CLASSES
from cxr14.evaluation.metrics import auc
from cxr14.evaluation.predictions import PROB_PREFIX
from cxr14.evaluation.subgroups import (
    age_band,
    assign,
    auc_by_subgroup,
    decisions_by_subgroup,
    plot_rows,
    summary,
)


def test_age_bands_and_what_is_not_an_age() -> None:
    assert [age_band(v) for v in (0, 19, 20, 59.0, "047Y", 80, 100)] == \
        ["0-20", "0-20", "20-40", "40-60", "40-60", "80+", "80+"]
    assert [age_band(v) for v in (101, 148, 414, -1, 45.5, "", None, float("nan"), "old")] == [None] * 9


def cohort(n: int = 1200, seed: int = 0) -> pd.DataFrame:
    """Predictions for n images (2 per patient) with sex, age and view; the model sees every finding in men
    and is blind (random scores) in women."""
    rng = np.random.default_rng(seed)
    patients = np.arange(n) // 2
    sex = np.where(rng.random(n // 2) < 0.5, "F", "M")[patients]
    labels = (rng.random((n, len(CLASSES))) < 0.25).astype(int)
    noise = rng.random((n, len(CLASSES)))
    probs = np.where((sex == "M")[:, None], 0.6 * labels + 0.3 * noise, 0.55 * noise)
    out = pd.DataFrame({"Image Index": [f"{i:08d}_000.png" for i in range(n)], "Patient ID": patients,
                        "Patient Age": rng.integers(1, 95, n // 2)[patients].astype(object),
                        "Patient Gender": sex, "View Position": np.where(rng.random(n) < 0.6, "PA", "AP")})
    out[list(CLASSES)] = labels
    out[[PROB_PREFIX + c for c in CLASSES]] = probs
    return out


def arrays(pred: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return pred[list(CLASSES)].to_numpy(), pred[[PROB_PREFIX + c for c in CLASSES]].to_numpy()


def test_a_model_that_misses_one_sex_shows_the_gap() -> None:
    pred = cohort()
    labels, probs = arrays(pred)
    out = auc_by_subgroup(pred, labels, probs, resamples=200, seed=0, min_images=50)
    sex = out["sex"]
    assert sex["worst"] == "F" and sex["best"] == "M" and sex["gap"] > 0.3
    women = pred["Patient Gender"] == "F"
    expected = np.mean([auc(probs[women, k], labels[women, k]) for k in range(len(CLASSES))])
    assert sex["groups"]["F"]["mean_auc"] == pytest.approx(expected, abs=1e-6)
    assert 0.4 < sex["groups"]["F"]["mean_auc"] < 0.6 < 0.9 < sex["groups"]["M"]["mean_auc"]
    for group in sex["groups"].values():
        assert group["ci_low"] <= group["mean_auc"] <= group["ci_high"]
    assert out["view"]["gap"] < 0.1  # view is unrelated to the failure here
    # At the thresholds, the blind half goes undiagnosed far more often.
    called = probs >= 0.5
    dec = decisions_by_subgroup(pred, labels, called, min_images=50)["sex"]
    assert dec["groups"]["M"]["underdiagnosis_rate"] == 0  # men's findings all score >= 0.6, negatives <= 0.3
    assert dec["underdiagnosis_gap"]["worst"] == "F" and dec["underdiagnosis_gap"]["gap"] > 0.2
    sick_women = women.to_numpy() & labels.any(axis=1)
    assert dec["groups"]["F"]["underdiagnosis_rate"] == pytest.approx((~called[sick_women].any(axis=1)).mean())
    k = CLASSES.index("Edema")
    pos = women.to_numpy() & (labels[:, k] == 1)
    assert dec["groups"]["F"]["false_negative_rate"]["Edema"] == pytest.approx((~called[pos, k]).mean())
    assert dec["false_negative_rate_gap"]["Edema"] > 0.8  # women's Edema is called 9% of the time


def test_bad_values_are_counted_and_named_and_small_groups_have_no_number() -> None:
    pred = cohort(400)
    pred.loc[3, "Patient Age"] = 148  # the 2017 table's kind of error
    pred.loc[5, "Patient Age"] = None
    pred.loc[7, "Patient Gender"] = "O"
    pred.loc[9, "View Position"] = "LL"
    groups, invalid = assign(pred)
    assert invalid["age"]["count"] == 2 and invalid["age"]["examples"][0] == "00000003_000.png: 148"
    assert invalid["sex"]["count"] == 1 and "'O'" in invalid["sex"]["examples"][0]
    assert invalid["view"]["count"] == 1 and groups["view"][9] is None
    labels, probs = arrays(pred)
    out = auc_by_subgroup(pred, labels, probs, resamples=50, seed=0, min_images=100)
    assert out["age"]["invalid"]["count"] == 2
    assert sum(g["images"] for g in out["age"]["groups"].values()) == 398  # the two bad ages left out, only there
    assert sum(g["images"] for g in out["sex"]["groups"].values()) == 399
    small = [g for g in out["age"]["groups"].values() if g["images"] < 100]
    assert small and all("mean_auc" not in g and "too small" in g["note"] for g in small)
    assert "4 bad values left out" in summary(out)
    rows = plot_rows(out, "mean_auc", "ci_low", "ci_high")
    assert set(rows["subgroup"]) >= {"sex: F", "sex: M", "view: PA", "view: AP"}
    assert not rows["subgroup"].isin([f"age: {name}" for name, g in out["age"]["groups"].items()
                                      if "mean_auc" not in g]).any()


def test_a_table_without_the_columns_is_reported_not_a_crash() -> None:
    pred = cohort(200).drop(columns=["Patient Age", "Patient Gender", "View Position"])
    labels, probs = arrays(pred)
    out = auc_by_subgroup(pred, labels, probs, resamples=20, seed=0, min_images=10)
    assert "no 'Patient Age' column" in out["age"]["invalid"]["note"] and out["age"]["gap"] is None
    assert summary(out) == "sex n/a (no column), age n/a (no column), view n/a (no column)"

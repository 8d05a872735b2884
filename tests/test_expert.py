"""Google's expert labels (evaluation/expert.py): the file reader, the mapping onto NIH classes, the scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import NIH

from cxr14.data.nih import CLASSES, EXPERT_FILES, FINDINGS, parse_findings
from cxr14.evaluation.expert import (
    MAPPED,
    agreement,
    decisions_section,
    expert_columns,
    expert_section,
    find_expert_file,
    finding_scores,
    nih_label,
    read_expert_labels,
)
from cxr14.evaluation.metrics import auc
from cxr14.evaluation.predictions import EXPERT_PREFIX, PROB_PREFIX
from cxr14.runtime.errors import PipelineError

GOOGLE = NIH / "google2019_nih-chest-xray-labels.csv"


def test_reads_googles_real_file() -> None:
    experts = read_expert_labels(GOOGLE)
    assert len(experts) == 4376
    assert experts["Set Id"].value_counts().to_dict() == {"val": 2414, "test": 1962}
    assert experts[list(FINDINGS)].sum().to_dict() == {"Pneumothorax": 238, "Nodule or mass": 605,
                                                       "Airspace opacity": 2166, "Fracture": 186}
    test = set(Path(NIH / "test_list.txt").read_text().split())
    assert set(experts.index[experts["Set Id"] == "test"]) <= test  # the file's own claim, checked
    assert find_expert_file(NIH) == GOOGLE and find_expert_file(NIH / "images") is None


def test_nih_labels_against_the_experts_on_the_real_test_images() -> None:
    """The README's figures: how noisy NIH's report-mined labels are, on Google's 1,962 official-test images."""
    raw = pd.read_csv(GOOGLE)
    experts = read_expert_labels(GOOGLE)
    test = (raw["Set Id"] == "test").to_numpy()
    labels = pd.DataFrame(np.stack([parse_findings(t, "x") for t in raw["Finding Labels"]]), columns=list(CLASSES))
    found = {f: agreement(experts[f].to_numpy()[test], nih_label(labels, f)[test]) for f in MAPPED}
    figures = {f: (round(a["sensitivity"], 2), round(a["specificity"], 2), round(a["f1"], 2)) for f, a in found.items()}
    assert figures == {"Pneumothorax": (0.50, 0.94, 0.49), "Nodule or mass": (0.45, 0.94, 0.50),
                       "Airspace opacity": (0.45, 0.85, 0.58)}


def write(tmp_path: Path, rows: list[str], header: str = "Image Index,Fracture,Pneumothorax,Airspace opacity,"
          "Nodule or mass,Set Id") -> Path:
    path = tmp_path / EXPERT_FILES[0]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_reader_takes_yes_no_in_any_case_and_names_a_bad_cell(tmp_path: Path) -> None:
    path = write(tmp_path, ["a.png,NO,yes,No,YES,test", "b.png,NO, NO ,YES,NO,val"])
    experts = read_expert_labels(path)
    assert experts.loc["a.png", list(FINDINGS)].tolist() == [1, 1, 0, 0]  # Pneumothorax, Nodule or mass, ...
    assert experts.loc["b.png", "Airspace opacity"] == 1 and experts.loc["b.png", "Pneumothorax"] == 0
    bad = write(tmp_path, ["a.png,NO,YES,NO,NO,test", "b.png,NO,NO,maybe,NO,val"])
    with pytest.raises(PipelineError, match=r"line 3, column Airspace opacity: 'maybe'; expected YES or NO"):
        read_expert_labels(bad)
    empty = write(tmp_path, ["a.png,NO,,NO,NO,test"])
    with pytest.raises(PipelineError, match=r"line 2, column Pneumothorax: ''; expected YES or NO"):
        read_expert_labels(empty)
    with pytest.raises(PipelineError, match=r"missing column\(s\) 'Fracture'"):
        read_expert_labels(write(tmp_path, ["a.png,NO,NO,NO,test"],
                                 header="Image Index,Pneumothorax,Airspace opacity,Nodule or mass,Set Id"))
    with pytest.raises(PipelineError, match="line 3: image a.png appears twice"):
        read_expert_labels(write(tmp_path, ["a.png,NO,NO,NO,NO,test", "a.png,NO,NO,NO,NO,test"]))


def frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Test predictions: labels, probabilities, patients, and expert columns on every other image."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, len(CLASSES))) < 0.2).astype(int)
    probs = np.clip(labels * 0.5 + rng.random((n, len(CLASSES))) * 0.5, 0, 1)
    out = pd.DataFrame(labels, columns=list(CLASSES))
    out.insert(0, "Patient ID", np.arange(n) // 2)
    out.insert(0, "Image Index", [f"{i:08d}_000.png" for i in range(n)])
    for k, c in enumerate(CLASSES):
        out[PROB_PREFIX + c] = probs[:, k]
    return out


def test_mapping_takes_the_largest_member_probability_and_any_member_label() -> None:
    pred = frame(6)
    scores = finding_scores(pred, "Airspace opacity")
    members = ["Infiltration", "Consolidation", "Pneumonia", "Edema"]
    assert np.array_equal(scores, pred[[PROB_PREFIX + c for c in members]].max(axis=1).to_numpy())
    assert np.array_equal(nih_label(pred, "Nodule or mass"), pred[["Nodule", "Mass"]].max(axis=1).to_numpy())
    assert FINDINGS["Fracture"] == () and "Fracture" not in MAPPED


def test_agreement_counts() -> None:
    a = agreement(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert (a["true_positives"], a["false_positives"], a["false_negatives"], a["true_negatives"]) == (2, 1, 1, 1)
    assert a["sensitivity"] == pytest.approx(2 / 3) and a["specificity"] == 0.5 and a["f1"] == pytest.approx(2 / 3)
    assert agreement(np.zeros(3), np.zeros(3))["sensitivity"] is None


def test_section_scores_the_model_on_adjudicated_images_only_and_reports_fracture() -> None:
    pred = frame()
    experts = pd.DataFrame({f: pred[list(c)].max(axis=1).to_numpy() if c else 0 for f, c in FINDINGS.items()},
                           index=pred["Image Index"])
    experts.loc[experts.index[::2], "Pneumothorax"] = 1 - experts.loc[experts.index[::2], "Pneumothorax"]  # disagree
    covered = experts.iloc[1::2]  # every other image adjudicated
    pred = pd.concat([pred, expert_columns(pred["Image Index"], covered)], axis=1)
    assert pred[EXPERT_PREFIX + "Pneumothorax"].isna().sum() == 200
    section = expert_section(pred, "file.csv", resamples=100, seed=0)
    assert section["images"] == 200 and section["findings"]["Fracture"]["nih_classes"] == []
    assert "no NIH class" in section["findings"]["Fracture"]["note"]
    pneumothorax = section["findings"]["Pneumothorax"]
    sub = pred.iloc[1::2]
    assert pneumothorax["images"] == 200 and pneumothorax["expert_positives"] == int(sub["Pneumothorax"].sum())
    assert pneumothorax["auc"] == pytest.approx(auc(sub[PROB_PREFIX + "Pneumothorax"].to_numpy(),
                                                    sub["Pneumothorax"].to_numpy()), abs=1e-6)
    assert pneumothorax["auc_ci_low"] <= pneumothorax["auc"] <= pneumothorax["auc_ci_high"]
    # On the adjudicated rows the experts agree with NIH: the noisy labels score perfectly against them.
    assert pneumothorax["nih_labels_vs_expert"]["sensitivity"] == 1 == pneumothorax["nih_labels_vs_expert"]["f1"]
    nodule = section["findings"]["Nodule or mass"]
    assert nodule["auc"] == pytest.approx(auc(finding_scores(sub, "Nodule or mass"),
                                              nih_label(sub, "Nodule or mass")), abs=1e-6)


def test_decisions_call_a_finding_when_any_member_class_is_called() -> None:
    pred = frame(8)
    pred[EXPERT_PREFIX + "Nodule or mass"] = [1, 1, 0, 0, 1, 0, np.nan, np.nan]
    for f in ("Pneumothorax", "Airspace opacity"):
        pred[EXPERT_PREFIX + f] = np.nan
    called = np.zeros((8, len(CLASSES)), dtype=bool)
    called[0, CLASSES.index("Mass")] = called[1, CLASSES.index("Nodule")] = called[2, CLASSES.index("Mass")] = True
    called[6, CLASSES.index("Mass")] = True  # not adjudicated: not counted
    out = decisions_section(pred, called)["Nodule or mass"]
    assert out["images"] == 6 and out["expert_positives"] == 3
    assert out["against_expert"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                     "f1": pytest.approx(2 / 3)}
    assert decisions_section(pred, called)["Pneumothorax"]["images"] == 0

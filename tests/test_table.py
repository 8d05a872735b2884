"""Own labelled images as a dataset (`data.format: table`): the table's checks, unknown labels masked in the loss,
the AUCs and the thresholds, and `train.init` (external validation, epochs 0) through the stages in-process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TRAIN, stage_main, stage_result

from cxr14.data.nih import CLASSES
from cxr14.data.table import build_table_splits
from cxr14.evaluation.calibration import choose_threshold, fit_calibrator
from cxr14.evaluation.metrics import PatientBootstrap, auc, auc_with_interval
from cxr14.runtime.errors import PipelineError
from cxr14.training.loss import SmoothedBCE, positive_weights

HEADER = "image,patient,Atelectasis,Cardiomegaly,sex,test"
GOOD = ["a.png,p1,1,0,M,0", "b.png,p1,0,,F,0", "c.png,p2,0,1,M,1", "d.png,p3,1,0,F,0", "e.png,p4,0,1,M,1"]


def table(folder: Path, lines: list[str], header: str = HEADER, images: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        for line in lines:
            (folder / line.split(",")[0]).write_bytes(b"x")
    path = folder / "labels.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


@pytest.mark.parametrize(("header", "lines", "message"), [
    ("image,patient,Atelectasis,Sex", GOOD[:1], "labels.csv: unknown column 'Sex'; did you mean sex?"),
    (HEADER, [GOOD[0], "b.png,p1,2,0,M,0"], "labels.csv line 3, column Atelectasis: '2'; expected 1, 0 or empty"),
    (HEADER, [GOOD[0], GOOD[0]], "labels.csv line 3: image a.png already on line 2; expected one row per image"),
    ("image,patient,sex", ["a.png,p1,M"], "labels.csv: no finding column; expected at least one of Atelectasis"),
    (HEADER, [GOOD[0], "b.png,p1,0,0,M,1"], "labels.csv line 2, column test: patient p1 has images on both sides"),
    (HEADER, ["a.png,p1,1,0,X,0"], "labels.csv line 2, column sex: 'X'; expected M, F or empty"),
])
def test_table_refusals_are_one_line_naming_file_line_column(tmp_path: Path, header: str, lines: list[str],
                                                            message: str) -> None:
    path = table(tmp_path / "own", lines, header)
    with pytest.raises(PipelineError) as err:
        build_table_splits(tmp_path / "own", "labels.csv", 0.3, 0.2, 0, "error")
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_image_refused_or_skipped(tmp_path: Path) -> None:
    table(tmp_path / "own", GOOD)
    (tmp_path / "own" / "b.png").unlink()
    with pytest.raises(PipelineError, match=r"labels.csv line 3, column image: .*b.png not found \(1 of 5"):
        build_table_splits(tmp_path / "own", "labels.csv", 0.3, 0.2, 0, "error")
    splits, report = build_table_splits(tmp_path / "own", "labels.csv", 0.3, 0.2, 0, "skip")
    assert report["missing_images"] == 1 and sum(len(s) for s in splits.values()) == 4
    assert sorted(splits["test"]["Image Index"]) == ["c.png", "e.png"]  # the test flag, not a draw
    # findings the table lacks are unknown (NaN) in every split, never negatives
    assert all(s[c].isna().all() for s in splits.values() for c in CLASSES[2:])
    assert report["findings_absent"] == list(CLASSES[2:])


def test_masked_loss_counts_known_entries_only() -> None:
    labels = np.array([[1, np.nan], [0, 1], [0, np.nan], [1, 0]], dtype=np.float32)
    weight = positive_weights(labels, None)
    assert weight.tolist() == [1.0, 1.0]  # class 1: 1 positive, 1 negative among the known
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-1.0, 7.0], [0.0, -2.0]])
    target = torch.from_numpy(labels)
    loss = SmoothedBCE(torch.tensor([2.0, 3.0]))(logits, target)
    known = ~torch.isnan(target)
    each = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], target[known],
                                                                pos_weight=torch.tensor([2.0, 3.0]).expand(4, 2)[known],
                                                                reduction="none")
    assert loss.item() == pytest.approx(each.mean().item(), rel=1e-6)
    full = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # no unknowns: the plain BCE
    assert SmoothedBCE(torch.ones(2))(logits, full).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, full).item(), rel=1e-7)


def test_auc_interval_threshold_masked_and_null_when_unknown() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.4).astype(float)
    p = np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1)
    partial = y.copy()
    partial[::4] = np.nan
    keep = ~np.isnan(partial)
    assert auc(p, partial) == auc(p[keep], y[keep])
    boot = PatientBootstrap(np.arange(60) // 2, 50, 0)
    point, low, high = auc_with_interval(p, partial, boot)
    assert point == auc(p[keep], y[keep]) and low < point < high
    unknown = np.full(60, np.nan)
    assert auc(p, unknown) is None and auc_with_interval(p, unknown, boot) == (None, None, None)
    assert choose_threshold("max_f1", unknown, p) is None
    assert choose_threshold("max_f1", partial, p) == choose_threshold("max_f1", y[keep], p[keep])
    spec = fit_calibrator("platt", np.stack([partial, unknown], 1), np.stack([p, p], 1), classes=("a", "b"))
    assert spec["params"]["b"] is None and spec["params"]["a"] == fit_calibrator("platt", y[keep, None],
                                                                                  p[keep, None], ("a",))["params"]["a"]


def test_table_chain_external_validation_keeps_the_model_bytes(workdir: Path, capsys) -> None:
    """split -> prepare -> train (train.init, epochs 0) -> evaluate -> calibrate on a table of the tiny demo's
    images with Effusion left out: the model is the init's bytes, and Effusion has no AUC and no threshold."""
    from cxr14.model.factory import build_model

    rows = pd.concat([pd.read_csv(workdir / f"data/split/{s}.csv").assign(test=int(s == "test"))
                      for s in ("train", "val", "test")])
    own = workdir / "own"
    own.mkdir()
    frame = pd.DataFrame({"image": ["../" + p for p in rows["path"]], "patient": rows["Patient ID"],
                          **{c: rows[c] for c in CLASSES if c != "Effusion"}, "test": rows["test"]})
    frame.to_csv(own / "labels.csv", index=False)
    torch.manual_seed(0)
    ckpt = {"state_dict": build_model("resnet18", "none").state_dict(), "arch": "resnet18", "output_stride": 32,
            "classes": list(CLASSES), "image_size": 48, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    torch.save(ckpt, workdir / "init.pt")
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["data"].update(format="table", root="own", table="labels.csv")
    params["train"] = {**TRAIN, "epochs": 0, "init": "init.pt"}
    params["evaluate"]["bootstrap"] = 20
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("split", "prepare", "train", "evaluate", "calibrate"):
        code, err = stage_result(stage_main(stage), ["--params", "params.yaml"], capsys)
        assert code == 0, (stage, err)
    assert (workdir / "models/model.pt").read_bytes() == (workdir / "init.pt").read_bytes()
    model_id = hashlib.md5((workdir / "init.pt").read_bytes()).hexdigest()[:8]
    train_metrics = json.loads((workdir / "metrics/train.json").read_text())
    assert train_metrics["model"] == model_id and train_metrics["epochs_run"] == 0
    evaluate = json.loads((workdir / "metrics/evaluate.json").read_text())
    assert evaluate["model"] == model_id and len(evaluate["data"]) == 8
    report = json.loads((workdir / "reports/evaluate.json").read_text())
    assert report["per_class"]["Effusion"]["auc"] is None and "no known labels" in report["per_class"]["Effusion"][
        "note"]
    scored = [c["auc"] for c in report["per_class"].values() if c["auc"] is not None]
    assert scored and report["mean_auc"] == pytest.approx(np.mean(scored), abs=1e-6)
    thresholds = json.loads((workdir / "models/thresholds.json").read_text())["thresholds"]
    assert thresholds["Effusion"] is None
    # the arch must match the checkpoint's: one line naming the file
    params["train"]["arch"] = "resnet34"
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = stage_result(stage_main("train"), ["--params", "params.yaml"], capsys)
    assert code != 0 and len(err) == 1 and "train.init: init.pt: arch resnet18; expected resnet34" in err[0]
    assert (workdir / "models/model.pt").read_bytes() == (workdir / "init.pt").read_bytes()  # left as it was

"""The out-of-distribution score: its fit by hand, both engines' agreement, predict's report, evaluate's summary,
the ood stage on tiny data, and its one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEPLOYED_SIZE, phantom, stage_main, stage_result
from PIL import Image

from cxr14 import cli
from cxr14.deployment.export import verify
from cxr14.deployment.onnx_file import read_metadata
from cxr14.evaluation.scoring import OOD_COLUMN, headline, ood_summary
from cxr14.model.factory import build_model
from cxr14.model.ood import conformal_threshold, fit_gaussian, score_features
from cxr14.runtime.errors import PipelineError


def gaussian_features(n: int, seed: int) -> np.ndarray:
    """Non-negative correlated features whose square roots are Gaussian, as the fit assumes."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6)) @ np.array([[1, .5, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 2, 0, 0, 0],
                                            [0, 0, 0, 1, 0, 0], [0, 0, 0, .3, .5, 0], [0, 0, 0, 0, 0, 1]])
    return (4 + z) ** 2


def test_fit_by_hand_mean_scores_zero_and_threshold_keeps_95_percent_of_val() -> None:
    from sklearn.covariance import LedoitWolf

    train, val = gaussian_features(2000, 0), gaussian_features(199, 1)
    fit = fit_gaussian(train, val)
    roots = np.sqrt(train)
    mean = roots.mean(0)
    assert score_features(fit, mean[None] ** 2)[0] == pytest.approx(0.0, abs=1e-6)  # a point at the mean
    precision = LedoitWolf().fit(roots).precision_
    d = np.sqrt(val[:5]) - mean
    by_hand = np.einsum("ij,jk,ik->i", d, precision, d) / d.shape[1]
    assert score_features(fit, val[:5]) == pytest.approx(by_hand, rel=1e-4)
    scores = score_features(fit, val)
    # the ceil(200 * 0.95) = 190th smallest of 199 scores: 9 of them above it
    assert fit["threshold"] == np.sort(scores)[189] and (scores > fit["threshold"]).sum() == 9
    assert fit["val_flagged"] == pytest.approx(9 / 199) and fit["val_flagged"] <= 0.05
    assert conformal_threshold(np.arange(10.0)) == 9.0  # too few for the quantile: the largest
    far = gaussian_features(50, 2) * 9  # three times the roots: far from the train images
    assert (score_features(fit, far) > fit["threshold"]).all()


def test_a_fit_that_cannot_be_made_is_one_line() -> None:
    with pytest.raises(PipelineError, match=r"^train: out-of-distribution fit needs at least 2 train and 1 val "
                                            r"images; got 1 and 5$"):
        fit_gaussian(gaussian_features(1, 0), gaussian_features(5, 1))
    bad = gaussian_features(20, 0)
    bad[3, 2] = np.nan
    with pytest.raises(PipelineError, match="features are not finite"):
        fit_gaussian(bad, gaussian_features(5, 1))


def test_onnx_and_pytorch_scores_agree(deployed: Path) -> None:
    ckpt = torch.load(deployed / "model.pt", weights_only=True)
    model = build_model("resnet18", "none").eval()
    model.load_state_dict(ckpt["state_dict"])
    images = np.stack([phantom(DEPLOYED_SIZE, DEPLOYED_SIZE, 500 + i) for i in range(6)]
                      + [np.full((DEPLOYED_SIZE, DEPLOYED_SIZE), 255, np.uint8)])
    check = verify(model, ckpt, deployed / "model.onnx", images, batch_size=4)
    assert check["ood_max_relative_difference"] <= 1e-4 and check["ood_flags_differ"] == 0
    assert read_metadata(deployed / "model.onnx")["ood_threshold"] == pytest.approx(ckpt["ood"]["threshold"])


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """A folder with two unseen phantom radiographs, a white image and an unreadable file."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(phantom(DEPLOYED_SIZE, DEPLOYED_SIZE, 900 + i)).save(folder / f"a{i}.png")
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(folder / "white.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_predict_reports_in_distribution_and_warns_once_for_a_flagged_image(deployed: Path, mixed: Path, engine: str,
                                                                            capsys) -> None:
    """The flagged image is still predicted (a warning line, not a refusal); the unreadable one is the only error
    and sets the exit status, as before."""
    model = ["--model", str(deployed / "model.onnx")] if engine == "onnx" else [
        "--model", str(deployed / "model.pt"), "--thresholds", str(deployed / "thresholds.json"),
        "--calibrator", str(deployed / "calibrator.json")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.predict([str(mixed), *model, "--engine", engine, "--json", "--device", "cpu"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert [": ".join(line.split(": ")[:2]) for line in err] == [f"error: {mixed / 'broken.png'}",
                                                              f"warning: {mixed / 'white.png'}"]
    assert "out of distribution (score " in err[1]
    threshold = torch.load(deployed / "model.pt", weights_only=True)["ood"]["threshold"]
    results = {Path(r["image"]).name: r for r in json.loads(captured.out)}
    assert {n: r["in_distribution"] for n, r in results.items()} == {"a0.png": True, "a1.png": True,
                                                                    "white.png": False}
    assert all((r["ood_score"] <= threshold) == r["in_distribution"] for r in results.values())


def test_predict_csv_and_table_carry_the_score(deployed: Path, mixed: Path, tmp_path: Path, capsys) -> None:
    (mixed / "broken.png").unlink()
    out = tmp_path / "out.csv"
    code, _ = stage_result(cli.predict, [mixed, "--model", deployed / "model.onnx", "--csv", out], capsys)
    assert code == 0
    import csv

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    flags = {Path(r["image"]).name: r["in_distribution"] for r in rows}
    assert flags == {"a0.png": "True", "a1.png": "True", "white.png": "False"} and all(float(r["ood_score"]) >= 0
                                                                                       for r in rows)
    capsys.readouterr()
    cli.predict([str(mixed / "white.png"), str(mixed / "a0.png"), "--model", str(deployed / "model.onnx")])
    out = capsys.readouterr().out
    assert "in distribution: NO, the findings below are not to be trusted (out-of-distribution score" in out
    assert "in distribution: yes (out-of-distribution score" in out


def test_evaluate_summary_and_headline() -> None:
    import pandas as pd

    preds = {"val": pd.DataFrame({OOD_COLUMN: [0.5, 1.0, 3.0, 4.0]}), "test": pd.DataFrame({OOD_COLUMN: [0.1, 2.5]})}
    summary = ood_summary(preds, {"ood": {"threshold": 2.0, "coverage": 0.95}})
    assert summary["val"] == {"images": 4, "flagged": 0.5, "median_score": 2.0}
    assert summary["test"]["flagged"] == 0.5 and summary["threshold"] == 2.0
    assert headline({"mean_auc": 0.7, "ood": summary})["ood_flagged"] == 0.5
    assert ood_summary(preds, {}) is None


def tiny_checkpoint(project: Path, fit: bool) -> Path:
    """`project` (the tiny data) with a random resnet10 checkpoint, with an out-of-distribution fit when `fit` (on
    the val images' features: the train images' pass would only cost time here), and the ood params section."""
    from cxr14.data.nih import CLASSES
    from cxr14.model.ood import features

    torch.manual_seed(0)
    model = build_model("resnet10", "none").eval()
    ckpt = {"state_dict": model.state_dict(), "arch": "resnet10", "classes": list(CLASSES), "image_size": 48,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "output_stride": 32}
    if fit:
        val = features(model, "resnet10", np.load(project / "data/prepared/val.npy"), ckpt["mean"], ckpt["std"])
        ckpt["ood"] = fit_gaussian(val, val)
    (project / "models").mkdir()
    torch.save(ckpt, project / "models/model.pt")
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params + "ood:\n  images: 6\n  seed: 0\n  batch_size: 64\n")
    return project


def test_ood_stage_on_tiny_data(workdir: Path, capsys) -> None:
    fitted_project = tiny_checkpoint(workdir, fit=True)
    code, err = stage_result(stage_main("ood"), ["--params", "params.yaml"], capsys)
    assert code == 0, err
    metrics = json.loads((fitted_project / "metrics/ood.json").read_text())
    report = json.loads((fitted_project / "reports/ood.json").read_text())
    assert set(metrics) == {"test_flagged", *(f"{s}_{k}" for s in ("photographs", "synthetic", "ct_mr", "misread")
                                              for k in ("auroc", "flagged"))}
    tests = report["test"]["images"]
    assert report["variants"]["blank"]["images"] == 6 and report["sets"]["synthetic"]["images"] == 18
    assert report["variants"]["inverted"]["images"] == tests and report["sets"]["misread"]["images"] == 3 * tests
    assert all(0 <= v <= 1 for v in metrics.values())
    assert not math.isnan(metrics["synthetic_auroc"])


def test_ood_stage_refuses_a_checkpoint_without_the_fit(workdir: Path, capsys) -> None:
    tiny_checkpoint(workdir, fit=False)
    code, err = stage_result(stage_main("ood"), ["--params", "params.yaml"], capsys)
    assert code == 1 and err == ["error: models/model.pt: no out-of-distribution fit (ood); expected a checkpoint "
                                 "of this revision's train stage: run dvc repro train"]


def test_a_checkpoint_with_a_broken_fit_is_refused_in_one_line(deployed: Path, mixed: Path, tmp_path: Path,
                                                               capsys) -> None:
    ckpt = torch.load(deployed / "model.pt", weights_only=True)
    ckpt["ood"]["factor"] = ckpt["ood"]["factor"][:3]
    torch.save(ckpt, tmp_path / "broken.pt")
    code, err = stage_result(cli.predict, [mixed / "a0.png", "--model", tmp_path / "broken.pt", "--thresholds",
                                           deployed / "thresholds.json", "--calibrator",
                                           deployed / "calibrator.json"], capsys)
    d = len(ckpt["ood"]["mean"])
    assert code == 1 and err == [f"error: {tmp_path / 'broken.pt'}: ood: factor is (3, {d}); expected ({d}, {d}) "
                                 f"for {d} features"]

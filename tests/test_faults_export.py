"""The deployment side of the fault catalogue, export settings and expert labels: a setting the exporter cannot
honour and an expert-label file that is wrong or matches nothing stop in one line, or warn with the counts,
and never leave a silent wrong answer or a deleted model behind.

Each case runs the stage in this process (conftest's `stage_result`): the exit status, one line naming the file
or key, no traceback, and the previous outputs byte-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DEPLOYED_SIZE, project_params, stage_main, stage_result

from cxr14.data.loader import to_model_input
from cxr14.data.nih import CLASSES, EXPERT_FILES
from cxr14.deployment.export import file_opset, newest_opset
from cxr14.evaluation.predictions import PROB_PREFIX
from cxr14.model.factory import build_model

MODELS = ("models/model.onnx", "models/model.int8.onnx")


def snapshot(folder: Path, names: tuple[str, ...]) -> dict[str, bytes | None]:
    return {n: (folder / n).read_bytes() if (folder / n).is_file() else None for n in names}


@pytest.fixture
def models_project(deployed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with a previous export in place (the fixture's model.onnx as both files), what a refused
    run must leave as it was, and the stage's model inputs."""
    (tmp_path / "models").mkdir()
    for name in ("model.pt", "thresholds.json", "calibrator.json"):
        shutil.copy(deployed / name, tmp_path / "models" / name)
    for name in MODELS:
        shutil.copy(deployed / "model.onnx", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "1")
    return tmp_path


@pytest.fixture
def export_project(models_project: Path, deployed: Path) -> Path:
    """models_project with the arrays and evaluate's predictions the stage checks against (tests/test_export.py's
    set-up): a run can succeed."""
    tmp_path = models_project
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    images = np.random.default_rng(2).integers(0, 256, (8, DEPLOYED_SIZE, DEPLOYED_SIZE), dtype=np.uint8)
    np.save(prepared / "test.npy", images)
    np.save(prepared / "val.npy", images[:4])
    ckpt = torch.load(deployed / "model.pt", weights_only=True)
    model = build_model("resnet18", "none").eval()
    model.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        probs = torch.sigmoid(model(to_model_input(torch.from_numpy(images)[:, None].float()))).numpy()
    (tmp_path / "data" / "predictions").mkdir(parents=True)
    frame = pd.DataFrame({**{c: 0 for c in CLASSES}, **{f"prob_{c}": probs[:, k] for k, c in enumerate(CLASSES)}})
    frame.to_csv(tmp_path / "data" / "predictions" / "test.csv", index=False)
    frame.head(4).to_csv(tmp_path / "data" / "predictions" / "val.csv", index=False)
    return tmp_path


@pytest.mark.parametrize(("override", "expected"), [
    ({"opset": 99}, "export.opset: 99; expected at most {newest}, the newest opset the installed exporter writes"),
    ({"opset": 7}, "export.opset: 7; expected an ONNX opset from 18"),
    ({"tolerance": 0}, "export.tolerance: 0; expected a positive number"),
], ids=["opset-99", "opset-7", "tolerance-0"])
def test_export_refuses_a_setting_it_cannot_honour_and_keeps_the_models(
        models_project: Path, capsys: pytest.CaptureFixture, override: dict, expected: str) -> None:
    """Refused before any work; under DVC the files survive too, being persist (tests/test_dvc_yaml.py)."""
    export_project = models_project
    before = snapshot(export_project, MODELS)
    params = project_params(export_project / "bad.yaml", {"export": override})
    code, err = stage_result(stage_main("export"), ["--params", params], capsys)
    assert code == 1
    assert len(err) == 1 and err[0].startswith(f"error: {params} {expected.format(newest=newest_opset())}"), err
    assert snapshot(export_project, MODELS) == before
    assert not (export_project / "reports").exists() and not list((export_project / "models").glob(".*.tmp"))


def test_the_opset_bound_is_what_the_exporter_writes() -> None:
    """The bound is onnx's newest opset, the C converter's reach (onnxscript's own converter stops at 25)."""
    import onnx

    assert newest_opset() == onnx.defs.onnx_opset_version() >= 25


def test_export_records_the_opset_its_file_declares_and_keeps_no_file_that_differs(
        export_project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A successful run records the file's own opset; an exporter that writes another opset than asked (as
    torch's does, silently, past what it can convert), or a model failing its check, leaves the previous pair."""
    from stages import export as stage

    params = project_params(export_project / "params.yaml", {"export": {"opset": 21}})
    code, err = stage_result(stage_main("export"), ["--params", params], capsys)
    assert code == 0, err
    report = json.loads((export_project / "reports" / "export.json").read_text())
    assert report["opset"] == file_opset(export_project / "models" / "model.onnx") == 21
    good = snapshot(export_project, (*MODELS, "reports/export.json"))

    def other_opset(model, ckpt, meta, out, opset) -> None:  # the good file, declaring opset 20 (a second real
        import onnx  # export would cost seconds: what is tested is the stage's check of what the file declares)

        graph = onnx.load_from_string(good["models/model.onnx"])
        next(o for o in graph.opset_import if o.domain in ("", "ai.onnx")).version = 20
        onnx.save(graph, out)

    monkeypatch.setattr(stage, "export_onnx", other_opset)
    code, err = stage_result(stage_main("export"), ["--params", params], capsys)
    assert code == 1
    assert err == ["error: models/model.onnx: the exporter wrote opset 20; expected export.opset 21 (not written; "
                   "try another export.opset)"]
    assert snapshot(export_project, (*MODELS, "reports/export.json")) == good

    # a file that fails its check: the good file's bytes again (exporting the same model again costs seconds and
    # gives the same bytes), checked against a tolerance below float32's rounding
    monkeypatch.setattr(stage, "export_onnx", lambda model, ckpt, meta, out, opset: Path(out).write_bytes(
        good["models/model.onnx"]))
    strict = project_params(export_project / "strict.yaml", {"export": {"opset": 21, "tolerance": 1e-12}})
    code, err = stage_result(stage_main("export"), ["--params", strict], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: models/model.onnx: ONNX Runtime's probabilities differ from PyTorch's")
    assert "expected at most export.tolerance 1e-12" in err[0]
    assert snapshot(export_project, (*MODELS, "reports/export.json")) == good  # the old good pair, not the new one
    assert not list((export_project / "models").glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- expert labels

HEADER = "Image Index,Fracture,Pneumothorax,Airspace opacity,Nodule or mass,Set Id"
TEST_IMAGES = 40


def names(n: int = TEST_IMAGES) -> list[str]:
    return [f"{i:08d}_000.png" for i in range(n)]


def predictions(split: str) -> pd.DataFrame:
    """What predict_split returns, without a model: labels, probabilities and subgroup columns."""
    rng = np.random.default_rng(0 if split == "test" else 1)
    n = TEST_IMAGES if split == "test" else 20
    labels = (rng.random((n, len(CLASSES))) < 0.3).astype(int)
    frame = pd.DataFrame({"Image Index": names(n) if split == "test" else [f"v{i}.png" for i in range(n)],
                          "Patient ID": np.arange(n), "Patient Age": rng.integers(20, 80, n),
                          "Patient Gender": np.where(np.arange(n) % 2, "M", "F"), "View Position": "PA"})
    frame[list(CLASSES)] = labels
    for k, c in enumerate(CLASSES):
        frame[PROB_PREFIX + c] = np.clip(labels[:, k] * 0.3 + rng.random(n) * 0.7, 0, 1)
    return frame


@pytest.fixture
def evaluate_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder where evaluate's inference is replaced by fixed predictions (the expert-label path is
    what is under test), with a data root for the expert file and previous outputs in place."""
    from stages import evaluate as stage

    monkeypatch.setattr(stage, "load_checkpoint", lambda *a, **k: (None, {}))
    monkeypatch.setattr(stage, "predict_split", lambda model, ckpt, split, device, batch_size: predictions(split))
    monkeypatch.setattr(stage, "file_digest", lambda path: "0" * 32)  # the model and data ids: no such files here
    (tmp_path / "root").mkdir()
    for name in ("metrics/evaluate.json", "reports/evaluate.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('{"previous": 1}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "1")
    project_params(tmp_path / "params.yaml", {"data": {"root": "root"}, "train": {"device": "cpu"},
                                              "evaluate": {"bootstrap": 10}})
    return tmp_path


def expert_file(project: Path, rows: list[str]) -> Path:
    path = project / "root" / EXPERT_FILES[0]
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return Path("root") / EXPERT_FILES[0]


def test_evaluate_names_an_expert_row_duplicated_with_a_leading_space(evaluate_project: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    rows = [f"{n},NO,YES,NO,NO,test" for n in names(10)] + [f" {names()[1]},NO,NO,NO,NO,test"]
    path = expert_file(evaluate_project, rows)
    before = snapshot(evaluate_project, ("metrics/evaluate.json", "reports/evaluate.json"))
    code, err = stage_result(stage_main("evaluate"), [], capsys)
    assert code == 1
    assert err == [f"error: {path} line 12: image {names()[1]} appears twice (lines 3, 12, different labels; ids "
                   "compared without surrounding spaces); expected one row per image"]
    assert snapshot(evaluate_project, ("metrics/evaluate.json", "reports/evaluate.json")) == before
    assert not (evaluate_project / "data").exists()  # stopped before inference: no predictions written


@pytest.mark.parametrize(("rows", "matched", "reference"), [
    ([f"x{i}.png,NO,YES,NO,NO,test" for i in range(30)], 0, "30 images it marks test"),  # another data set's ids
    ([f"{n},NO,YES,NO,NO,test" for n in names(4)] + [f"x{i}.png,NO,NO,YES,NO,test" for i in range(10)], 4,
     "14 images it marks test"),  # 4 of 14: under half
    ([f"{n},NO,YES,NO,NO," for n in names(3)] + [f"x{i}.png,NO,NO,YES,NO," for i in range(10)], 3, "13 images"),
], ids=["none", "under-half-of-test", "under-half-no-set-id"])
def test_evaluate_warns_when_the_expert_file_matches_few_test_images(
        evaluate_project: Path, capsys: pytest.CaptureFixture, rows: list[str], matched: int, reference: str) -> None:
    path = expert_file(evaluate_project, rows)
    code, err = stage_result(stage_main("evaluate"), [], capsys)
    assert code == 0, err
    assert [line for line in err if str(path) in line] == [
        f"warning: {path}: {matched} of the {TEST_IMAGES} test images have an expert row, against the file's "
        f"{reference} (expected at least 50% of them); the expert-label AUCs rest on {matched} images"]
    headline = json.loads((evaluate_project / "metrics" / "evaluate.json").read_text())
    assert headline["expert_images"] == matched


def test_evaluate_counts_the_expert_images_without_a_warning_when_the_file_matches(
        evaluate_project: Path, capsys: pytest.CaptureFixture) -> None:
    """Google's shape: every test-marked row is a test image, and val rows the test split has not."""
    rows = [f"{n},NO,{'YES' if i % 3 else 'NO'},NO,NO,test" for i, n in enumerate(names(20))]
    path = expert_file(evaluate_project, rows + [f"v{i}.png,NO,NO,NO,NO,val" for i in range(30)])
    code, err = stage_result(stage_main("evaluate"), [], capsys)
    assert code == 0 and not [line for line in err if str(path) in line], err
    headline = json.loads((evaluate_project / "metrics" / "evaluate.json").read_text())
    report = json.loads((evaluate_project / "reports" / "evaluate.json").read_text())
    assert headline["expert_images"] == report["expert"]["images"] == 20
    assert "expert" in headline


def test_no_expert_file_no_expert_headline(evaluate_project: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = stage_result(stage_main("evaluate"), [], capsys)
    assert code == 0, err
    assert "expert_images" not in json.loads((evaluate_project / "metrics" / "evaluate.json").read_text())

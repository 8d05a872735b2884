"""The export stage's ONNX model and predict's engines: metadata, agreement with PyTorch, inputs, failures."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DEPLOYED_SIZE, own

from cxr14 import cli
from cxr14.data.loader import to_model_input
from cxr14.data.nih import CLASSES
from cxr14.deployment import predict
from cxr14.deployment.export import (
    export_onnx,
    int8_check,
    ort_probabilities,
    quantize_int8,
    update_metadata,
    verify,
)
from cxr14.deployment.onnx_file import read_metadata
from cxr14.model.factory import build_model
from cxr14.runtime.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
NIH_IMAGES = ROOT.parent / "shared" / "nih" / "images"
SIZE = DEPLOYED_SIZE


def test_metadata_carries_everything_predict_needs(deployed: Path) -> None:
    meta = read_metadata(deployed / "model.onnx")
    assert meta["classes"] == list(CLASSES) and meta["image_size"] == SIZE and meta["arch"] == "resnet18"
    assert meta["thresholds"]["Atelectasis"] == 0.3 and meta["thresholds"]["Hernia"] is None
    assert meta["calibrator"] == json.loads((deployed / "calibrator.json").read_text())
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["best_epoch"] == 3


def test_the_file_is_the_same_bytes_wherever_it_is_exported(deployed: Path, tmp_path: Path) -> None:
    """No trace of the machine (the exporter's stack traces hold absolute paths): the same model, exported
    again in another folder, gives the same bytes, so dvc.lock does not change from one clone to another."""
    import onnx

    ckpt = torch.load(deployed / "model.pt", weights_only=True)
    model = build_model("resnet18", "none").eval()
    model.load_state_dict(ckpt["state_dict"])
    meta = read_metadata(deployed / "model.onnx")
    export_onnx(model, ckpt, meta, tmp_path / "again.onnx", 20)
    assert (tmp_path / "again.onnx").read_bytes() == (deployed / "model.onnx").read_bytes()
    proto = onnx.load(str(deployed / "model.onnx"))
    assert not any(n.metadata_props for n in proto.graph.node) and not proto.graph.metadata_props
    assert not any(str(ROOT) in n.doc_string for n in proto.graph.node)


def test_onnx_runtime_matches_pytorch_and_a_different_model_does_not(deployed: Path) -> None:
    ckpt = torch.load(deployed / "model.pt", weights_only=True)
    model = build_model("resnet18", "none").eval()
    model.load_state_dict(ckpt["state_dict"])
    images = np.random.default_rng(1).integers(0, 256, (20, SIZE, SIZE), dtype=np.uint8)
    same = verify(model, ckpt, deployed / "model.onnx", images, batch_size=8)
    assert same["images"] == 20 and same["max_abs_difference"] <= 1e-4
    torch.manual_seed(1)
    other = build_model("resnet18", "none").eval()  # other weights: the check must see it
    assert verify(other, ckpt, deployed / "model.onnx", images, batch_size=8)["max_abs_difference"] > 1e-2


def test_both_engines_give_the_same_table(deployed: Path, capsys: pytest.CaptureFixture) -> None:
    files = sorted(str(p) for p in (deployed / "images").rglob("*.*"))
    tables = {}
    for engine, onnx in (("onnx", True), ("torch", False)):
        cli.predict_main([*files, *own(deployed, onnx), "--engine", engine, "--json", "--batch-size", "4"])
        tables[engine] = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in tables["onnx"]] == files
    for a, b in zip(tables["onnx"], tables["torch"], strict=True):
        for ra, rb in zip(a["predictions"], b["predictions"], strict=True):
            assert ra["class"] == rb["class"] and abs(ra["probability"] - rb["probability"]) < 1e-4
            assert abs(ra["calibrated"] - rb["calibrated"]) < 1e-4 and ra["threshold"] == rb["threshold"]
    assert any(r["calibrated"] != r["probability"] for r in tables["onnx"][0]["predictions"])  # calibrated


def test_inputs_folders_globs_and_missing(deployed: Path, tmp_path: Path) -> None:
    images = deployed / "images"
    files, errors = predict.expand_inputs([str(images), str(images / "nested" / "img1.png"),
                                           str(images / "**" / "img*.png"), str(tmp_path / "absent.png"),
                                           str(tmp_path / "*.png"), str(tmp_path), f"{images}/./colour.jpg"])
    nested = [str(images / "nested" / f"img{i}.png") for i in range(5)]
    assert files == [str(images / "colour.jpg"), *nested, str(tmp_path / "absent.png")]  # each once, however spelt
    assert errors == [f"{tmp_path / '*.png'}: pattern matches no PNG, JPEG or DICOM file",
                      f"{tmp_path}: folder holds no PNG, JPEG or DICOM file"]


def test_csv_rows_and_a_broken_file(deployed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out" / "predictions.csv"
    with pytest.raises(SystemExit) as exit_info:
        cli.predict_main([str(deployed / "images"), str(tmp_path / "broken.png"), *own(deployed), "--csv", str(out),
                      "--batch-size", "4"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'broken.png'}: cannot decode image" in err
    assert f"predict (onnx, {deployed / 'model.onnx'}): 6 image(s) x 14 classes" in err and "1 failed" in err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * len(CLASSES) and list(rows[0]) == list(cli.CSV_COLUMNS)
    for r in rows:
        t = json.loads((deployed / "thresholds.json").read_text())["thresholds"][r["class"]]
        if t is None:
            assert r["threshold"] == "" and r["decision"] == "n/a"
        else:
            assert r["decision"] == ("POS" if float(r["calibrated"]) >= t else "NEG")
            assert float(r["margin"]) == pytest.approx(float(r["calibrated"]) - t)
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.skipif(not NIH_IMAGES.is_dir(), reason="needs ../shared/nih")
def test_real_nih_images_in_a_folder_with_a_corrupt_one(deployed: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """NIH's 1024 px PNGs (some RGBA) through the default engine; a corrupt file among them is named, the rest
    are written."""
    folder = tmp_path / "nih"
    folder.mkdir()
    real = sorted(NIH_IMAGES.glob("*.png"))[:16]
    for p in real:
        (folder / p.name).symlink_to(p)
    (folder / "00000000_000.png").write_bytes(open(real[0], "rb").read()[:5000])  # truncated
    out = tmp_path / "out.csv"
    with pytest.raises(SystemExit) as exit_info:
        cli.predict_main([str(folder), *own(deployed), "--csv", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {folder / '00000000_000.png'}: cannot decode image" in err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 * len(CLASSES) and {Path(r["image"]).name for r in rows} == {p.name for p in real}


def test_onnx_engine_never_imports_torch(deployed: Path, tmp_path: Path) -> None:
    """Heatmaps too: with --gradcam the default engine draws them from the file's cam output."""
    code = ("import sys; from cxr14.cli import predict_main as main\n"
            "try:\n    main(sys.argv[1:])\nfinally:\n"
            "    assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'pandas', "
            "'sklearn')], 'heavy imports'\n")
    done = subprocess.run([sys.executable, "-c", code, str(deployed / "images"), *own(deployed), "--json",
                           "--gradcam", str(tmp_path / "cam")], capture_output=True, text=True, timeout=120,
                          cwd=deployed, env={**os.environ, "CI": "1"})
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == 6 and all(r["model"] == str(deployed / "model.onnx") for r in results)
    for r in results:  # each positive class's overlay, or the closest one's, named as the torch engine names them
        positives = [p["class"] for p in r["predictions"] if p["decision"] == "POS"] or [None]
        assert len(r["gradcam"]) == len(positives) and all(Path(f).is_file() for f in r["gradcam"])
        assert all(Path(f).name == f"{Path(r['image']).stem}_{c}.png" for f, c in zip(r["gradcam"], positives,
                                                                                     strict=True) if c)
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == sorted(Path(f).name for r in results
                                                                          for f in r["gradcam"])


def test_engine_errors_are_one_line(deployed: Path, tmp_path: Path) -> None:
    image = str(deployed / "images" / "colour.jpg")
    assert cli.parse_predict_args([image, "--gradcam", str(tmp_path)]).engine == "onnx"  # heatmaps from the file
    with pytest.raises(PipelineError, match=r"nowhere.onnx: not found; run the export stage"):
        cli.predict([image, "--model", str(tmp_path / "nowhere.onnx")])
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(PipelineError, match=r"junk.onnx: not a readable ONNX model"):
        cli.predict([image, "--model", str(tmp_path / "junk.onnx")])
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(PipelineError, match=r"--device cuda: this ONNX Runtime has no CUDA provider"):
            cli.predict([image, *own(deployed), "--device", "cuda"])
    temperature = {"method": "temperature", "split": "val", "params": dict.fromkeys(CLASSES, 1.5)}
    (tmp_path / "temperature.json").write_text(json.dumps(temperature))
    with pytest.raises(PipelineError, match=r"model.onnx metadata: these thresholds apply to platt-calibrated "
                       r"probabilities, but .*temperature.json is temperature"):
        cli.predict([image, *own(deployed), "--calibrator", str(tmp_path / "temperature.json")])
    assert cli.parse_predict_args([image, "--model", "m.pt"]).engine == "torch"
    assert cli.parse_predict_args([image]).engine == "onnx" and cli.parse_predict_args([image]).model is None  # see run
    for wrong in (["--precision", "int8", "--model", "m.onnx"], ["--precision", "fp32", "--engine", "torch"]):
        with pytest.raises(SystemExit):
            cli.parse_predict_args([image, *wrong])


def test_export_stage_keeps_no_model_that_fails_its_check(deployed: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """The stage in a project folder: with a tolerance below float32's rounding the check fails, and no
    model.onnx is left to be deployed by mistake; with the default tolerance it passes and writes its metrics."""
    import shutil

    from conftest import project_params

    from stages import export as stage

    (tmp_path / "models").mkdir()
    for name in ("model.pt", "thresholds.json", "calibrator.json"):
        shutil.copy(deployed / name, tmp_path / "models" / name)
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    images = np.random.default_rng(2).integers(0, 256, (10, SIZE, SIZE), dtype=np.uint8)
    np.save(tmp_path / "data" / "prepared" / "test.npy", images)
    np.save(tmp_path / "data" / "prepared" / "val.npy", images[:6])
    ckpt = torch.load(deployed / "model.pt", weights_only=True)
    model = build_model("resnet18", "none").eval()
    model.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():  # what evaluate would have written, off by 0.001 (as bf16 on a GPU might be)
        probs = torch.sigmoid(model(to_model_input(torch.from_numpy(images)[:, None].float()))).numpy() + 1e-3
    (tmp_path / "data" / "predictions").mkdir(parents=True)
    frame = pd.DataFrame({**{c: 0 for c in CLASSES}, **{f"prob_{c}": probs[:, k] for k, c in enumerate(CLASSES)}})
    frame.to_csv(tmp_path / "data" / "predictions" / "test.csv", index=False)
    frame.head(6).to_csv(tmp_path / "data" / "predictions" / "val.csv", index=False)
    monkeypatch.chdir(tmp_path)
    stage.main(["--params", str(project_params(tmp_path / "params.yaml", {}))])
    metrics = json.loads((tmp_path / "reports" / "export.json").read_text())
    assert json.loads((tmp_path / "metrics" / "export.json").read_text()) == {  # headline: no AUC on all-0 labels
        "int8_drop": None}
    assert metrics["images"] == 10 and 0 <= metrics["max_abs_difference"] <= 1e-4 and metrics["opset"] == 20
    assert abs(metrics["max_abs_difference_to_evaluate"] - 1e-3) < 1e-4
    exported = (tmp_path / "models" / "model.onnx").read_bytes()
    assert metrics["file_bytes"] == len(exported)
    assert read_metadata(tmp_path / "models" / "model.onnx")["source"].startswith("models/model.pt md5 ")
    int8 = metrics["int8"]  # labels all 0 here: no AUC to compare (unchecked), the decisions still are
    assert int8["file_bytes"] == (tmp_path / "models" / "model.int8.onnx").stat().st_size < metrics["file_bytes"] / 3
    assert int8["calibration_images"] == 6 and int8["within_limit"] is None
    assert int8["test"]["mean_auc"] is None and int8["test"]["decisions"] == 10 * 13 and int8["val"]["images"] == 6
    assert 0 < int8["test"]["max_abs_difference_to_float32"] < 0.2
    meta = read_metadata(tmp_path / "models" / "model.int8.onnx")
    assert meta["precision"] == "int8" and meta["int8_within_limit"] is None

    # the runs below export the same model again: its bytes instead (a second export costs seconds, same bytes)
    monkeypatch.setattr(stage, "export_onnx", lambda model, ckpt, meta, out, opset: Path(out).write_bytes(exported))

    # a lossy int8 model (val's check says so): kept, flagged in its metadata, and the stage warns
    real = stage.int8_check
    monkeypatch.setattr(stage, "int8_check", lambda *a: real(*a) | {"within_limit": False})
    capsys.readouterr()
    stage.main(["--params", str(project_params(tmp_path / "params.yaml", {}))])
    assert "export: warning: models/model.int8.onnx loses more than export.int8_max_auc_drop" in capsys.readouterr().err
    assert read_metadata(tmp_path / "models" / "model.int8.onnx")["int8_within_limit"] is False
    assert json.loads((tmp_path / "reports" / "export.json").read_text())["int8"]["within_limit"] is False

    # quantizing fails: the old pair stays as it was, never a new model.onnx beside the old model.int8.onnx
    before = {n: (tmp_path / "models" / n).read_bytes() for n in ("model.onnx", "model.int8.onnx")}
    (tmp_path / "models" / "model.pt").write_bytes((deployed / "model.pt").read_bytes())  # the same, touched

    def broken(*args: object) -> None:
        raise PipelineError("quantizer failed")

    real_quantize = stage.quantize_int8
    monkeypatch.setattr(stage, "quantize_int8", broken)
    with pytest.raises(PipelineError, match="quantizer failed"):
        stage.main(["--params", str(project_params(tmp_path / "params.yaml", {}))])
    assert {n: (tmp_path / "models" / n).read_bytes() for n in before} == before
    assert not list((tmp_path / "models").glob(".*.tmp"))

    monkeypatch.setattr(stage, "quantize_int8", real_quantize)
    for written in ("models/model.onnx", "models/model.int8.onnx", "metrics", "reports"):
        shutil.rmtree(tmp_path / written) if (tmp_path / written).is_dir() else (tmp_path / written).unlink()
    # a tolerance below float32's rounding: the check fails, and nothing is left to be deployed by mistake
    strict = project_params(tmp_path / "strict.yaml", {"export": {"tolerance": 1e-12}})
    with pytest.raises(PipelineError, match=r"models/model.onnx: ONNX Runtime's probabilities differ from PyTorch's "
                       r"by up to .* expected at most export.tolerance 1e-12"):
        stage.main(["--params", str(strict)])
    assert not (tmp_path / "models" / "model.onnx").exists() and not (tmp_path / "metrics").exists()
    assert not (tmp_path / "reports").exists()
    assert not list((tmp_path / "models").glob(".*.tmp"))  # the checked temporary is gone too


def test_int8_model_is_close_to_float32_and_a_lossy_one_is_flagged(deployed: Path, tmp_path: Path) -> None:
    """The quantized fixture model gives nearly float32's probabilities, at float32's resolution (the head is not
    quantized); the check counts changed decisions and flags a model whose mean AUC drops past the limit."""
    images = np.random.default_rng(3).integers(0, 256, (40, SIZE, SIZE), dtype=np.uint8)
    quantize_int8(deployed / "model.onnx", tmp_path / "int8.onnx", images[:16], batch_size=8)
    meta = read_metadata(tmp_path / "int8.onnx")
    assert meta["precision"] == "int8" and meta["int8_calibration_images"] == 16
    assert meta["thresholds"] == read_metadata(deployed / "model.onnx")["thresholds"]
    fp32 = ort_probabilities(deployed / "model.onnx", images, 16, "test")
    int8 = ort_probabilities(tmp_path / "int8.onnx", images, 16, "test")
    assert fp32.shape == int8.shape == (40, len(CLASSES)) and 0 < np.abs(fp32 - int8).max() < 0.1
    assert len(np.unique(int8)) > 500  # of 560: a quantized sigmoid would give at most 256 levels
    rng = np.random.default_rng(4)
    labels = (rng.random((200, len(CLASSES))) < 0.3).astype(int)
    good = np.clip(labels * 0.4 + rng.random(labels.shape) * 0.6, 0, 1)
    thresholds = dict.fromkeys(CLASSES, 0.5) | {"Hernia": None}
    flipped = good.copy()
    flipped[:3, 0] = 1 - flipped[:3, 0]  # three decisions of one class move across 0.5
    same = int8_check(labels, good, flipped, None, thresholds, list(CLASSES), 0.01)
    assert same["decisions"] == 200 * 13 and same["decisions_changed"] == sum(
        (good[:3, 0] >= 0.5) != (flipped[:3, 0] >= 0.5))
    assert same["within_limit"] is True and same["mean_auc_float32"] - same["mean_auc"] < 0.01
    assert same["largest_class_auc_drop"]["class"] == "Atelectasis"  # the only class that moved
    lossy = int8_check(labels, good, rng.random(labels.shape), None, thresholds, list(CLASSES), 0.01)
    assert lossy["within_limit"] is False and lossy["mean_auc_float32"] - lossy["mean_auc"] > 0.1
    assert int8_check(labels, good, rng.random(labels.shape), None, thresholds, list(CLASSES), 0.9)["within_limit"]
    nothing = int8_check(np.zeros_like(labels), good, flipped, None, thresholds, list(CLASSES), 0.01)
    assert nothing["within_limit"] is None and nothing["mean_auc"] is None  # no positives: unchecked
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(  # log(-x): a model that answers NaN
        [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT), helper.make_node("Neg", ["x"], ["n"]),
         helper.make_node("Log", ["n"], ["probabilities"])], "nan",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [None, 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 1, SIZE, SIZE])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "nan.onnx"))
    with pytest.raises(PipelineError, match=r"final.onnx: ONNX Runtime gave non-finite probabilities"):
        ort_probabilities(tmp_path / "nan.onnx", np.full((2, SIZE, SIZE), 7, np.uint8), 2, "t", "final.onnx")


def test_cpu_default_is_the_int8_model_and_fp32_on_request(deployed: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    import shutil

    (tmp_path / "models").mkdir()
    shutil.copy(deployed / "model.onnx", tmp_path / "models" / "model.onnx")
    images = np.random.default_rng(5).integers(0, 256, (16, SIZE, SIZE), dtype=np.uint8)
    quantize_int8(deployed / "model.onnx", tmp_path / "models" / "model.int8.onnx", images, batch_size=8)
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the CPU
    monkeypatch.setattr(predict, "int8_is_fast", lambda: True)  # whatever CPU runs the tests
    image, out = str(deployed / "images" / "colour.jpg"), str(tmp_path / "out.csv")
    for extra, used in (([], "models/model.int8.onnx"), (["--precision", "fp32"], "models/model.onnx"),
                        (["--precision", "int8"], "models/model.int8.onnx")):
        cli.predict_main([image, "--csv", out, *extra])
        assert f"predict (onnx, {used}): 1 image(s)" in capsys.readouterr().err
    monkeypatch.setattr(predict, "int8_is_fast", lambda: False)  # x86 without VNNI: 8-bit products saturate
    cli.predict_main([image, "--csv", out])
    assert "predict (onnx, models/model.onnx): 1 image(s)" in capsys.readouterr().err
    cli.predict_main([image, "--json"])
    assert json.loads(capsys.readouterr().out)[0]["model"] == "models/model.onnx"
    monkeypatch.setattr(predict, "int8_is_fast", lambda: True)
    cli.predict_main([image])
    assert capsys.readouterr().out.startswith("model: models/model.int8.onnx (onnx engine)\n")
    with pytest.raises(PipelineError, match=r"--precision int8 with --device cuda: the int8 model is for the CPU"):
        cli.predict([image, "--precision", "int8", "--device", "cuda"])
    (tmp_path / "models" / "model.int8.onnx").unlink()  # the export stage did not write one: float32
    cli.predict_main([image, "--csv", out])
    assert "predict (onnx, models/model.onnx): 1 image(s)" in capsys.readouterr().err
    with pytest.raises(PipelineError, match=r"models/model.int8.onnx: not found; run the export stage"):
        cli.predict([image, "--precision", "int8"])
    quantize_int8(deployed / "model.onnx", tmp_path / "models" / "model.int8.onnx", images, batch_size=8)
    update_metadata(tmp_path / "models" / "model.int8.onnx", int8_within_limit=False)  # export found it lossy
    cli.predict_main([image, "--csv", out])
    err = capsys.readouterr().err
    assert "note: models/model.int8.onnx scored more than export.int8_max_auc_drop below float32" in err
    assert "predict (onnx, models/model.onnx): 1 image(s)" in err
    cli.predict_main([image, "--csv", out, "--precision", "int8"])  # asked for by name: it runs
    assert "predict (onnx, models/model.int8.onnx): 1 image(s)" in capsys.readouterr().err

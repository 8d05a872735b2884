"""The deployment side of the fault catalogue: ONNX metadata.

predict's onnx engine believes what the exported file says about itself (class names, image size, thresholds,
calibrator), so a copied, edited or foreign file must be refused before the first image: one line naming the
file and the metadata field and what was expected, exit 1, no traceback, nothing written. The metadata goes
through the same checks as the calibrate stage's thresholds.json and calibrator.json (tests/test_faults.py);
so do the onnx engine's --device values. Each case edits a copy of the session's `deployed` model in tmp_path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import DEPLOYED_SIZE, stage_result

from cxr14 import cli
from cxr14.data.nih import CLASSES
from cxr14.deployment.onnx_file import METADATA_KEY, read_metadata

PROBABILITY = "expected a number in [0, 1] or null"


@pytest.fixture(scope="module")
def proto(deployed: Path) -> onnx.ModelProto:
    """The deployed model, loaded once: each case edits a copy of its metadata (the fixture's files stay as is)."""
    return onnx.load(str(deployed / "model.onnx"))


def metadata_of(model: onnx.ModelProto) -> dict[str, Any]:
    return json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])


def write_model(model: onnx.ModelProto, path: Path, meta: Any, raw: bool = False) -> Path:
    """`model` at `path` with its `cxr14` metadata replaced by `meta` (JSON-encoded unless `raw`, None: removed)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.metadata_props[:]
    if meta is not None:
        onnx.helper.set_model_props(copy, {METADATA_KEY: meta if raw else json.dumps(meta)})
    onnx.save_model(copy, str(path))
    return path


def edited(proto: onnx.ModelProto, tmp_path: Path, edit: Callable[[dict], Any]) -> Path:
    """tmp_path/m.onnx: the deployed model with `edit` applied, in place, to a copy of its metadata."""
    meta = metadata_of(proto)
    edit(meta)
    return write_model(proto, tmp_path / "m.onnx", meta)


def refused(model: Path, deployed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    """predict on `model` (in tmp_path): exit 1, one stderr line (returned without its `error: ` and the file's
    name), no traceback (stage_result), nothing written beside the model (the --csv table nor its temporary)."""
    code, err = stage_result(cli.predict, [deployed / "images", "--model", model, "--csv", tmp_path / "out.csv",
                                           "--device", "cpu"], capsys)
    assert code == 1 and len(err) == 1, err
    assert [p.name for p in tmp_path.iterdir()] == [model.name]
    prefix = f"error: {model}: "
    assert err[0].startswith(prefix), err
    return err[0][len(prefix):]


def test_the_untouched_copy_runs(proto: onnx.ModelProto, deployed: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same rewrite with nothing changed predicts, so each refusal below is its edit's."""
    monkeypatch.chdir(tmp_path)
    model = edited(proto, tmp_path, lambda meta: None)
    code, err = stage_result(cli.predict, [deployed / "images", "--model", model, "--csv", tmp_path / "out.csv",
                                           "--device", "cpu"], capsys)
    assert code == 0 and len((tmp_path / "out.csv").read_text().splitlines()) == 1 + 6 * len(CLASSES), err


ORDER = ", ".join(CLASSES)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(classes=m["classes"][::-1]),
     f"metadata classes: Hernia before Pleural_Thickening; expected the order {ORDER}"),
    (lambda m: m.update(classes=[*m["classes"][:-1], "Covid"]),
     f"metadata classes: unknown finding 'Covid'; expected one of {ORDER}"),
    (lambda m: m.update(classes=[*m["classes"][:-1], "Mass"]),
     "metadata classes: Mass twice; expected each finding once"),
    (lambda m: m.update(classes=m["classes"][:-1]),
     f"metadata classes: 13 names; expected {len(CLASSES)}, the graph's output width"),
    (lambda m: m.update(classes="Atelectasis"),
     f"metadata classes: 'Atelectasis'; expected a list of finding names ({ORDER})"),
], ids=["reversed", "unknown", "twice", "fewer-than-the-graph", "not-a-list"])
def test_class_names_must_be_the_graphs_in_the_canonical_order(proto, deployed, tmp_path, capsys, monkeypatch,
                                                               edit, message: str) -> None:
    """Reversed, every probability would be printed under another finding's name."""
    monkeypatch.chdir(tmp_path)
    assert refused(edited(proto, tmp_path, edit), deployed, tmp_path, capsys) == message


@pytest.mark.parametrize(("value", "shown"), [(7, "7"), (float("nan"), "nan"), ("0.5", "'0.5'"), (-0.1, "-0.1"),
                                              (True, "True"), ([0.5], "[0.5]")],
                         ids=["seven", "nan", "string", "negative", "bool", "list"])
def test_a_threshold_outside_0_1_is_refused(proto, deployed, tmp_path, capsys, monkeypatch, value, shown) -> None:
    """At 7 every class was NEG with margin -6.99; at NaN `nan NEG +nan`: now the file is refused, as the same
    value in thresholds.json is."""
    monkeypatch.chdir(tmp_path)
    model = edited(proto, tmp_path, lambda m: m["thresholds"].update(Effusion=value))
    assert refused(model, deployed, tmp_path, capsys) == f"metadata thresholds.Effusion: {shown}; {PROBABILITY}"


def test_a_class_without_a_threshold_is_refused_and_null_is_not(proto, deployed, tmp_path, capsys,
                                                                monkeypatch) -> None:
    """A missing key printed `n/a` without a word; null is the documented `n/a` (val could not set one)."""
    monkeypatch.chdir(tmp_path)
    model = edited(proto, tmp_path, lambda m: m["thresholds"].pop("Effusion"))
    assert refused(model, deployed, tmp_path, capsys) == ("metadata thresholds.Effusion missing; expected one per "
                                                          "class (null where undefined)")
    model = edited(proto, tmp_path, lambda m: m.update(thresholds=[0.3] * len(CLASSES)))
    assert refused(model, deployed, tmp_path, capsys).startswith("metadata thresholds is [0.3, ")
    assert read_metadata(edited(proto, tmp_path, lambda m: m["thresholds"].update(Effusion=None)))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["calibrator"]["params"].update(Mass=[float("nan"), 0.0]),
     "metadata calibrator.params.Mass: [nan, 0.0] is not a valid platt calibrator; expected [a, b], two finite "
     "numbers or null"),
    (lambda m: m["calibrator"]["params"].pop("Mass"),
     "metadata calibrator.params.Mass: no platt parameters; expected [a, b], two finite numbers or null"),
    (lambda m: m.update(calibrator={"method": "magic", "params": {}}),
     "metadata calibrator: {'method': 'magic', 'params': {}}; expected {'method': one of none, temperature, platt, "
     "isotonic, 'params': {class: ...}}"),
], ids=["nan", "missing-class", "unknown-method"])
def test_a_broken_calibrator_is_refused(proto, deployed, tmp_path, capsys, monkeypatch, edit, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert refused(edited(proto, tmp_path, edit), deployed, tmp_path, capsys) == message


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(format="1"), "metadata format: '1'; expected an integer from 1 to 2, the formats this cxr14 "
                                     "reads"),
    (lambda m: m.update(format=3), "metadata format: 3; expected an integer from 1 to 2, the formats this cxr14 "
                                   "reads (update cxr14 to read newer files)"),
    (lambda m: m.update(image_size=64), f"metadata image_size: 64; expected {DEPLOYED_SIZE}, the graph's input size"),
    (lambda m: m.update(image_size="32"), f"metadata image_size: '32'; expected {DEPLOYED_SIZE}, the graph's input "
                                          "size"),
    (lambda m: m.pop("thresholds"), "metadata lacks thresholds; expected the export stage's"),
    (lambda m: m.pop("calibrator"), "metadata lacks calibrator; expected the export stage's"),
    (lambda m: m.update(int8_within_limit="no"), "metadata int8_within_limit: 'no'; expected true, false or null"),
    # the heatmaps' geometry: a wrong one would draw them in the wrong place without a word
    (lambda m: m.pop("cam"), "metadata cam: None; expected the 'cam' output's geometry"),
    (lambda m: m["cam"].update(cells=[2, 2]), "metadata cam cells: [2, 2]; expected two positive integers, the 'cam' "
                                              "output's last two dimensions (['batch', 14, 1, 1], one map per class)"),
    (lambda m: m["cam"].update(stride=[32, 0]), "metadata cam stride: [32, 0]; expected two positive numbers"),
    (lambda m: m.update(ood_threshold=None), "metadata ood_threshold: None; expected a finite number >= 0 for the "
                                             "graph's ood_score output"),
    (lambda m: m.update(ood_threshold="3"), "metadata ood_threshold: '3'; expected a finite number >= 0 for the "
                                            "graph's ood_score output"),
    (lambda m: m.update(ood_threshold=-1), "metadata ood_threshold: -1; expected a finite number >= 0 for the "
                                           "graph's ood_score output"),
], ids=["format-string", "format-newer", "image-size", "image-size-string", "no-thresholds",
        "no-calibrator", "int8-flag", "no-cam", "cam-cells", "cam-stride", "ood-threshold-null",
        "ood-threshold-string", "ood-threshold-negative"])
def test_other_metadata_fields_are_refused_by_name(proto, deployed, tmp_path, capsys, monkeypatch, edit,
                                                   message: str) -> None:
    """These were tracebacks (or, for a missing key, named `<onnxruntime...InferenceSession object at 0x...>`)."""
    monkeypatch.chdir(tmp_path)
    assert refused(edited(proto, tmp_path, edit), deployed, tmp_path, capsys).startswith(message)


@pytest.mark.parametrize(("meta", "message"), [
    (None, f"no '{METADATA_KEY}' metadata; expected a model written by the export stage"),
    ("{not json", f"'{METADATA_KEY}' metadata is not JSON ("),
    ("[1, 2]", "metadata: [1, 2]; expected a JSON object (the export stage's)"),
], ids=["none", "not-json", "not-an-object"])
def test_missing_or_unreadable_metadata_names_the_file(proto, deployed, tmp_path, capsys, monkeypatch, meta,
                                                       message: str) -> None:
    monkeypatch.chdir(tmp_path)
    model = write_model(proto, tmp_path / "m.onnx", meta, raw=True)
    assert refused(model, deployed, tmp_path, capsys).startswith(message)


def foreign(input_name: str, dtype: int, output_name: str = "probabilities") -> onnx.ModelProto:
    """A tiny graph that is not the export stage's: (batch, 1, S, S) in, a (batch, 14) slice of it out."""
    h = onnx.helper
    x = h.make_tensor_value_info(input_name, dtype, ["batch", 1, DEPLOYED_SIZE, DEPLOYED_SIZE])
    y = h.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, ["batch", len(CLASSES)])
    consts = [h.make_node("Constant", [], [n], value=h.make_tensor(n, onnx.TensorProto.INT64, [2], v))
              for n, v in (("shape", [-1, DEPLOYED_SIZE ** 2]), ("starts", [0, 0]),
                           ("ends", [2 ** 62, len(CLASSES)]))]
    nodes = [*consts, h.make_node("Cast", [input_name], ["f"], to=onnx.TensorProto.FLOAT),
             h.make_node("Reshape", ["f", "shape"], ["flat"]),
             h.make_node("Slice", ["flat", "starts", "ends"], [output_name])]
    graph = h.make_graph(nodes, "foreign", [x], [y])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("graph", "message"), [
    (foreign("x", onnx.TensorProto.UINT8), "graph inputs ['x'], outputs ['probabilities']; expected ['image'] and "
                                           "'probabilities' among the outputs, as the export stage writes them"),
    (foreign("image", onnx.TensorProto.FLOAT), "graph image tensor(float) ['batch', 1, 32, 32] -> probabilities "
                                               "['batch', 14]; expected tensor(uint8) [batch, 1, S, S] -> "
                                               "[batch, classes], as the export stage writes them"),
], ids=["other-input-name", "float-input"])
def test_a_foreign_model_with_copied_metadata_is_refused(proto, deployed, tmp_path, capsys, monkeypatch, graph,
                                                         message: str) -> None:
    """Was ONNX Runtime's `Required inputs (['x']) are missing` at the first batch."""
    monkeypatch.chdir(tmp_path)
    model = write_model(graph, tmp_path / "m.onnx", metadata_of(proto))
    assert refused(model, deployed, tmp_path, capsys) == message


@pytest.mark.parametrize("device", ["foo", "mps", "cuda:x", "CPU"])
def test_a_device_the_onnx_engine_cannot_use_is_refused(deployed, tmp_path, capsys, monkeypatch, device) -> None:
    """These ran on the CPU without a word."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.csv"
    code, err = stage_result(cli.predict, [deployed / "images", "--model", deployed / "model.onnx", "--csv", out,
                                           "--device", device], capsys)
    torch = "; --engine torch runs on mps" if device == "mps" else ""
    assert code == 1 and err == [f"error: --device: {device}; expected auto, cpu, cuda or cuda:N with the onnx "
                                 f"engine{torch}"]
    assert not out.exists()


def test_the_int8_file_is_checked_the_same_way(proto, deployed, tmp_path, capsys, monkeypatch) -> None:
    """The int8 file (the CPU default) keeps the graph's input and outputs (the cam output too: read_metadata checks
    it against the metadata) and carries the same metadata."""
    from cxr14.deployment.export import quantize_int8, update_metadata

    monkeypatch.chdir(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (2, DEPLOYED_SIZE, DEPLOYED_SIZE), dtype=np.uint8)
    quantize_int8(deployed / "model.onnx", tmp_path / "m.int8.onnx", images, 2)
    int8 = read_metadata(tmp_path / "m.int8.onnx")
    assert int8["precision"] == "int8" and int8["cam"] == read_metadata(deployed / "model.onnx")["cam"]  # heatmaps
    update_metadata(tmp_path / "m.int8.onnx", image_size=64)
    assert refused(tmp_path / "m.int8.onnx", deployed, tmp_path, capsys) == (
        f"metadata image_size: 64; expected {DEPLOYED_SIZE}, the graph's input size")

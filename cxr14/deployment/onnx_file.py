"""Running an exported model: the ONNX Runtime session and the metadata the export stage embeds.

The metadata is checked against the graph and by the same checks as the calibrate stage's thresholds.json and
calibrator.json (`read_metadata`): predict prints what the file says, so a file that says something wrong is
refused, not believed.

No PyTorch here (nor pandas or scikit-learn): predict's ONNX engine imports this module, and a fresh process
predicting one image should spend its time on the image, not on imports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cxr14.data.nih import CLASSES
from cxr14.evaluation.calibration import check_calibrator, check_thresholds, shown
from cxr14.runtime.devices import cpu_count
from cxr14.runtime.errors import PipelineError

METADATA_KEY = "cxr14"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
CAM_NAME = "cam"  # Grad-CAM of the last block at cell resolution (batch, classes, h, w); absent in older files
OOD_NAME = "ood_score"  # float32 (batch,): the out-of-distribution score (cxr14.model.ood); outputs go by name
# version of the metadata layout; predict refuses files from a newer layout. 2: `ood_threshold` (null: the graph
# has no ood_score output), the threshold of the graph's out-of-distribution score
FORMAT = 2


def session(path: Path | str, providers: list[str] | None = None, threads: int | None = None,
            spin: bool = True) -> Any:
    """An ONNX Runtime session on the CPU (or `providers`), with this process's share of the cores. `spin=False`
    where other threads share the cores (predict's decoders): ONNX Runtime's idle workers then sleep instead of
    spinning between operators, and leave the cores to the threads that feed them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_count()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def read_metadata(path: Path | str, ort_session: Any = None) -> dict[str, Any]:
    """The `cxr14` metadata of an exported model (its ONNX Runtime session, when open), checked against the graph
    and against the rules the calibrate stage's files meet (`check_metadata`): predict believes nothing else, so a
    copied, edited or foreign file is refused in one line naming `path` and the field, never run."""
    where = str(path)
    ort_session = ort_session if ort_session is not None else session(path)
    props = ort_session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise PipelineError(f"{where}: no '{METADATA_KEY}' metadata; expected a model written by the export stage")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{where}: '{METADATA_KEY}' metadata is not JSON ({exc})") from None
    meta = check_metadata(meta, where, graph_shape(ort_session, where))
    meta["cam"] = check_cam(meta, where, ort_session)
    return meta


def graph_shape(ort_session: Any, where: str) -> tuple[int | None, int | None, bool]:
    """The graph's image size and output width (None where a dimension is symbolic), and whether it has the
    ood_score output, once its input and outputs are the export stage's (outputs found by name, whatever their
    order or company, such as `cam`): a foreign graph fails here in one line, not in ONNX Runtime's words at the
    first batch."""
    inputs, outputs = ort_session.get_inputs(), ort_session.get_outputs()
    named = {o.name: o for o in outputs}
    if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in named:
        raise PipelineError(f"{where}: graph inputs {[i.name for i in inputs]}, outputs {list(named)}; "
                            f"expected ['{INPUT_NAME}'] and '{OUTPUT_NAME}' among the outputs, as the export stage "
                            "writes them")
    if OOD_NAME in named and (named[OOD_NAME].type != "tensor(float)" or len(named[OOD_NAME].shape) != 1):
        raise PipelineError(f"{where}: graph {OOD_NAME} {named[OOD_NAME].type} {list(named[OOD_NAME].shape)}; "
                            "expected tensor(float) [batch], as the export stage writes it")
    shape, out = list(inputs[0].shape), list(named[OUTPUT_NAME].shape)
    square = len(shape) == 4 and not (isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] != shape[3])
    if inputs[0].type != "tensor(uint8)" or not square or shape[1] != 1 or len(out) != 2:
        raise PipelineError(f"{where}: graph {INPUT_NAME} {inputs[0].type} {shape} -> {OUTPUT_NAME} {out}; expected "
                            f"tensor(uint8) [batch, 1, S, S] -> [batch, classes], as the export stage writes them")
    size = shape[2] if isinstance(shape[2], int) and shape[2] == shape[3] else None
    return size, out[1] if isinstance(out[1], int) else None, OOD_NAME in named


def check_cam(meta: dict[str, Any], where: str, ort_session: Any) -> dict[str, Any] | None:
    """The `cam` output's metadata (None where the file has no such output: exported before heatmaps were),
    checked against the graph: predict resamples the cells with this stride and offset, so a wrong one would draw
    heatmaps in the wrong place without a word."""
    outputs = {o.name: o for o in ort_session.get_outputs()}
    cam = meta.get("cam")
    if CAM_NAME not in outputs:
        if cam is not None:
            raise PipelineError(f"{where}: metadata cam describes an output '{CAM_NAME}' the graph lacks (outputs "
                                f"{list(outputs)}); expected the export stage's file")
        return None
    shape = list(outputs[CAM_NAME].shape)
    if not isinstance(cam, dict):
        raise PipelineError(f"{where}: metadata cam: {shown(cam)}; expected the '{CAM_NAME}' output's geometry "
                            "(layer, cells, stride, offset), as the export stage writes it")
    cells, stride, offset = cam.get("cells"), cam.get("stride"), cam.get("offset")
    if not (isinstance(cells, list) and len(cells) == 2 and all(integer(n) and n > 0 for n in cells)
            and len(shape) == 4 and all(not isinstance(d, int) or d == n for d, n in zip(shape[2:], cells, strict=True))
            and (not isinstance(shape[1], int) or shape[1] == len(meta["classes"]))):
        raise PipelineError(f"{where}: metadata cam cells: {shown(cells)}; expected two positive integers, the "
                            f"'{CAM_NAME}' output's last two dimensions ({shape}, one map per class)")
    for key, value, low in (("stride", stride, 0.0), ("offset", offset, None)):
        if not (isinstance(value, list) and len(value) == 2 and all(number(v) and (low is None or v > low)
                                                                    for v in value)):
            raise PipelineError(f"{where}: metadata cam {key}: {shown(value)}; expected two "
                                f"{'positive' if low is not None else 'finite'} numbers (pixels)")
    if not isinstance(cam.get("layer"), str):
        raise PipelineError(f"{where}: metadata cam layer: {shown(cam.get('layer'))}; expected a module name")
    return cam


def number(value: Any) -> bool:
    """A finite int or float as JSON gives one (not a bool)."""
    return (integer(value) or isinstance(value, float)) and math.isfinite(value)


def check_metadata(meta: Any, where: str, graph: tuple[int | None, int | None, bool]) -> dict[str, Any]:
    """The metadata's fields by the rules the calibrate stage's files meet (the same checks: `check_thresholds`,
    `check_calibrator`), and consistent with the graph's (image size, output width, has ood_score) `graph`."""
    if not isinstance(meta, dict):
        raise PipelineError(f"{where}: metadata: {shown(meta)}; expected a JSON object (the export stage's)")
    fmt = meta.get("format", FORMAT)
    if not (integer(fmt) and 1 <= fmt <= FORMAT):
        newer = " (update cxr14 to read newer files)" if integer(fmt) and fmt > FORMAT else ""
        raise PipelineError(f"{where}: metadata format: {shown(fmt)}; expected an integer from 1 to {FORMAT}, the "
                            f"formats this cxr14 reads{newer}")
    missing = [k for k in ("format", "classes", "image_size", "thresholds", "calibrator") if k not in meta]
    if missing:
        raise PipelineError(f"{where}: metadata lacks {', '.join(missing)}; expected the export stage's")
    size, width, has_ood = graph
    classes = check_class_names(meta["classes"], where, "metadata classes", width)
    image_size = meta["image_size"]
    if not (integer(image_size) and image_size > 0 and image_size == (size or image_size)):
        raise PipelineError(f"{where}: metadata image_size: {shown(image_size)}; expected "
                            + (f"{size}, the graph's input size" if size else "a positive integer"))
    check_thresholds(meta["thresholds"], where, classes, key="metadata thresholds")
    if meta["calibrator"] is not None:  # null: the thresholds apply to raw probabilities
        check_calibrator(meta["calibrator"], where, classes, key="metadata calibrator")
    if meta.get("int8_within_limit") not in (None, True, False):  # open_onnx's fallback reads it
        raise PipelineError(f"{where}: metadata int8_within_limit: {shown(meta['int8_within_limit'])}; expected "
                            "true, false or null")
    check_ood_threshold(meta, where, has_ood)
    return meta


def check_ood_threshold(meta: dict[str, Any], where: str, has_ood: bool) -> None:
    """`ood_threshold`: a number >= 0 where the graph has the ood_score output (predict flags an image above it),
    null or absent where it has none (format 1 files predate the score)."""
    t = meta.get("ood_threshold")
    if has_ood and (not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0):
        raise PipelineError(f"{where}: metadata ood_threshold: {shown(t)}; expected a finite number >= 0 for the "
                            f"graph's {OOD_NAME} output")
    if not has_ood and t is not None:
        raise PipelineError(f"{where}: metadata ood_threshold: {shown(t)}, but the graph has no {OOD_NAME} output; "
                            "expected null")


def integer(value: Any) -> bool:
    """An int as JSON gives one (not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_class_names(classes: Any, where: str, key: str, width: int | None) -> list[str]:
    """Finding names in the data stage's order (a subset of CLASSES, each once): probabilities are printed under
    these names, so a reordered or renamed list would put every number under another finding."""
    order = ", ".join(CLASSES)
    if not isinstance(classes, list) or not classes:
        raise PipelineError(f"{where}: {key}: {shown(classes)}; expected a list of finding names ({order})")
    for i, name in enumerate(classes):
        if not isinstance(name, str) or name not in CLASSES:
            raise PipelineError(f"{where}: {key}: unknown finding {shown(name)}; expected one of {order}")
        if name in classes[:i]:
            raise PipelineError(f"{where}: {key}: {name} twice; expected each finding once")
        if i and CLASSES.index(name) < CLASSES.index(classes[i - 1]):
            raise PipelineError(f"{where}: {key}: {classes[i - 1]} before {name}; expected the order {order}")
    if width is not None and len(classes) != width:
        raise PipelineError(f"{where}: {key}: {len(classes)} names; expected {width}, the graph's output width")
    return classes

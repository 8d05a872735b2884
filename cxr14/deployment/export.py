"""ONNX export: the trained model as one self-describing file a deployment runs without PyTorch.

`models/model.onnx` takes the decoded 8-bit grey image, resized to the training size, as uint8
(batch, 1, S, S) and returns the 14 raw probabilities (batch, 14): the normalisation and the sigmoid are in the
graph, so a deployment cannot get them wrong. A second output, `cam` (batch, 14, h, w), is Grad-CAM of the last
block for every class at cell resolution, computed in the graph in closed form (`gradcam.last_block_maps`), so
predict draws heatmaps without PyTorch. Everything else predict needs (class names, image size, normalisation,
the calibrator and the val thresholds it applies to, where the model came from, the cam cells' geometry) is
embedded as JSON in the model's metadata under `cxr14`, so the one file is the whole deployment. At export the file
verifies itself: ONNX Runtime's probabilities against PyTorch's (float32, CPU) on the whole test array.

`models/model.int8.onnx` is the same graph with 8-bit weights and activations (ONNX Runtime's static
quantization, QDQ, per-channel weights; activation ranges from val images), what predict runs by default
on a CPU with 8-bit dot products, where it is faster than float32 while its test AUC and decisions stay
close to float32's (the embedded float32 calibrator and thresholds apply to it unchanged). The classifier
and the sigmoid stay in float32, so probabilities keep their resolution. The stage scores it on val (the
gate: where it loses more than `export.int8_max_auc_drop` of mean AUC there, as an undertrained model on a few
images can, its metadata says so and predict's default runs the float32 file instead) and on test (reported).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr14.data.loader import to_model_input
from cxr14.deployment.onnx_file import CAM_NAME, FORMAT, INPUT_NAME, METADATA_KEY, OOD_NAME, OUTPUT_NAME, session
from cxr14.explanation.gradcam import GradCAM, last_block_maps
from cxr14.explanation.heatmaps import normalise, resample
from cxr14.model.factory import gradcam_layer
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.progress import progress


class Deployable(nn.Module):
    """uint8 grey images (B, 1, S, S) -> probabilities (B, C) and Grad-CAM cells (B, C, h, w): the model with the
    pipeline's normalisation in front (`to_model_input`, the same arithmetic evaluate uses), a sigmoid behind, and
    the last block's Grad-CAM beside (`last_block_maps`). With a checkpoint's `ood` fit, also the
    out-of-distribution score (B,) of the same pass's penultimate features (`OodScore`): the backbone runs once."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 ood: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, tuple(mean), tuple(std)
        self.ood = None
        if ood is not None:
            from cxr14.model.ood import OodScore

            self.ood = OodScore(ood)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, cams, features = last_block_maps(self.model, to_model_input(images.float(), self.mean, self.std))
        probabilities = torch.sigmoid(logits.float())
        if self.ood is None:
            return probabilities, cams.float()
        return probabilities, cams.float(), self.ood(features)


def deployable(model: nn.Module, ckpt: dict[str, Any]) -> Deployable:
    """The checkpoint's model as exported: with its out-of-distribution score where the checkpoint has the fit."""
    return Deployable(model, tuple(ckpt["mean"]), tuple(ckpt["std"]), ckpt.get("ood")).eval()


def cam_geometry(model: nn.Module, arch: str, size: int) -> dict[str, Any]:
    """The `cam` output's metadata: which layer it is Grad-CAM of, and where its cells sit on the S x S input
    (`GradCAM.geometry`, read from one forward pass), which predict needs to resample them as the torch engine
    does, without PyTorch."""
    name, layer = gradcam_layer(model, arch)
    with GradCAM(model, layer) as cam, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
        cells = [int(n) for n in cam.activations.shape[-2:]]
        stride, offset = cam.geometry((size, size))
    return {"output": CAM_NAME, "layer": name, "cells": cells, "stride": [float(v) for v in stride],
            "offset": [float(v) for v in offset]}


def metadata(ckpt: dict[str, Any], thresholds: dict[str, float | None], calibrator: dict[str, Any] | None,
             source: str) -> dict[str, Any]:
    """What predict needs besides the graph, in one JSON document (ONNX metadata values are strings)."""
    size = int(ckpt["image_size"])
    return {"format": FORMAT, "classes": list(ckpt["classes"]), "image_size": size,
            "mean": [float(v) for v in ckpt["mean"]], "std": [float(v) for v in ckpt["std"]],
            "input": f"{INPUT_NAME}: uint8 (batch, 1, {size}, {size}), the grey image resized as "
                     "cxr14.data.images.load_gray does",
            "output": f"{OUTPUT_NAME}: float32 (batch, {len(ckpt['classes'])}), raw probabilities; {CAM_NAME}: "
                      f"float32 (batch, {len(ckpt['classes'])}, h, w), Grad-CAM of the last block per class, before "
                      "resampling (metadata cam: its cells' stride and offset on the input)"
                      + (f"; {OOD_NAME}: float32 (batch), out-of-distribution score (above ood_threshold: flagged)"
                         if ckpt.get("ood") else ""),
            "ood_threshold": float(ckpt["ood"]["threshold"]) if ckpt.get("ood") else None,
            "arch": ckpt["arch"], "calibrator": calibrator, "thresholds": thresholds, "source": source,
            "best_epoch": ckpt.get("epoch"), "best_val_mean_auc": ckpt.get("val_mean_auc"),
            "precision": "float32"}  # quantize_int8 rewrites it


def newest_opset() -> int:
    """The newest opset the installed exporter really writes. torch's exporter builds opset 18 and converts it:
    with onnxscript's converter up to its own limit (25 with onnxscript 0.7), past that with onnx's C converter,
    which reaches the newest opset the installed onnx defines (28 with onnx 1.23; a resnet18 exported at each of
    18-28 declares it and ONNX Runtime 1.32 runs it). Above that the conversion fails with a logged warning and
    the file stays at opset 18, so a higher export.opset would be recorded but never written."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def require_opset(opset: int, where: str) -> None:
    """Refuse an export.opset the exporter cannot write, before the stage loads anything (the schema's low bound,
    18, is static; this one follows the installed onnx)."""
    newest = newest_opset()
    if opset > newest:
        import onnx

        raise PipelineError(f"{where} export.opset: {opset}; expected at most {newest}, the newest opset the "
                            f"installed exporter writes (onnx {onnx.__version__})")


def file_opset(path: Path | str) -> int | None:
    """The default-domain opset an ONNX file declares (what ONNX Runtime runs it as), None if it declares none:
    read back from the file, since the exporter may not honour the opset it was asked for."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    versions = [i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")]
    return int(versions[0]) if versions else None


def export_onnx(model: nn.Module, ckpt: dict[str, Any], meta: dict[str, Any], out: Path | str, opset: int) -> None:
    """Write the model (CPU, eval mode) to `out` with a dynamic batch axis and `meta` embedded, with the `cam`
    output's geometry (`cam_geometry`) added to it. Not atomic by itself: the export stage writes to a temporary
    name, checks that file, and only then renames it."""
    import onnx

    size = int(ckpt["image_size"])
    meta = meta | {"cam": cam_geometry(model, ckpt["arch"], size)}
    wrapped = deployable(model, ckpt)
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    outputs = [OUTPUT_NAME, CAM_NAME, *([OOD_NAME] if wrapped.ood is not None else [])]
    try:
        program = torch.onnx.export(wrapped, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=outputs, dynamic_shapes=({0: batch},), opset_version=opset,
                                    verbose=False)
    except Exception as exc:  # the exporter fails in many ways (an unsupported operator, an opset it lacks)
        raise PipelineError(f"export.opset {opset}: the ONNX exporter failed ({' '.join(str(exc).split())[:300]})"
                            ) from None
    proto = program.model_proto
    # The exporter annotates every node with its Python stack trace (absolute paths of this checkout) and FX
    # details: dropped, so that the file says nothing about the machine and the same model gives the same bytes
    for graph_nodes in [proto.graph.node, *(f.node for f in proto.functions)]:
        for node in graph_nodes:
            del node.metadata_props[:]
    del proto.graph.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta, sort_keys=True)})
    onnx.save_model(proto, str(out))


HEAD_OPS = ("Sigmoid", "Cast", "Add", "Gemm", "MatMul")
OOD_OPS = ("Mul", "ReduceSum", "MatMul", "Sub", "Sqrt", "Clip", "Max", "Cast", "Pow")
OOD_FIRST = ("Clip", "Max")  # the clamp at the branch's start: its input is the backbone's pooled features


def head_nodes(proto: Any) -> list[str]:
    """The classifier and the sigmoid behind it (walking back from the probabilities through HEAD_OPS to the Gemm
    or MatMul), and the out-of-distribution score's arithmetic (back from ood_score to its clamp of the features),
    which stay in float32: quantized, the probabilities would come out on a grid of 256 levels clipped to the range
    the calibration images reached, too coarse for thresholds and margins, and so would the score."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    names = []
    for output, ops, last in ((OUTPUT_NAME, HEAD_OPS, ("Gemm", "MatMul")), (OOD_NAME, OOD_OPS, OOD_FIRST)):
        frontier = [o.name for o in proto.graph.output if o.name == output]
        while frontier:
            node = producer.get(frontier.pop())
            if node is None or node.op_type not in ops or node.name in names:
                continue
            names.append(node.name)
            if node.op_type not in last:  # past it is the backbone's pooled features
                frontier += list(node.input)
    return names


def quantize_int8(source: Path | str, out: Path | str, images: np.ndarray, batch_size: int) -> None:
    """Write `source` (an exported float32 model) to `out` with int8 weights and activations, the activation ranges
    taken over `images` (uint8 (N, S, S)), the classifier and sigmoid left in float32 (`head_nodes`); the
    metadata says `precision: int8` and how many images set the ranges. Not atomic by itself, like
    `export_onnx`."""
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(progress(range(0, len(images), batch_size), desc="export: int8 ranges", unit="batch"))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            return None if start is None else {INPUT_NAME: np.array(images[start:start + batch_size, None])}

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice to pre-process: this graph's shapes are static
    try:
        # unsigned activations, signed per-channel weights: ONNX Runtime's fast path on x86-64 with VNNI and on
        # Arm; not reduce_range (7-bit weights, for CPUs without VNNI): it moves probabilities further from float32
        quantize_static(str(source), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=head_nodes(onnx.load(str(source))))
    finally:
        root.setLevel(level)
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[METADATA_KEY]) | {"precision": "int8", "int8_calibration_images": len(images)}
    del proto.metadata_props[:]  # the quantizer's own notes ("onnx.infer") say nothing predict needs
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta, sort_keys=True)})
    onnx.save_model(proto, str(out))


def ort_probabilities(onnx_path: Path | str, images: np.ndarray, batch_size: int, desc: str,
                      where: str | None = None, ood: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's probabilities (N, C) for uint8 images (N, S, S), batch by batch; non-finite ones are an
    error naming `where` (the file's final name). With `ood`, the out-of-distribution scores (N,) too, from the same
    runs (the ood_score output, by name): one pass over the images for both."""
    ort_session = session(onnx_path)
    names = [OUTPUT_NAME, OOD_NAME] if ood else [OUTPUT_NAME]
    runs = [ort_session.run(names, {INPUT_NAME: np.array(images[s:s + batch_size, None])})
            for s in progress(range(0, len(images), batch_size), desc=desc, unit="batch")]
    probs = np.concatenate([run[0] for run in runs])
    if not np.isfinite(probs).all():
        raise PipelineError(f"{where or onnx_path}: ONNX Runtime gave non-finite probabilities; expected finite "
                            "ones (not written)")
    return (probs, np.concatenate([run[1] for run in runs])) if ood else probs


def ood_check(scores: np.ndarray, reference: np.ndarray, threshold: float) -> dict[str, Any]:
    """An engine's scores against the reference's: largest relative difference, flags at the threshold that
    differ, and the share each flags."""
    return {"max_relative_difference": float(f"{relative_difference(scores.astype(np.float64), reference):.3g}"),
            "flags_differ": int(((scores > threshold) != (reference > threshold)).sum()),
            "flagged": round(float((scores > threshold).mean()), 6),
            "flagged_float32": round(float((reference > threshold).mean()), 6)}


def int8_check(labels: np.ndarray, float32: np.ndarray, int8: np.ndarray, calibrator: dict[str, Any] | None,
               thresholds: dict[str, float | None], classes: list[str], max_auc_drop: float) -> dict[str, Any]:
    """How far the int8 model's probabilities are from the float32 model's on one split: the largest difference,
    both mean AUCs and whether the drop is within `max_auc_drop` (None where no AUC is defined: unchecked), the
    class that loses most, and how many decisions at the embedded thresholds change."""
    from cxr14.evaluation.calibration import apply_calibrator
    from cxr14.evaluation.metrics import mean_auc

    (auc32, per32), (auc8, per8) = mean_auc(labels, float32), mean_auc(labels, int8)
    drops = {c: a - b for c, a, b in zip(classes, per32, per8, strict=True) if a is not None and b is not None}
    worst = max(drops, key=drops.__getitem__) if drops else None
    cal32, cal8 = (apply_calibrator(calibrator, p.astype(np.float64), classes) if calibrator else p
                   for p in (float32, int8))
    cut = [k for k, c in enumerate(classes) if thresholds.get(c) is not None]
    t = np.array([thresholds[classes[k]] for k in cut])
    same = (cal32[:, cut] >= t) == (cal8[:, cut] >= t)
    checked = auc32 is not None and auc8 is not None
    return {"images": len(labels),
            "max_abs_difference_to_float32": float(f"{np.abs(int8.astype(np.float64) - float32).max():.3g}"),
            "mean_auc": None if auc8 is None else round(auc8, 6),
            "mean_auc_float32": None if auc32 is None else round(auc32, 6),
            "within_limit": bool(auc32 - auc8 <= max_auc_drop) if checked else None,
            "largest_class_auc_drop": None if worst is None else {"class": worst, "drop": round(drops[worst], 6)},
            "decisions_changed": int(same.size - same.sum()), "decisions": int(same.size)}


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """metrics/export.json: how much val mean AUC the int8 file loses against float32 (the gate's figure; None
    where no AUC is defined), picked from the report (the float32 file's check against PyTorch is a gate the
    stage enforces, not a figure to compare experiments on: it stays in reports/export.json)."""
    val = report["int8"]["val"]
    defined = val["mean_auc"] is not None and val["mean_auc_float32"] is not None
    drop = round(val["mean_auc_float32"] - val["mean_auc"], 6) if defined else None
    return {"int8_drop": drop}


def update_metadata(path: Path | str, **fields: Any) -> None:
    """Add `fields` to the `cxr14` metadata of an ONNX file, in place (the file is still under its temporary
    name when the export stage calls this)."""
    import onnx

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, props | {METADATA_KEY: json.dumps(json.loads(props[METADATA_KEY]) | fields,
                                                                         sort_keys=True)})
    onnx.save_model(proto, str(path))


def verify(model: nn.Module, ckpt: dict[str, Any], onnx_path: Path | str, images: np.ndarray,
           batch_size: int) -> dict[str, Any]:
    """Largest |ONNX Runtime - PyTorch| probability over `images` (uint8 (N, S, S)), and each engine's speed; the
    largest difference of their heatmaps (`cam_max_abs_difference`: every class's `cam` resampled onto the input
    and normalised as predict draws it, against PyTorch's closed-form Grad-CAM), recorded, not a gate; and where the
    checkpoint has the out-of-distribution fit, how far the scores and flags differ (`ood_agreement`)."""
    wrapped = deployable(model, ckpt)
    try:
        ort_session = session(onnx_path)
    except Exception as exc:  # an opset or operator this ONNX Runtime cannot run
        raise PipelineError(f"ONNX Runtime cannot load the exported model ({' '.join(str(exc).split())[:300]}); "
                            "try another export.opset") from None
    size = int(ckpt["image_size"])
    geometry = cam_geometry(model, ckpt["arch"], size)
    names = [OUTPUT_NAME, CAM_NAME, *([OOD_NAME] if wrapped.ood is not None else [])]  # outputs read by name
    worst, cam_worst, seconds, probabilities = 0.0, 0.0, {"torch": 0.0, "onnxruntime": 0.0}, []
    scores: list[tuple[np.ndarray, np.ndarray]] = []  # (ONNX Runtime's, PyTorch's) out-of-distribution scores
    for start in progress(range(0, len(images), batch_size), desc="export: verify", unit="batch"):
        x = np.array(images[start:start + batch_size, None])  # a writable copy of the memory map's rows
        t = time.perf_counter()
        with torch.no_grad():
            expected, expected_cam, *expected_ood = (out.numpy() for out in wrapped(torch.from_numpy(x)))
        seconds["torch"] += time.perf_counter() - t
        t = time.perf_counter()
        got, got_cam, *got_ood = ort_session.run(names, {INPUT_NAME: x})
        seconds["onnxruntime"] += time.perf_counter() - t
        if got.shape != expected.shape or not np.isfinite(got).all():
            raise PipelineError(f"{onnx_path}: ONNX Runtime gave {got.shape} probabilities with non-finite values or "
                                f"the wrong shape; expected finite {expected.shape}")
        worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()))
        cam_worst = max(cam_worst, heatmap_difference(got_cam, expected_cam, geometry, size))
        probabilities.append(got)
        if got_ood:
            scores.append((got_ood[0], expected_ood[0]))
    n = len(images)
    result = {"images": n, "max_abs_difference": worst, "probabilities": np.concatenate(probabilities),
              "cam_max_abs_difference": cam_worst,
              "images_per_s": {k: round(n / v, 1) if v > 0 else None for k, v in seconds.items()}}
    if scores:
        result |= ood_agreement(scores, float(ckpt["ood"]["threshold"]), onnx_path)
    return result


def ood_agreement(scores: list[tuple[np.ndarray, np.ndarray]], threshold: float, onnx_path: Path | str
                  ) -> dict[str, Any]:
    """ONNX Runtime's out-of-distribution scores against PyTorch's, batch by batch: the largest relative
    difference, how many flags at `threshold` differ, and ONNX Runtime's scores."""
    worst, differ = 0.0, 0
    for have, want in scores:
        have, want = have.astype(np.float64), want.astype(np.float64)
        if have.shape != want.shape or not np.isfinite(have).all():
            raise PipelineError(f"{onnx_path}: ONNX Runtime gave {have.shape} {OOD_NAME} values with non-finite "
                                f"values or the wrong shape; expected finite {want.shape}")
        worst = max(worst, relative_difference(have, want))
        differ += int(((have > threshold) != (want > threshold)).sum())
    return {"ood_max_relative_difference": worst, "ood_flags_differ": differ,
            "ood_scores": np.concatenate([have for have, _ in scores])}


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """Largest |got - expected| / max(1, |expected|): absolute below 1, relative above (scores reach the hundreds,
    where float32 engines agree to a few units in the seventh digit)."""
    return float((np.abs(got - expected) / np.maximum(1.0, np.abs(expected))).max()) if len(got) else 0.0


def heatmap_difference(a: np.ndarray, b: np.ndarray, geometry: dict[str, Any], size: int) -> float:
    """Largest difference between two (B, C, h, w) `cam` outputs as predict draws them: resampled onto the
    S x S input with the file's cell geometry and each map normalised to [0, 1]."""
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    drawn = [normalise(resample(m, (size, size), geometry["stride"], geometry["offset"])) for m in (a, b)]
    return float(np.abs(drawn[0] - drawn[1]).max()) if a.size else 0.0


CAM_CHECK_IMAGES = 64  # test images on which the int8 file's heatmaps are compared with float32's


def int8_cam_difference(float32: Path | str, int8: Path | str, images: np.ndarray, batch_size: int) -> dict[str, Any]:
    """How far the int8 file's heatmaps are from the float32 file's (`heatmap_difference`) on the first
    CAM_CHECK_IMAGES of `images`: the largest difference and the mean of each image's largest one."""
    from cxr14.deployment.onnx_file import read_metadata

    sessions = [session(float32), session(int8)]
    meta = read_metadata(float32, sessions[0])
    size, images = int(meta["image_size"]), images[:CAM_CHECK_IMAGES]
    per_image = []
    for start in progress(range(0, len(images), batch_size), desc="export: int8 heatmaps", unit="batch"):
        x = np.array(images[start:start + batch_size, None])
        a, b = (s.run([CAM_NAME], {INPUT_NAME: x})[0] for s in sessions)
        per_image += [heatmap_difference(a[i:i + 1], b[i:i + 1], meta["cam"], size) for i in range(len(x))]
    return {"images": len(per_image), "max_abs_difference_to_float32": float(f"{max(per_image, default=0):.3g}"),
            "mean_max_abs_difference_to_float32": float(f"{np.mean(per_image) if per_image else 0:.3g}")}

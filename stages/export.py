"""Export stage: models/model.onnx, the whole deployment in one file, verified against PyTorch on the test array.

The graph takes uint8 grey images (batch, 1, S, S) and returns raw probabilities; the class names, image size,
normalisation, calibrator and val thresholds travel inside as metadata (`cxr14/deployment/export.py`). The file is
written under a temporary name and checked there: when ONNX Runtime's probabilities differ from PyTorch's by
more than `export.tolerance` anywhere on the test images the stage fails and the file is never put in place.
reports/export.json records the difference, the difference from evaluate's own test predictions (what the
thresholds were chosen on), the largest difference of the `cam` output's heatmaps from PyTorch's Grad-CAM
(normalised, as predict draws them; and the int8 file's from float32's on a few test images), the file size and
the opset read back from the file (an export.opset above the
newest the installed exporter writes is refused before any work, and a file declaring another is not kept). The
two files replace the previous ones only once both are checked, so a refused setting leaves them as they were
(dvc.yaml: persist). Beside it models/model.int8.onnx, the same model
quantized to 8 bits (activation ranges from up to `export.int8_calibration_images` val images; classifier and
sigmoid in float32), scored against the float32 file on val and on test, under `int8`. When its val mean AUC
is more than `export.int8_max_auc_drop` below float32's its metadata says so (predict then runs float32 by
default) and the stage warns.
metrics/export.json holds the headline: the largest ONNX - PyTorch difference and int8's val mean AUC drop.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from cxr14 import paths
from cxr14.data.loader import PreparedImages
from cxr14.data.nih import CLASSES
from cxr14.deployment.export import (
    export_onnx,
    file_opset,
    headline,
    int8_cam_difference,
    int8_check,
    metadata,
    ood_check,
    ort_probabilities,
    quantize_int8,
    require_opset,
    update_metadata,
    verify,
)
from cxr14.evaluation.calibration import check_pairing, load_calibrator, load_thresholds
from cxr14.evaluation.predictions import read_predictions
from cxr14.model.checkpoint import load_checkpoint
from cxr14.params import PARAMS_FILE, Export, load_params
from cxr14.runtime.devices import cpu_count, cpu_kernels
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import atomic_path, rounded, write_json
from cxr14.runtime.signals import run_main


def md5(path: Path) -> str:
    """The checkpoint's digest, recorded in the ONNX file: which training run a deployed model came from."""
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (sections export, train)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    export, train = params.export, params.train
    require_opset(export.opset, str(args.params))  # before any work: the schema cannot know the installed onnx
    torch.set_num_threads(cpu_count())
    cpu_kernels(train.cpu_kernels)  # the reference probabilities: the same kernels evaluate used on the CPU
    model, ckpt = load_checkpoint(paths.MODEL, "cpu", classes=CLASSES)
    thresholds, applies_to = load_thresholds(paths.THRESHOLDS)
    calibrator = load_calibrator(paths.CALIBRATOR)
    check_pairing(paths.THRESHOLDS, applies_to, calibrator, paths.CALIBRATOR)
    images = {split: prepared(split, ckpt["image_size"]) for split in ("test", "val")}
    # evaluate's outputs: the labels, and the probabilities the thresholds were chosen on
    (val_labels, _), (test_labels, evaluated) = (read_predictions(paths.PREDICTIONS / f"{split}.csv")
                                                 for split in ("val", "test"))
    for split, labels in (("val", val_labels), ("test", test_labels)):
        if len(labels) != len(images[split]):
            raise PipelineError(f"{paths.PREDICTIONS / f'{split}.csv'}: {len(labels)} images; the {split} array has "
                                f"{len(images[split])}: run dvc repro")
    meta = metadata(ckpt, thresholds, calibrator, f"{paths.MODEL} md5 {md5(paths.MODEL)}")
    out, out8 = paths.ONNX, paths.ONNX_INT8
    # both files checked under temporary names and put in place together: an unchecked model never sits at `out`,
    # nor a new model.onnx beside an old model.int8.onnx
    with atomic_path(out) as tmp, atomic_path(out8) as tmp8:
        check = export_checked(model, ckpt, meta, tmp, images["test"], export)
        on = int8_checked(tmp, tmp8, images, {"val": val_labels, "test": test_labels}, check, meta, calibrator,
                          thresholds, export)
    # bf16 autocast on a GPU moves evaluate's probabilities (benchmarks/gpu_check.py): recorded
    against_evaluate = float(np.abs(check["probabilities"] - evaluated).max())
    report = export_report(check, against_evaluate, on, export, min(len(images["val"]), export.int8_calibration_images))
    write_json(paths.REPORTS / "export.json", report)
    write_json(paths.METRICS / "export.json", headline(report))
    print_summary(report, check, against_evaluate, export)


def prepared(split: str, size: int) -> np.ndarray:
    """One split's prepared array, memory-mapped, refused unless its images are the size the model was trained at."""
    data = PreparedImages(paths.PREPARED / f"{split}.npy")
    data.require_size(size, paths.MODEL)
    return np.load(data.path, mmap_mode="r")


def export_checked(model: torch.nn.Module, ckpt: dict, meta: dict, tmp: Path, images: np.ndarray,
                   export: Export) -> dict:
    """Export to `tmp` and compare ONNX Runtime with PyTorch on the test array; past export.tolerance the stage fails
    with the file still under its temporary name."""
    export_onnx(model, ckpt, meta, tmp, export.opset)
    written = file_opset(tmp)  # the exporter keeps its own opset when it cannot convert, and says so only in a log
    if written != export.opset:
        raise PipelineError(f"{paths.ONNX}: the exporter wrote opset {written}; expected export.opset {export.opset} "
                            "(not written; try another export.opset)")
    check = verify(model, ckpt, tmp, images, export.batch_size) | {"opset": written}
    if not check["max_abs_difference"] <= export.tolerance:
        raise PipelineError(f"{paths.ONNX}: ONNX Runtime's probabilities differ from PyTorch's by up to "
                            f"{check['max_abs_difference']:.3g} on {paths.PREPARED / 'test.npy'}; expected at most "
                            f"export.tolerance {export.tolerance:g} (not written; try another export.opset)")
    if not check.get("ood_max_relative_difference", 0.0) <= export.tolerance:
        raise PipelineError(f"{paths.ONNX}: ONNX Runtime's out-of-distribution scores differ from PyTorch's by up to "
                            f"{check['ood_max_relative_difference']:.3g} (relative) on {paths.PREPARED / 'test.npy'}; "
                            f"expected at most export.tolerance {export.tolerance:g} (not written)")
    return check


def int8_checked(tmp: Path, tmp8: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                 check: dict, meta: dict, calibrator: dict | None, thresholds: dict, export: Export) -> dict:
    """Quantize `tmp` to `tmp8` and score the int8 file against float32 on val (the gate: test is reported, never
    used to choose) and test; the gate's verdict goes into the int8 file's metadata."""
    quantize_int8(tmp, tmp8, images["val"][:export.int8_calibration_images], export.batch_size)
    float32 = {"val": ort_probabilities(tmp, images["val"], export.batch_size, "export: val, float32", str(paths.ONNX)),
               "test": check["probabilities"]}
    on, scored = {}, check.get("ood_scores") is not None
    for split in ("val", "test"):
        # test: the probabilities and, where the model has one, the score, in one pass
        out = ort_probabilities(tmp8, images[split], export.batch_size, f"export: {split}, int8", str(paths.ONNX_INT8),
                                ood=scored and split == "test")
        int8, ood = out if isinstance(out, tuple) else (out, None)
        on[split] = int8_check(labels[split], float32[split], int8, calibrator, thresholds, list(CLASSES),
                               export.int8_max_auc_drop)
        if ood is not None:  # the int8 file's score against float32's, at the same threshold
            on[split]["ood"] = ood_check(ood, check["ood_scores"], meta["ood_threshold"])
    update_metadata(tmp8, int8_within_limit=on["val"]["within_limit"], int8_val_mean_auc=on["val"]["mean_auc"],
                    float32_val_mean_auc=on["val"]["mean_auc_float32"])
    on["cam"] = int8_cam_difference(tmp, tmp8, images["test"], export.batch_size)  # heatmaps, reported
    return on


def export_report(check: dict, against_evaluate: float, on: dict, export: Export, calibration_images: int) -> dict:
    """reports/export.json: both files' checks, their sizes, and the versions that made them."""
    import onnxruntime

    ood = ({"ood_max_relative_difference": float(f"{check['ood_max_relative_difference']:.3g}"),
            "ood_flags_differ": check["ood_flags_differ"]} if "ood_scores" in check else {})
    return {"images": check["images"], "max_abs_difference": float(f"{check['max_abs_difference']:.3g}"), **ood,
            "tolerance": export.tolerance, "max_abs_difference_to_evaluate": float(f"{against_evaluate:.3g}"),
            "cam_max_abs_difference": float(f"{check['cam_max_abs_difference']:.3g}"),
            "file_bytes": paths.ONNX.stat().st_size, "opset": check["opset"], "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__.split("+")[0],
            "int8": {"file_bytes": paths.ONNX_INT8.stat().st_size, "calibration_images": calibration_images,
                     "max_auc_drop": export.int8_max_auc_drop, "within_limit": on["val"]["within_limit"], **on}}


def print_summary(report: dict, check: dict, against_evaluate: float, export: Export) -> None:
    out, out8, q, speed = paths.ONNX, paths.ONNX_INT8, report["int8"], check["images_per_s"]
    print(f"export: {out} ({rounded(report['file_bytes'] / 2**20, 1)} MiB, opset {report['opset']}); ONNX Runtime vs "
          f"PyTorch on {check['images']} test images: max |difference| {check['max_abs_difference']:.2g} (tolerance "
          f"{export.tolerance:g}), vs evaluate's predictions {against_evaluate:.2g}; {speed['onnxruntime']} vs "
          f"{speed['torch']} images/s here")
    if "ood_max_relative_difference" in report:
        print(f"export: out-of-distribution score, ONNX Runtime vs PyTorch: max relative difference "
              f"{report['ood_max_relative_difference']:.2g}, {report['ood_flags_differ']} flag(s) differ; int8 vs "
              f"float32: {report['int8']['test']['ood']['flags_differ']} of {check['images']} test flags differ")
    t8 = q["test"]
    print(f"export: {out8} ({rounded(q['file_bytes'] / 2**20, 1)} MiB): mean AUC against float32 on val "
          f"{q['val']['mean_auc']} vs {q['val']['mean_auc_float32']}, on test {t8['mean_auc']} vs "
          f"{t8['mean_auc_float32']}; {t8['decisions_changed']} of {t8['decisions']} test decisions changed, max "
          f"|difference| {t8['max_abs_difference_to_float32']:.2g}")
    print(f"export: heatmaps (output cam), normalised as predict draws them: max |difference| from PyTorch's Grad-CAM "
          f"{check['cam_max_abs_difference']:.2g} on {check['images']} test images; int8 from float32 "
          f"{q['cam']['max_abs_difference_to_float32']:.2g} on {q['cam']['images']}")
    if q["within_limit"] is False:
        print(f"export: warning: {out8} loses more than export.int8_max_auc_drop {export.int8_max_auc_drop:g} of val "
              f"mean AUC; predict runs {out} by default", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)

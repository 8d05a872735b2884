"""Export stage: models/model.onnx, the whole deployment in one file, verified against PyTorch on the test array.

The graph takes uint8 grey images (batch, 1, S, S) and returns raw probabilities; the class names, image size,
normalisation, calibrator and val thresholds travel inside as metadata (`cxr14/deployment/export.py`). The file is
written under a temporary name and checked there: when ONNX Runtime's probabilities differ from PyTorch's by
more than `export.tolerance` anywhere on the test images the stage fails and the file is never put in place.
metrics/export.json records the difference, the difference from evaluate's own test predictions (what the
thresholds were chosen on), the file size and the opset. Beside it models/model.int8.onnx, the same model
quantized to 8 bits (activation ranges from up to `export.int8_calibration_images` val images; classifier and
sigmoid in float32), scored against the float32 file on val and on test, under `int8`. When its val mean AUC
is more than `export.int8_max_auc_drop` below float32's its metadata says so (predict then runs float32 by
default) and the stage warns. The two files are put in place together, once both are checked.
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
    int8_check,
    metadata,
    ort_probabilities,
    quantize_int8,
    update_metadata,
    verify,
)
from cxr14.evaluation.calibration import check_pairing, load_calibrator, load_thresholds
from cxr14.evaluation.predictions import read_predictions
from cxr14.model.checkpoint import load_checkpoint
from cxr14.params import PARAMS_FILE, Export, Train, load_section
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
    e, t = load_section(args.params, Export), load_section(args.params, Train)
    torch.set_num_threads(cpu_count())
    cpu_kernels(t.cpu_kernels)  # the reference probabilities: the same kernels evaluate used on the CPU
    model, ckpt = load_checkpoint(paths.MODEL, "cpu", classes=CLASSES)
    thresholds, applies_to = load_thresholds(paths.THRESHOLDS)
    calibrator = load_calibrator(paths.CALIBRATOR)
    check_pairing(paths.THRESHOLDS, applies_to, calibrator, paths.CALIBRATOR)
    test = PreparedImages(paths.PREPARED / "test.npy")
    test.require_size(ckpt["image_size"], paths.MODEL)
    images = np.load(test.path, mmap_mode="r")
    val = PreparedImages(paths.PREPARED / "val.npy")
    val.require_size(ckpt["image_size"], paths.MODEL)
    val_images = np.load(val.path, mmap_mode="r")
    # evaluate's outputs: the labels, and the probabilities the thresholds were chosen on
    (val_labels, _), (test_labels, evaluated) = (read_predictions(paths.PREDICTIONS / f"{split}.csv")
                                                 for split in ("val", "test"))
    for split, labels, array in (("val", val_labels, val_images), ("test", test_labels, images)):
        if len(labels) != len(array):
            raise PipelineError(f"{paths.PREDICTIONS / f'{split}.csv'}: {len(labels)} images; the {split} array has "
                                f"{len(array)}: run dvc repro")
    meta = metadata(ckpt, thresholds, calibrator, f"{paths.MODEL} md5 {md5(paths.MODEL)}")
    out, out8 = paths.ONNX, paths.ONNX_INT8
    classes = list(CLASSES)
    # both files checked under temporary names and put in place together: an unchecked model never sits at `out`,
    # nor a new model.onnx beside an old model.int8.onnx
    with atomic_path(out) as tmp, atomic_path(out8) as tmp8:
        export_onnx(model, ckpt, meta, tmp, e.opset)
        check = verify(model, ckpt, tmp, images, e.batch_size)
        if not check["max_abs_difference"] <= e.tolerance:
            raise PipelineError(f"{out}: ONNX Runtime's probabilities differ from PyTorch's by up to "
                                f"{check['max_abs_difference']:.3g} on {paths.PREPARED / 'test.npy'}; expected at most "
                                f"export.tolerance {e.tolerance:g} (not written; try another export.opset)")
        ranges_from = val_images[:e.int8_calibration_images]
        quantize_int8(tmp, tmp8, ranges_from, e.batch_size)
        val32 = ort_probabilities(tmp, val_images, e.batch_size, "export: val, float32", str(out))
        on = {}
        for split, labels, array, float32 in (("val", val_labels, val_images, val32),
                                              ("test", test_labels, images, check["probabilities"])):
            int8 = ort_probabilities(tmp8, array, e.batch_size, f"export: {split}, int8", str(out8))
            on[split] = int8_check(labels, float32, int8, calibrator, thresholds, classes, e.int8_max_auc_drop)
        within = on["val"]["within_limit"]  # the gate is val's: test is reported, never used to choose
        update_metadata(tmp8, int8_within_limit=within, int8_val_mean_auc=on["val"]["mean_auc"],
                        float32_val_mean_auc=on["val"]["mean_auc_float32"])
    # bf16 autocast on a GPU moves evaluate's probabilities by up to ~0.01 (benchmarks/gpu_check.py): recorded
    against_evaluate = float(np.abs(check["probabilities"] - evaluated).max())
    import onnxruntime

    metrics = {"images": check["images"], "max_abs_difference": float(f"{check['max_abs_difference']:.3g}"),
               "tolerance": e.tolerance, "max_abs_difference_to_evaluate": float(f"{against_evaluate:.3g}"),
               "file_bytes": out.stat().st_size, "opset": e.opset, "onnxruntime": onnxruntime.__version__,
               "torch": torch.__version__.split("+")[0],
               "int8": {"file_bytes": out8.stat().st_size, "calibration_images": len(ranges_from),
                        "max_auc_drop": e.int8_max_auc_drop, "within_limit": within, **on}}
    write_json(paths.METRICS / "export.json", metrics)
    speed = check["images_per_s"]
    print(f"export: {out} ({rounded(out.stat().st_size / 2**20, 1)} MiB, opset {e.opset}); ONNX Runtime vs PyTorch "
          f"on {check['images']} test images: max |difference| {check['max_abs_difference']:.2g} (tolerance "
          f"{e.tolerance:g}), vs evaluate's predictions {against_evaluate:.2g}; {speed['onnxruntime']} vs "
          f"{speed['torch']} images/s here")
    t8 = on["test"]
    print(f"export: {out8} ({rounded(out8.stat().st_size / 2**20, 1)} MiB): mean AUC against float32 on val "
          f"{on['val']['mean_auc']} vs {on['val']['mean_auc_float32']}, on test {t8['mean_auc']} vs "
          f"{t8['mean_auc_float32']}; {t8['decisions_changed']} of {t8['decisions']} test decisions changed, max "
          f"|difference| {t8['max_abs_difference_to_float32']:.2g}")
    if within is False:
        print(f"export: warning: {out8} loses more than export.int8_max_auc_drop {e.int8_max_auc_drop:g} of val "
              f"mean AUC; predict runs {out} by default", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)

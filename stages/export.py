"""Export stage: models/model.onnx, the whole deployment in one file, verified against PyTorch on the test array.

The graph takes uint8 grey images (batch, 1, S, S) and returns raw probabilities; the class names, image size,
normalisation, calibrator and val thresholds travel inside as metadata (`cxr14/export.py`). The file is
written under a temporary name and checked there: when ONNX Runtime's probabilities differ from PyTorch's by
more than `export.tolerance` anywhere on the test images the stage fails and the file is never put in place.
metrics/export.json records the difference, the difference from evaluate's own test predictions (what the
thresholds were chosen on), the file size and the opset.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from cxr14 import paths
from cxr14.calibration import check_pairing, load_calibrator, load_thresholds
from cxr14.common import PipelineError, atomic_path, cpu_count, cpu_kernels, rounded, run_main, write_json
from cxr14.data import PreparedImages
from cxr14.export import export_onnx, int8_check, metadata, ort_probabilities, quantize_int8, update_metadata, verify
from cxr14.model import load_checkpoint
from cxr14.nih import CLASSES
from cxr14.params import PARAMS_FILE, Export, Train, load_section
from cxr14.predictions import read_predictions


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
    meta = metadata(ckpt, thresholds, calibrator, f"{paths.MODEL} md5 {md5(paths.MODEL)}")
    out = paths.ONNX
    with atomic_path(out) as tmp:  # checked under its temporary name: an unchecked model never sits at `out`
        export_onnx(model, ckpt, meta, tmp, e.opset)
        check = verify(model, ckpt, tmp, images, e.batch_size)
        if not check["max_abs_difference"] <= e.tolerance:
            raise PipelineError(f"{out}: ONNX Runtime's probabilities differ from PyTorch's by up to "
                                f"{check['max_abs_difference']:.3g} on {paths.PREPARED / 'test.npy'}; expected at most "
                                f"export.tolerance {e.tolerance:g} (not written; try another export.opset)")
    # evaluate's probabilities, which the thresholds were chosen on: the same to rounding when evaluate ran on the
    # CPU; bf16 autocast on a GPU moves them by up to ~0.01 (benchmarks/gpu_check.py), which this records
    _, evaluated = read_predictions(paths.PREDICTIONS / "test.csv")
    if evaluated.shape != check["probabilities"].shape:
        raise PipelineError(f"{paths.PREDICTIONS / 'test.csv'}: {evaluated.shape[0]} images; the test array has "
                            f"{check['images']}: run dvc repro")
    against_evaluate = float(np.abs(check["probabilities"] - evaluated).max())
    labels = read_predictions(paths.PREDICTIONS / "test.csv")[0]
    val = PreparedImages(paths.PREPARED / "val.npy")
    val.require_size(ckpt["image_size"], paths.MODEL)
    ranges_from = np.load(val.path, mmap_mode="r")[:e.int8_calibration_images]
    with atomic_path(paths.ONNX_INT8) as tmp:
        quantize_int8(out, tmp, ranges_from, e.batch_size)
        int8 = int8_check(labels, check["probabilities"], ort_probabilities(tmp, images, e.batch_size, "export: int8"),
                          calibrator, thresholds, list(CLASSES), e.int8_max_auc_drop)
        update_metadata(tmp, int8_within_limit=int8["within_limit"], int8_test_mean_auc=int8["test_mean_auc"],
                        float32_test_mean_auc=int8["test_mean_auc_float32"])
    import onnxruntime

    metrics = {"images": check["images"], "max_abs_difference": float(f"{check['max_abs_difference']:.3g}"),
               "tolerance": e.tolerance, "max_abs_difference_to_evaluate": float(f"{against_evaluate:.3g}"),
               "file_bytes": out.stat().st_size, "opset": e.opset, "onnxruntime": onnxruntime.__version__,
               "torch": torch.__version__.split("+")[0],
               "int8": {"file_bytes": paths.ONNX_INT8.stat().st_size, "calibration_images": len(ranges_from), **int8}}
    write_json(paths.METRICS / "export.json", metrics)
    speed = check["images_per_s"]
    print(f"export: {out} ({rounded(out.stat().st_size / 2**20, 1)} MiB, opset {e.opset}); ONNX Runtime vs PyTorch "
          f"on {check['images']} test images: max |difference| {check['max_abs_difference']:.2g} (tolerance "
          f"{e.tolerance:g}), vs evaluate's predictions {against_evaluate:.2g}; {speed['onnxruntime']} vs "
          f"{speed['torch']} images/s here")
    print(f"export: {paths.ONNX_INT8} ({rounded(paths.ONNX_INT8.stat().st_size / 2**20, 1)} MiB): test mean AUC "
          f"{int8['test_mean_auc']} against {int8['test_mean_auc_float32']} in float32, {int8['decisions_changed']} of "
          f"{int8['decisions']} decisions changed, max |difference| {int8['max_abs_difference_to_float32']:.2g}")
    if not int8["within_limit"]:
        print(f"export: warning: {paths.ONNX_INT8} loses more than export.int8_max_auc_drop {e.int8_max_auc_drop:g} "
              f"of test mean AUC; predict runs {out} by default", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)

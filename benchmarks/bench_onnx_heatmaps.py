"""Benchmark: heatmaps from the exported model (the graph's `cam` output), in one run on this machine.

Three figures:
  - agreement: for each arch (resnet10/18/50, densenet121; ResNets also at output stride 16 and 8), a random
    model exported at `--size` px; its `cam` output resampled and normalised as predict's onnx engine does (numpy)
    against PyTorch's Grad-CAM (hooks and autograd) on the same images, every class: the largest difference
    (acceptance: <= 1e-4), and how many maps have a shape (not all-zero after the ReLU);
  - cost: predict's ONNX Runtime call over `--images` images in batches of 64, float32 and int8, for the file with
    the `cam` output asking for the probabilities only (what predict does without --gradcam), asking for both
    (with --gradcam), and the same file with the `cam` output removed (the file as it was before); median of
    `--runs` interleaved runs each, ratios against the file without it;
  - int8: with the project's models/model.pt and data/prepared (the demo after `dvc repro`), the int8 file's
    heatmaps against the float32 file's on the first 64 test images: over all classes, for each image's most
    probable class, and for the maps predict would draw at p >= 0.5.

    python benchmarks/bench_onnx_heatmaps.py [--size 64] [--runs 5] [--images 512] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from cxr14 import paths
from cxr14.data.loader import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from cxr14.data.nih import CLASSES
from cxr14.deployment.export import export_onnx, metadata, quantize_int8
from cxr14.deployment.onnx_file import CAM_NAME, INPUT_NAME, OUTPUT_NAME, read_metadata, session
from cxr14.explanation.gradcam import GradCAM
from cxr14.explanation.heatmaps import normalise, resample
from cxr14.model.checkpoint import load_checkpoint
from cxr14.model.factory import build_model, gradcam_layer

CASES = [("resnet10", 32), ("resnet18", 32), ("resnet50", 32), ("densenet121", 32), ("resnet18", 16),
         ("resnet50", 16), ("resnet50", 8)]


def ckpt_of(arch: str, size: int, output_stride: int = 32) -> dict:
    return {"arch": arch, "classes": list(CLASSES), "image_size": size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "output_stride": output_stride}


def drawn(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, heatmaps (N, C, S, S)) of an exported file, as predict's onnx engine makes them."""
    meta = read_metadata(path)
    size, cam = int(meta["image_size"]), meta["cam"]
    probs, cells = session(path).run([OUTPUT_NAME, CAM_NAME], {INPUT_NAME: images[:, None]})
    return probs, normalise(resample(cells, (size, size), cam["stride"], cam["offset"]))


def agreement(size: int, folder: Path) -> list[dict]:
    rows = []
    images = np.random.default_rng(0).integers(0, 256, (4, size, size), dtype=np.uint8)
    for arch, output_stride in CASES:
        torch.manual_seed(0)
        model = build_model(arch, "none", len(CLASSES), output_stride).eval()
        ckpt = ckpt_of(arch, size, output_stride)
        path = folder / f"{arch}_{output_stride}.onnx"
        export_onnx(model, ckpt, metadata(ckpt, dict.fromkeys(CLASSES, 0.5), None, "bench"), path, 20)
        probs, got = drawn(path, images)
        x = to_model_input(torch.from_numpy(images)[:, None].float())
        with GradCAM(model, gradcam_layer(model, arch)[1]) as cam:
            p, expected = cam(x, list(range(len(CLASSES))))
        shaped = int((got.max(axis=(2, 3)) > got.min(axis=(2, 3))).sum())
        rows.append({"arch": arch, "output_stride": output_stride, "size": size,
                     "cells": read_metadata(path)["cam"]["cells"],
                     "max_abs_difference": float(np.abs(got - expected.numpy()).max()),
                     "probability_difference": float(np.abs(probs - p.numpy()).max()),
                     "maps_with_shape": f"{shaped}/{got.shape[0] * got.shape[1]}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def without_cam(path: Path, out: Path) -> Path:
    """The file with its cam output removed (ONNX Runtime drops the nodes only it needed when it loads)."""
    proto = onnx.load(str(path))
    keep = [o for o in proto.graph.output if o.name != CAM_NAME]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    onnx.save_model(proto, str(out))
    return out


def cost(folder: Path, n_images: int, runs: int) -> dict:
    """resnet10 at 96 px (the demo's model): images/s of each variant, median of `runs` interleaved runs."""
    torch.manual_seed(0)
    model = build_model("resnet10", "none").eval()
    ckpt = ckpt_of("resnet10", 96)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 96, 96), dtype=np.uint8)
    new = folder / "cost.onnx"
    export_onnx(model, ckpt, metadata(ckpt, dict.fromkeys(CLASSES, 0.5), None, "bench"), new, 20)
    quantize_int8(new, folder / "cost.int8.onnx", images[:128], 64)
    variants = {}
    for precision, path in (("float32", new), ("int8", folder / "cost.int8.onnx")):
        old = without_cam(path, folder / f"old.{precision}.onnx")
        variants[precision] = {"without_cam_output": (session(old, spin=False), [OUTPUT_NAME]),
                               "probabilities_only": (session(path, spin=False), [OUTPUT_NAME]),
                               "probabilities_and_cam": (session(path, spin=False), [OUTPUT_NAME, CAM_NAME])}
    times: dict[str, dict[str, list[float]]] = {p: {k: [] for k in v} for p, v in variants.items()}
    for _ in range(runs):
        for precision, kinds in variants.items():
            for kind, (sess, outputs) in kinds.items():
                sess.run(outputs, {INPUT_NAME: images[:64, None]})  # warm
                start = time.perf_counter()
                for s in range(0, n_images, 64):
                    sess.run(outputs, {INPUT_NAME: images[s:s + 64, None]})
                times[precision][kind].append(time.perf_counter() - start)
    result = {}
    for precision, kinds in times.items():
        rate = {k: n_images / statistics.median(v) for k, v in kinds.items()}
        base = rate["without_cam_output"]
        result[precision] = {k: {"images_per_s": round(r, 1), "ratio": round(r / base, 3)} for k, r in rate.items()}
    print(json.dumps(result), flush=True)
    return result


def int8_heatmaps(folder: Path) -> dict | None:
    if not (paths.MODEL.is_file() and (paths.PREPARED / "test.npy").is_file()):
        print("int8: no models/model.pt or data/prepared here (run dvc repro): skipped")
        return None
    model, ckpt = load_checkpoint(paths.MODEL)
    test = np.array(np.load(paths.PREPARED / "test.npy", mmap_mode="r")[:64])
    val = np.load(paths.PREPARED / "val.npy", mmap_mode="r")[:256]
    path = folder / "demo.onnx"
    export_onnx(model, ckpt, metadata(ckpt, {c: 0.5 for c in ckpt["classes"]}, None, "bench"), path, 20)
    quantize_int8(path, folder / "demo.int8.onnx", val, 64)
    probs, a = drawn(path, test)
    _, b = drawn(folder / "demo.int8.onnx", test)
    d = np.abs(a - b).max(axis=(2, 3))  # (N, C): each map's largest difference
    top = d[np.arange(len(d)), probs.argmax(1)]
    pos = d[probs >= 0.5]
    result = {"arch": ckpt["arch"], "images": len(test),
              "all_maps": {"max": float(d.max()), "mean": float(d.mean()), "p95": float(np.quantile(d, 0.95)),
                           "over_0.3": int((d > 0.3).sum()), "maps": int(d.size)},
              "top_class": {"max": float(top.max()), "mean": float(top.mean())},
              "p_at_least_0.5": {"maps": int(pos.size), "max": float(pos.max(initial=0)),
                                 "mean": float(pos.mean()) if pos.size else None}}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input size of the agreement models (default 64)")
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs of the cost figure (default 5)")
    parser.add_argument("--images", type=int, default=512, help="images of the cost figure (default 512)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["agreement", "cost", "int8"], help="figures to skip")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = {"agreement": None if "agreement" in args.skip else agreement(args.size, folder),
               "cost": None if "cost" in args.skip else cost(folder, args.images, args.runs),
               "int8": None if "int8" in args.skip else int8_heatmaps(folder)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark: predict with the exported ONNX model against the PyTorch checkpoint, in one run on this machine.

Two figures, both from fresh processes as a user runs them (`python -m stages.predict ...`):
  - one 1024x1024 PNG (a real NIH image), no Grad-CAM: the ONNX engine's wall time (its CPU default, the int8
    model) against the torch engine's (interpreter start, imports, model load, decode, forward, table), the
    median of `--runs` runs each, interleaved so that both see the same machine; targets: ONNX <= 1.0 s, or
    <= 0.35x torch on a slower machine;
  - the whole NIH sample folder (308 images) with `--csv`, int8 and float32: predict's throughput against what
    decoding alone allows (predict's own decoder, `cxr14.deployment.predict.decoded`, with the same
    threads, timed inside its process); target >= 0.8x. Throughput is the rate past start-up: (N - 1) images
    over the folder run's time less the one-image run's (what a folder of thousands sees); the whole run's
    ratio, start-up included (interpreter, imports and model load count against predict only), is printed beside it;
  - thousands of images, start-up included: the folder `--repeat` times over (symlinks in a scratch folder, so
    3,080 files by default), the default int8 model's whole run against decoding alone over the same files
    (median of 2 each).
The model is resnet18 at 96 px (the demo's until it moved to resnet10, which has half the compute, so the
harder case) with random weights unless `--arch/--size` say otherwise: the time
does not depend on the weights.

    python benchmarks/bench_deploy.py [--nih ../shared/nih] [--runs 5] [--arch resnet18] [--size 96] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr14.data.loader import IMAGENET_MEAN, IMAGENET_STD
from cxr14.data.nih import CLASSES
from cxr14.deployment.export import export_onnx, metadata, quantize_int8
from cxr14.evaluation.calibration import fit_calibrator
from cxr14.model.factory import build_model
from cxr14.runtime.devices import cpu_count

ROOT = Path(__file__).resolve().parents[1]
TARGET_ONE_S, TARGET_ONE_RATIO, TARGET_THROUGHPUT = 1.0, 0.35, 0.8
DECODE_ONLY = """
import sys, time
from cxr14.deployment.predict import decoded, expand_inputs
files, _ = expand_inputs([sys.argv[1]])
start = time.perf_counter()
n = sum(1 for _, image, *_ in decoded(files, int(sys.argv[2]), int(sys.argv[3])) if not isinstance(image, str))
print(n, time.perf_counter() - start)
"""


def write_model(folder: Path, arch: str, size: int) -> dict[str, Path]:
    """Checkpoint, Platt calibrator and thresholds (fitted on random data) and their ONNX export."""
    torch.manual_seed(0)
    model = build_model(arch, "none").eval()
    ckpt = {"state_dict": model.state_dict(), "arch": arch, "classes": list(CLASSES), "image_size": size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    files = {"pt": folder / "model.pt", "onnx": folder / "model.onnx", "int8": folder / "model.int8.onnx",
             "calibrator": folder / "calibrator.json", "thresholds": folder / "thresholds.json"}
    torch.save(ckpt, files["pt"])
    rng = np.random.default_rng(0)
    probs = rng.random((200, len(CLASSES)))
    calibrator = fit_calibrator("platt", (rng.random((200, len(CLASSES))) < probs).astype(int), probs)
    files["calibrator"].write_text(json.dumps(calibrator))
    thresholds = dict.fromkeys(CLASSES, 0.5)
    files["thresholds"].write_text(json.dumps({"metadata": {"calibration": "platt"}, "thresholds": thresholds}))
    export_onnx(model, ckpt, metadata(ckpt, thresholds, calibrator, "benchmark"), files["onnx"], 20)
    ranges = rng.integers(0, 256, (64, size, size), dtype=np.uint8)  # random weights: any images set the ranges
    quantize_int8(files["onnx"], files["int8"], ranges, 32)
    return files


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CI": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[2:5])}... failed: {done.stderr.strip()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=ROOT.parent / "shared" / "nih", help="NIH sample folder")
    parser.add_argument("--image", default="00000003_000.png", help="a 1024x1024 PNG in NIH/images")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="copies of the folder in the thousands-of-images run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    folder = args.nih / "images"
    image = folder / args.image
    if not image.is_file():
        raise SystemExit(f"error: {image}: not found; pass --nih pointing at the NIH sample")
    threads = cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_model(Path(tmp), args.arch, args.size)
        py = [sys.executable, "-m", "stages.predict"]
        onnx_cmd = {p: [*py, str(image), "--model", str(files[p])] for p in ("int8", "onnx")}
        torch_cmd = [*py, str(image), "--engine", "torch", "--model", str(files["pt"]), "--thresholds",
                     str(files["thresholds"]), "--calibrator", str(files["calibrator"])]
        floor_cmd = [sys.executable, "-c", "import numpy, PIL.Image, onnxruntime"]
        one: dict[str, list[float]] = {"int8": [], "onnx": [], "torch": [], "imports": []}
        for _ in range(args.runs):
            for p in ("int8", "onnx"):
                one[p].append(timed(onnx_cmd[p]))
            one["torch"].append(timed(torch_cmd))
            one["imports"].append(timed(floor_cmd))
        many_cmd = {p: [*py, str(folder), "--model", str(files[p]), "--csv", str(Path(tmp) / "out.csv")]
                    for p in ("int8", "onnx")}
        decode_cmd = [sys.executable, "-c", DECODE_ONLY, str(folder), str(args.size), str(threads)]
        walls: dict[str, list[float]] = {"int8": [], "onnx": []}
        decodes, count = [], 0
        for _ in range(max(args.runs // 2, 3)):
            for p in walls:
                walls[p].append(timed(many_cmd[p]))
            out = subprocess.run(decode_cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
            count, seconds = int(out[0]), float(out[1])
            decodes.append(seconds)
        many = Path(tmp) / "thousands"
        for k in range(args.repeat):
            (many / f"copy{k}").mkdir(parents=True)
            for p in sorted(folder.iterdir()):
                if p.is_file():
                    (many / f"copy{k}" / p.name).symlink_to(p.resolve())
        big_walls, big_decodes = [], []
        big_cmd = [*py, str(many), "--model", str(files["int8"]), "--csv", str(Path(tmp) / "out.csv")]
        for _ in range(2):
            big_walls.append(timed(big_cmd))
            out = subprocess.run([*decode_cmd[:3], str(many), *decode_cmd[4:]], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.split()
            big_count = int(out[0])
            big_decodes.append(float(out[1]))
        big_wall, big_decode = statistics.median(big_walls), statistics.median(big_decodes)
    med = {k: statistics.median(v) for k, v in one.items()}
    decode = statistics.median(decodes)
    figures = {
        "machine": {"cpus": os.cpu_count(), "threads": threads}, "model": f"{args.arch} at {args.size} px",
        "one_image": {"onnx_int8_s": round(med["int8"], 3), "onnx_fp32_s": round(med["onnx"], 3),
                      "torch_s": round(med["torch"], 3), "ratio": round(med["int8"] / med["torch"], 3),
                      "python_numpy_pillow_onnxruntime_imports_s": round(med["imports"], 3), "runs": args.runs,
                      "target": f"<= {TARGET_ONE_S} s, or <= {TARGET_ONE_RATIO}x torch",
                      "met": med["int8"] <= TARGET_ONE_S or med["int8"] / med["torch"] <= TARGET_ONE_RATIO},
        "folder": {"images": count, "decode_only_s": round(decode, 2),
                   "decode_only_images_per_s": round(count / decode, 1), "target": f">= {TARGET_THROUGHPUT}x"},
    }
    print(f"predict, {figures['model']} (random weights), {threads} decoding threads on {os.cpu_count()} CPUs:")
    print(f"  one 1024x1024 PNG, fresh process, median of {args.runs}: ONNX int8 {med['int8']:.2f} s (float32 "
          f"{med['onnx']:.2f} s), torch {med['torch']:.2f} s (ratio {med['int8'] / med['torch']:.2f}; Python + numpy "
          f"+ Pillow + onnxruntime imports alone {med['imports']:.2f} s); target <= {TARGET_ONE_S} s or <= "
          f"{TARGET_ONE_RATIO}x: {'met' if figures['one_image']['met'] else 'NOT met'}")
    print(f"  {count} images of {folder} to CSV against decoding alone ({decode:.2f} s, {count / decode:.1f} "
          f"images/s), target >= {TARGET_THROUGHPUT}x:")
    for p, name in (("int8", "int8 (the CPU default)"), ("onnx", "float32")):
        wall = statistics.median(walls[p])
        rate = (count - 1) / (wall - med[p])
        f = {"predict_s": round(wall, 2), "whole_run_ratio": round(decode / wall, 3),
             "throughput_images_per_s": round(rate, 1), "ratio": round(rate / (count / decode), 3)}
        f["met"] = f["ratio"] >= TARGET_THROUGHPUT
        figures["folder"][p if p == "int8" else "fp32"] = f
        print(f"    {name}: {wall:.2f} s in all ({decode / wall:.2f}x, start-up included); past start-up "
              f"{rate:.1f} images/s: {f['ratio']:.2f}x ({'met' if f['met'] else 'NOT met'})")
    big = {"images": big_count, "predict_s": round(big_wall, 2), "decode_only_s": round(big_decode, 2),
           "ratio": round(big_decode / big_wall, 3)}
    big["met"] = big["ratio"] >= TARGET_THROUGHPUT
    figures["thousands_int8"] = big
    print(f"  {big_count} images (the folder {args.repeat} times over), int8, whole run with start-up: "
          f"{big_wall:.2f} s against decoding alone {big_decode:.2f} s: {big['ratio']:.2f}x "
          f"({'met' if big['met'] else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

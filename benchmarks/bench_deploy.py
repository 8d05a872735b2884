"""Benchmark: predict with the exported ONNX model against the PyTorch checkpoint, in one run on this machine.

Two figures, both from fresh processes as a user runs them (`python -m stages.predict ...`):
  - one 1024x1024 PNG (a real NIH image), no Grad-CAM: the ONNX engine's wall time against the torch engine's
    (interpreter start, imports, model load, decode, forward, table), the median of `--runs` runs each,
    interleaved so that both see the same machine; targets: ONNX <= 1.0 s, or <= 0.35x torch on a slower machine;
  - the whole NIH sample folder (308 images) with `--csv`: predict's images/s against what decoding alone allows
    (predict's own decoder, `cxr14.predict.decoded`, with the same threads, timed inside its process so that
    interpreter start and imports count against predict only); target >= 0.8x.
The model is the demo's (resnet18 at 96 px) with random weights unless `--arch/--size` say otherwise: the time
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

from cxr14.calibration import fit_calibrator
from cxr14.common import cpu_count
from cxr14.data import IMAGENET_MEAN, IMAGENET_STD
from cxr14.export import export_onnx, metadata
from cxr14.model import build_model
from cxr14.nih import CLASSES

ROOT = Path(__file__).resolve().parents[1]
TARGET_ONE_S, TARGET_ONE_RATIO, TARGET_THROUGHPUT = 1.0, 0.35, 0.8
DECODE_ONLY = """
import sys, time
from cxr14.predict import decoded, expand_inputs
files, _ = expand_inputs([sys.argv[1]])
start = time.perf_counter()
n = sum(1 for _, image in decoded(files, int(sys.argv[2]), int(sys.argv[3])) if not isinstance(image, str))
print(n, time.perf_counter() - start)
"""


def write_model(folder: Path, arch: str, size: int) -> dict[str, Path]:
    """Checkpoint, Platt calibrator and thresholds (fitted on random data) and their ONNX export."""
    torch.manual_seed(0)
    model = build_model(arch, "none").eval()
    ckpt = {"state_dict": model.state_dict(), "arch": arch, "classes": list(CLASSES), "image_size": size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    files = {"pt": folder / "model.pt", "onnx": folder / "model.onnx", "calibrator": folder / "calibrator.json",
             "thresholds": folder / "thresholds.json"}
    torch.save(ckpt, files["pt"])
    rng = np.random.default_rng(0)
    probs = rng.random((200, len(CLASSES)))
    calibrator = fit_calibrator("platt", (rng.random((200, len(CLASSES))) < probs).astype(int), probs)
    files["calibrator"].write_text(json.dumps(calibrator))
    thresholds = dict.fromkeys(CLASSES, 0.5)
    files["thresholds"].write_text(json.dumps({"metadata": {"calibration": "platt"}, "thresholds": thresholds}))
    export_onnx(model, ckpt, metadata(ckpt, thresholds, calibrator, "benchmark"), files["onnx"], 20)
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
        onnx_cmd = [*py, str(image), "--model", str(files["onnx"])]
        torch_cmd = [*py, str(image), "--engine", "torch", "--model", str(files["pt"]), "--thresholds",
                     str(files["thresholds"]), "--calibrator", str(files["calibrator"])]
        floor_cmd = [sys.executable, "-c", "import numpy, PIL.Image, onnxruntime"]
        one: dict[str, list[float]] = {"onnx": [], "torch": [], "imports": []}
        for _ in range(args.runs):
            one["onnx"].append(timed(onnx_cmd))
            one["torch"].append(timed(torch_cmd))
            one["imports"].append(timed(floor_cmd))
        many_cmd = [*py, str(folder), "--model", str(files["onnx"]), "--csv", str(Path(tmp) / "out.csv")]
        decode_cmd = [sys.executable, "-c", DECODE_ONLY, str(folder), str(args.size), str(threads)]
        walls, decodes, count = [], [], 0
        for _ in range(max(args.runs // 2, 2)):
            walls.append(timed(many_cmd))
            out = subprocess.run(decode_cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
            count, seconds = int(out[0]), float(out[1])
            decodes.append(seconds)
    onnx_s, torch_s, floor_s = (statistics.median(one[k]) for k in ("onnx", "torch", "imports"))
    wall, decode = statistics.median(walls), statistics.median(decodes)
    ratio = decode / wall
    figures = {
        "machine": {"cpus": os.cpu_count(), "threads": threads}, "model": f"{args.arch} at {args.size} px",
        "one_image": {"onnx_s": round(onnx_s, 3), "torch_s": round(torch_s, 3), "ratio": round(onnx_s / torch_s, 3),
                      "python_numpy_pillow_onnxruntime_imports_s": round(floor_s, 3), "runs": args.runs,
                      "target": f"<= {TARGET_ONE_S} s, or <= {TARGET_ONE_RATIO}x torch",
                      "met": onnx_s <= TARGET_ONE_S or onnx_s / torch_s <= TARGET_ONE_RATIO},
        "folder": {"images": count, "predict_s": round(wall, 2), "predict_images_per_s": round(count / wall, 1),
                   "decode_only_s": round(decode, 2), "decode_only_images_per_s": round(count / decode, 1),
                   "ratio": round(ratio, 3), "target": f">= {TARGET_THROUGHPUT}x", "met": ratio >= TARGET_THROUGHPUT},
    }
    f = figures["folder"]
    print(f"predict, {figures['model']} (random weights), {threads} decoding threads on {os.cpu_count()} CPUs:")
    print(f"  one 1024x1024 PNG, fresh process, median of {args.runs}: ONNX {onnx_s:.2f} s, torch {torch_s:.2f} s "
          f"(ratio {onnx_s / torch_s:.2f}; of the ONNX time, Python + numpy + Pillow + onnxruntime imports "
          f"{floor_s:.2f} s); target <= {TARGET_ONE_S} s or <= {TARGET_ONE_RATIO}x: "
          f"{'met' if figures['one_image']['met'] else 'NOT met'}")
    print(f"  {count} images of {folder} to CSV: {f['predict_s']} s ({f['predict_images_per_s']} images/s) against "
          f"decoding alone {f['decode_only_s']} s ({f['decode_only_images_per_s']} images/s): {ratio:.2f}x; target "
          f">= {TARGET_THROUGHPUT}x: {'met' if f['met'] else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark: predict's wall time for one 1024x1024 PNG with Grad-CAM, model load included.

Runs `python -m stages.predict IMAGE --gradcam DIR` as a user would (a fresh process: interpreter
start, imports, checkpoint load, decode, forward, Grad-CAM, overlay written) on a real NIH image, with
a ResNet50 checkpoint at 224 px (random weights: the time does not depend on them) and thresholds set
so that exactly `--classes` classes are positive. Prints the median of `--runs` runs against the
2 s target, the part of it that is only Python starting and importing torch and torchvision (timed
alone, in the same run: on a slow CPU it is most of the total), and an in-process breakdown.

    python benchmarks/bench_predict.py [--nih ../shared/nih] [--runs 5] [--classes 1]
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

from cxr14.data.images import load_gray
from cxr14.data.loader import IMAGENET_MEAN, IMAGENET_STD, to_model_input
from cxr14.data.nih import CLASSES
from cxr14.evaluation.calibration import fit_calibrator
from cxr14.explanation.gradcam import GradCAM
from cxr14.explanation.heatmaps import overlay
from cxr14.model.checkpoint import load_checkpoint
from cxr14.model.factory import build_model, gradcam_layer

ROOT = Path(__file__).resolve().parents[1]

TARGET_S = 2.0


def write_model(folder: Path, arch: str, size: int) -> tuple[Path, Path, Path]:
    """A checkpoint and a Platt calibrator (fitted on random data), and where the thresholds will go."""
    torch.manual_seed(0)
    model = build_model(arch, "none").eval()
    ckpt = {"state_dict": model.state_dict(), "arch": arch, "classes": list(CLASSES),
            "image_size": size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    paths = folder / "model.pt", folder / "calibrator.json", folder / "thresholds.json"
    torch.save(ckpt, paths[0])
    rng = np.random.default_rng(0)
    probs = rng.random((200, len(CLASSES)))
    spec = fit_calibrator("platt", (rng.random((200, len(CLASSES))) < probs).astype(int), probs)
    paths[1].write_text(json.dumps(spec))
    return (*paths,)


def set_thresholds(path: Path, model_path: Path, calibrator: Path, image: Path, positives: int) -> None:
    from cxr14.evaluation.calibration import apply_calibrator, load_calibrator

    model, ckpt = load_checkpoint(model_path)
    x = to_model_input(torch.from_numpy(load_gray(image, ckpt["image_size"]).copy())[None, None])
    with torch.no_grad():
        raw = torch.sigmoid(model(x))[0].numpy()
    cal = apply_calibrator(load_calibrator(calibrator), raw[None])[0]
    order = np.argsort(-cal)
    # thresholds just above every calibrated probability, except just below for the top `positives` classes
    t = {CLASSES[k]: float(cal[k] - 1e-6 if rank < positives else min(cal[k] + 1e-3, 1.0))
         for rank, k in enumerate(order)}
    path.write_text(json.dumps({"thresholds": t}))


def breakdown(model_path: Path, image: Path, positives: int) -> dict[str, float]:
    """Seconds per step inside one process (the subprocess adds interpreter start and imports)."""
    times = {}
    start = time.perf_counter()
    model, ckpt = load_checkpoint(model_path)
    times["load checkpoint"] = time.perf_counter() - start
    start = time.perf_counter()
    gray = load_gray(image, ckpt["image_size"])
    times["decode + resize"] = time.perf_counter() - start
    x = to_model_input(torch.from_numpy(gray.copy())[None, None])
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    times["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    with GradCAM(model, gradcam_layer(model, ckpt["arch"])[1]) as cam:
        _, maps = cam(x, list(range(positives)))
    times[f"Grad-CAM ({positives} classes)"] = time.perf_counter() - start
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for j in range(positives):
            overlay(gray, maps[0, j].numpy(), "benchmark", Path(tmp) / f"{j}.png")
    times["overlays"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=ROOT / ".." / "shared" / "nih", help="NIH sample folder")
    parser.add_argument("--image", default="00000003_000.png", help="a 1024x1024 PNG in NIH/images")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--classes", type=int, default=1, help="positive classes, each gets a heatmap")
    args = parser.parse_args()
    image = args.nih / "images" / args.image
    if not image.is_file():
        raise SystemExit(f"error: {image}: not found; pass --nih pointing at the NIH sample")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path, calibrator, thresholds = write_model(tmp, args.arch, args.size)
        set_thresholds(thresholds, model_path, calibrator, image, args.classes)
        cmd = [sys.executable, "-m", "stages.predict", str(image), "--model", str(model_path), "--thresholds",
               str(thresholds), "--calibrator", str(calibrator), "--gradcam", str(tmp / "out")]
        env = dict(os.environ)
        floor_cmd = [sys.executable, "-c", "import numpy, pandas, PIL.Image, torch, torchvision, yaml"]
        walls, floors = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(floor_cmd, check=True)
            floors.append(time.perf_counter() - start)
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            walls.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise SystemExit(f"error: predict failed: {done.stderr.strip()}")
        written = sorted(p.name for p in (tmp / "out").iterdir())
        if len(written) != args.classes:
            raise SystemExit(f"error: expected {args.classes} heatmaps, predict wrote {written}")
        torch.set_num_threads(os.cpu_count() or 1)
        parts = breakdown(model_path, image, args.classes)
    median, floor = statistics.median(walls), statistics.median(floors)
    print(f"predict, {args.arch} at {args.size} px, one 1024x1024 PNG, Grad-CAM for {args.classes} class(es), "
          f"{os.cpu_count()} CPU threads, fresh process each run (model load included):")
    print(f"  wall time: median {median:.2f} s over {args.runs} runs (min {min(walls):.2f}, max {max(walls):.2f})")
    print(f"  of which starting Python and importing torch, torchvision, numpy, pandas, Pillow, yaml "
          f"(measured alone): median {floor:.2f} s")
    own = median - floor
    print(f"  predict's own time (wall - imports): {own:.2f} s")
    for name, value in (("whole process", median), ("predict's own time", own)):
        print(f"  target <= {TARGET_S:.1f} s, {name}: ratio to target {value / TARGET_S:.2f} "
              f"({'met' if value <= TARGET_S else 'NOT met'})")
    print("  in-process breakdown (the rest is interpreter start and imports):")
    for name, seconds in parts.items():
        print(f"    {name:<28}{seconds:6.3f} s")


if __name__ == "__main__":
    main()

"""Benchmark: prepared arrays vs the seed's per-sample PNG decoding, and prepare's speed and memory.

Runs on the real NIH images in ../shared/nih (308 PNGs, 1024x1024) and prints, in one run:
  1. images/s through the training DataLoader from prepared arrays vs the seed's per-sample
     PIL open + resize + ToTensor + Normalize, both in one process (per core), and their ratio;
  2. prepare's images/s on all of this machine's cores;
  3. prepare's peak memory (whole process tree) for 300 and for 3,000 images.
Targets (issue 2): ratio >= 50x; prepare >= 80 images/s on 2 cores; peak memory flat.

    python benchmarks/bench_data.py [--nih ../shared/nih] [--size 224]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from PIL import Image
from torchvision import transforms

from cxr14.data.arrays import write_array
from cxr14.data.loader import PreparedImages, make_loader, to_model_input
from cxr14.runtime.devices import cpu_count

ROOT = Path(__file__).resolve().parents[1]


class SeedDataset(torch.utils.data.Dataset):
    """The seed's loader: every sample decodes its 1024x1024 PNG again, every epoch."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.Resize((size, size)),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.open(self.paths[i]).convert("RGB")
        return self.transform(image), torch.zeros(14)


def images_per_second(loader: torch.utils.data.DataLoader, prepare_batch, min_images: int) -> float:
    """Iterate (repeating epochs) until `min_images` have been produced; images/s."""
    seen, start = 0, time.perf_counter()
    while seen < min_images:
        for images, _ in loader:
            x = prepare_batch(images)
            seen += x.shape[0]
            if seen >= min_images:
                break
    return seen / (time.perf_counter() - start)


def peak_rss_of(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run `cmd`; return (seconds, peak MiB of RSS summed over the process and its children)."""
    proc = psutil.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, start = 0, time.perf_counter()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed: {err.decode()[-500:]}")
    return time.perf_counter() - start, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=ROOT.parent / "shared" / "nih", help="NIH sample folder")
    parser.add_argument("--size", type=int, default=224, help="training image size")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    args = parser.parse_args()
    paths = sorted(str(p) for p in (args.nih / "images").glob("*.png"))
    if not paths:
        raise SystemExit(f"{args.nih / 'images'}: no PNG files; pass --nih")
    torch.set_num_threads(1)
    cores = cpu_count()
    print(f"{len(paths)} NIH PNGs from {args.nih}, {args.size} px, batch {args.batch}, {cores} cores\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_array(paths, args.size, cores, tmp / "all.npy", "benchmark", desc="prepare")
        prep_rate = len(paths) / (time.perf_counter() - start)

        labels = np.zeros((len(paths), 14), dtype=np.float32)
        ours = make_loader(PreparedImages(tmp / "all.npy", labels), args.batch, shuffle=True, seed=0)
        raw_rate = images_per_second(ours, lambda x: x, min_images=100 * len(paths))
        buffer = torch.empty(0)

        def model_ready(images: torch.Tensor) -> torch.Tensor:
            nonlocal buffer
            buffer = to_model_input(images, out=buffer)  # the train loop's CPU path: one reused buffer
            return buffer

        ours_rate = images_per_second(ours, model_ready, min_images=20 * len(paths))
        seed = torch.utils.data.DataLoader(SeedDataset(paths, args.size), batch_size=args.batch, shuffle=True)
        seed_rate = images_per_second(seed, lambda x: x, min_images=192)

        print("1. training DataLoader, one process (images/s per core)")
        print(f"   prepared, uint8 batch : {raw_rate:10.0f}   (what the DataLoader yields)")
        print(f"   prepared, model-ready : {ours_rate:10.0f}   (+ float, 3 channels, ImageNet normalisation)")
        print(f"   seed per-sample PNG   : {seed_rate:10.1f}   (PIL open + resize + ToTensor + Normalize)")
        print(f"   ratio, model-ready    : {ours_rate / seed_rate:10.0f}x   (target >= 50x)\n")
        print(f"2. prepare, {cores} workers: {prep_rate:.0f} images/s for 1024x1024 PNGs (target >= 80 on 2 cores)\n")

        print("3. prepare peak memory, whole process tree (target: flat)")
        (tmp / "params.yaml").write_text(f"prepare: {{image_size: {args.size}, workers: 0}}\n")
        for n in (300, 3000):
            split_dir = tmp / f"split{n}"
            split_dir.mkdir()
            rows = pd.DataFrame({"path": [paths[i % len(paths)] for i in range(n)]})
            for name in ("train", "val", "test"):
                (rows if name == "train" else rows.iloc[:0]).to_csv(split_dir / f"{name}.csv", index=False)
            cmd = [sys.executable, "-m", "stages.prepare", "--params", str(tmp / "params.yaml"),
                   "--split-dir", str(split_dir), "--out", str(tmp / f"out{n}")]
            seconds, peak = peak_rss_of(cmd, ROOT)
            print(f"   {n:5d} images: peak {peak:6.0f} MiB, {n / seconds:5.0f} images/s (process start included)")


if __name__ == "__main__":
    main()

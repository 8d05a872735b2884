"""Benchmark: training images/s, fed from prepared arrays vs the seed's per-sample PNG decoding.

On the real NIH images in ../shared/nih, in one run:
  1. the demo configuration (params.yaml `train`: its arch from scratch at prepare.image_size), in the
     channels_last layout the train stage uses and in the default layout: ratio;
  2. ResNet50 at 224 px with the NIH freeze (conv1..layer3), fed from a prepared array, and the same
     model fed by the seed's loader (PIL open + resize + normalise per sample, every epoch): ratio
     (both channels_last, as the train stage);
  3. where CUDA is available, ResNet50 224 px steps with bf16 autocast + channels_last vs fp32.
Weights are random (speed does not depend on them). Both loaders run in the training process.

    python benchmarks/bench_train.py [--nih ../shared/nih] [--steps 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from bench_data import SeedDataset  # beside this script, which Python puts first on the import path

from cxr14.data.arrays import write_array
from cxr14.data.loader import PreparedImages, make_loader
from cxr14.model.factory import build_model, freeze, param_groups, set_train_mode
from cxr14.model.inference import Batches
from cxr14.params import Augment, Prepare, Train, load_section
from cxr14.runtime.devices import cpu_count, cpu_kernels

ROOT = Path(__file__).resolve().parents[1]

NIH_FREEZE = ["conv1", "bn1", "layer1", "layer2", "layer3"]
NIH_AUGMENT = Augment(hflip=0.5, rotate=5.0, crop_scale=(1.0, 1.0))  # the NIH recipe's (README)


def forever(loader) -> Iterator:
    while True:
        yield from loader


def steps_per_second(arch, frozen_prefixes, batches, steps, device, bf16=False, channels_last=True) -> float:
    """Images/s of full optimisation steps (data, forward, backward, AdamW), after one warm-up step."""
    torch.manual_seed(0)
    model = build_model(arch, "none").to(device)
    frozen = freeze(model, frozen_prefixes)
    channels_last = channels_last or bf16
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, arch, 1e-3, 1e-4), weight_decay=1e-4)
    criterion = torch.nn.BCEWithLogitsLoss()
    set_train_mode(model, frozen)
    seen, start = 0, 0.0
    for i in range(steps + 1):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            seen, start = 0, time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def prepared_batches(array: Path, n: int, batch_size: int, device: torch.device, aug: Augment,
                     channels_last=True) -> Iterator:
    labels = (np.random.default_rng(0).random((n, 14)) < 0.1).astype(np.float32)
    to_input = Batches(device, aug, reuse=True, channels_last=channels_last)
    generator = torch.Generator().manual_seed(0)
    for images, y in forever(make_loader(PreparedImages(array, labels), batch_size, shuffle=True, drop_last=True)):
        yield to_input(images, generator), y


def seed_batches(paths: list[str], size: int, batch_size: int) -> Iterator:
    loader = torch.utils.data.DataLoader(SeedDataset(paths, size), batch_size=batch_size, shuffle=True,
                                         drop_last=True)
    for x, y in forever(loader):
        yield x, (y > 0.5).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=ROOT.parent / "shared" / "nih", help="NIH sample folder")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after 1 warm-up)")
    args = parser.parse_args()
    paths = sorted(str(p) for p in (args.nih / "images").glob("*.png"))
    if not paths:
        raise SystemExit(f"{args.nih / 'images'}: no PNG files; pass --nih")
    t, demo_size = load_section(ROOT / "params.yaml", Train), load_section(ROOT / "params.yaml", Prepare).image_size
    cpu_kernels(t.cpu_kernels)  # as the train stage: oneDNN capped at AVX2 by default
    cpu = torch.device("cpu")
    torch.set_num_threads(cpu_count())
    print(f"{len(paths)} NIH PNGs, {cpu_count()} CPU threads, {args.steps} timed steps each\n")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted({demo_size, 224}):
            write_array(paths, size, cpu_count(), Path(tmp) / f"{size}.npy", "benchmark", desc=f"prepare {size}")
        demo = {layout: steps_per_second(t.arch, t.freeze, prepared_batches(
            Path(tmp) / f"{demo_size}.npy", len(paths), t.batch_size, cpu, t.augment, layout), args.steps, cpu,
            channels_last=layout) for layout in (False, True)}
        print(f"1. demo config ({t.arch}, {demo_size} px, batch {t.batch_size}, CPU):")
        print(f"   default layout           : {demo[False]:6.1f} images/s")
        print(f"   channels_last (the stage): {demo[True]:6.1f} images/s   ({demo[True] / demo[False]:.2f}x)")
        nih = prepared_batches(Path(tmp) / "224.npy", len(paths), 64, cpu, NIH_AUGMENT)
        ours = steps_per_second("resnet50", NIH_FREEZE, nih, args.steps, cpu)
        seed = steps_per_second("resnet50", NIH_FREEZE, seed_batches(paths, 224, 64), args.steps, cpu)
        print("2. ResNet50, 224 px, NIH freeze, batch 64, CPU:")
        print(f"   fed from prepared arrays : {ours:6.1f} images/s")
        print(f"   fed by the seed's PNGs   : {seed:6.1f} images/s")
        print(f"   ratio                    : {ours / seed:6.2f}x")
    if not torch.cuda.is_available():
        print("3. GPU: no CUDA device here; bf16 + channels_last vs fp32 not measured")
        return
    gpu = torch.device("cuda")

    def synthetic() -> Iterator:
        x, y = torch.randn(128, 3, 224, 224, device=gpu), (torch.rand(128, 14, device=gpu) < 0.1).float()
        while True:
            yield x, y

    fp32 = steps_per_second("resnet50", NIH_FREEZE, synthetic(), 20, gpu, channels_last=False)
    bf16 = steps_per_second("resnet50", NIH_FREEZE, synthetic(), 20, gpu, bf16=True)
    print(f"3. GPU ({torch.cuda.get_device_name()}), ResNet50 224 px, NIH freeze, batch 128:")
    print(f"   fp32                     : {fp32:8.0f} images/s")
    print(f"   bf16 + channels_last     : {bf16:8.0f} images/s   ({bf16 / fp32:.2f}x)")


if __name__ == "__main__":
    main()

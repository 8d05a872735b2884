"""Benchmark: what capping oneDNN at AVX2 (train.cpu_kernels: avx2, runtime.devices.cpu_kernels) costs in speed.

Trains resnet18 (96 px, batch 32, synthetic batches; the demo's model when measured) for a few steps in fresh processes,
alternating oneDNN's own choice of kernels and the AVX2 cap, and prints the median step time of each and
their ratio. Only meaningful on a CPU with AVX-512 (elsewhere both runs use the same kernels).

    python benchmarks/bench_isa.py [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

STEP = """
import time, torch, torchvision
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=14)
x, y = torch.randn(32, 3, 96, 96), (torch.rand(32, 14) < 0.1).float()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = torch.nn.BCEWithLogitsLoss()

def step():
    loss = loss_fn(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

step()  # warm-up: oneDNN builds its kernels here
start = time.perf_counter()
for _ in range({steps}):
    step()
print((time.perf_counter() - start) / {steps})
"""


def seconds_per_step(cap: bool, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    out = subprocess.run([sys.executable, "-c", STEP.format(steps=steps)], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting, alternating")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per process")
    args = parser.parse_args()
    import torch

    print(f"ATen capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for cap in (False, True):
            times[cap].append(seconds_per_step(cap, args.steps))
    own, avx2 = statistics.median(times[False]), statistics.median(times[True])
    for label, cap, median in (("oneDNN's own kernels", False, own), ("capped at AVX2", True, avx2)):
        runs = ", ".join(f"{t * 1000:.0f}" for t in times[cap])
        print(f"{label:<21}: {median * 1000:7.0f} ms/step (runs: {runs})")
    print(f"ratio AVX2 / own     : {avx2 / own:7.2f}x")


if __name__ == "__main__":
    main()

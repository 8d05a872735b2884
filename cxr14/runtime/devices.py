"""Which cores and which device a stage computes on.

`cpu_count` honours OMP_NUM_THREADS, so experiments queued side by side share the cores; `cpu_kernels`
pins oneDNN's kernels so that numbers match across x86-64 CPUs; `pick_device` turns `train.device` into a
torch device (torch is imported there only, so the ONNX predict path never loads it).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cxr14.runtime.errors import PipelineError

if TYPE_CHECKING:
    import torch


def cpu_count() -> int:
    """Cores this process may use: its affinity mask (container limits), or fewer when OMP_NUM_THREADS says so.

    Every stage sizes its thread pool and its default worker count with this, so experiments run side by side
    (`OMP_NUM_THREADS=1 dvc queue start -j 2`) share the cores instead of each taking all of them.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    return max(1, min(cores, int(limit))) if limit.isdigit() and int(limit) > 0 else cores

def cpu_kernels(kind: str) -> None:
    """`avx2`: cap oneDNN (PyTorch's CPU convolutions) at AVX2, so every x86-64 CPU with AVX2 computes the same
    numbers; `native`: leave oneDNN its best kernels for this CPU.

    oneDNN picks AVX-512 kernels where the CPU has them, and they round differently from the AVX2 ones,
    enough to move the val and test AUCs, while ATen's own capability (ATEN_CPU_CAPABILITY) does not; the cap
    costs training speed on an AVX-512 CPU (benchmarks/bench_isa.py measures how much). oneDNN reads the cap at
    its first convolution, so calling this before any forward pass is enough; it needs no torch import. A
    user's own ONEDNN_MAX_CPU_ISA wins. The thread count still changes the numbers (docs/reproducibility.md).
    """
    if kind == "avx2":
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then the CPU; `cuda:N` is one GPU; `key` names the setting in messages."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda:") and name[5:].isdigit():  # one GPU of several: a queued experiment each
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name[5:]) >= count:
            raise PipelineError(f"{key}: {name}, but {count} CUDA device(s) are visible here (CUDA_VISIBLE_DEVICES "
                                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use cuda:0 to cuda:{count - 1}"
                                if count else f"{key}: {name}, but no CUDA device is available here; use auto or cpu")
        torch.cuda.set_device(int(name[5:]))  # the current device too: pinned-memory threads open no context on 0
        return torch.device(name)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise PipelineError(f"{key}: {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    if not available[name]:
        raise PipelineError(f"{key}: {name}, but no {name.upper()} device is available here; use auto or cpu")
    return torch.device(name)

"""Checkpoints: tensors and plain data only, loaded with `weights_only=True`, written atomically.

A checkpoint carries its own arch, classes, image size and normalisation, so nothing downstream has
to guess how the model was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr14.model.factory import build_model
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import atomic_path

CHECKPOINT_KEYS = ("state_dict", "arch", "classes", "image_size", "mean", "std")

def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> None:
    """Atomic torch.save of tensors and plain data only (loadable with weights_only=True); through a file
    object, so the zip's inner name is fixed and equal runs give equal bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)

def read_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, tensors and plain data only; one-line errors for missing or foreign files."""
    path = Path(path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no checkpoint; run the train stage (dvc repro train)") from None
    except Exception as exc:  # truncated or foreign files fail in many ways inside torch.load
        raise PipelineError(f"{path}: not a readable checkpoint ({' '.join(str(exc).split())[:300]})") from None

def load_checkpoint(path: Path | str, device: torch.device | str = "cpu",
                    classes: Sequence[str] | None = None) -> tuple[nn.Module, dict]:
    """The trained model (eval mode) and its metadata from a train-stage checkpoint; with `classes`, the
    checkpoint must predict exactly those, in that order (the stages' predictions files assume it)."""
    ckpt = read_checkpoint(path, device)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise PipelineError(f"{path}: checkpoint lacks {', '.join(missing)}; expected one written by the train stage")
    if classes is not None and list(ckpt["classes"]) != list(classes):
        raise PipelineError(f"{path}: classes {ckpt['classes']} differ from this project's {list(classes)}")
    try:
        model = build_model(ckpt["arch"], "none", len(ckpt["classes"]), int(ckpt.get("output_stride", 32)))
        model.load_state_dict(ckpt["state_dict"])
    except (PipelineError, RuntimeError, TypeError, ValueError) as exc:  # a foreign or edited checkpoint
        reason = " ".join(str(exc).split())[:300]
        raise PipelineError(f"{path}: checkpoint does not describe a model this project builds ({reason})") from None
    return model.to(device).eval(), ckpt


def read_init(path: Path | str, model: nn.Module, arch: str, output_stride: int, classes: Sequence[str],
              where: str = "train.init") -> dict[str, Any]:
    """Load a checkpoint to start from (`train.init`) into `model` (built for `arch`) and return its contents: it
    must come from a train stage with this run's arch, output stride and classes (in order); one line naming the
    file and what differs."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{where}: {path}: no such file; expected a checkpoint written by the train stage")
    ckpt = read_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise PipelineError(f"{where}: {path}: checkpoint lacks {', '.join(missing)}; expected one written by the "
                            "train stage")
    found = {"arch": ckpt["arch"], "output_stride": int(ckpt.get("output_stride", 32)),
             "classes": list(ckpt["classes"])}
    wanted = {"arch": arch, "output_stride": output_stride, "classes": list(classes)}
    for key, value in found.items():
        if value != wanted[key]:
            raise PipelineError(f"{where}: {path}: {key} {value}; expected {wanted[key]} (train.{key} must match the "
                                "checkpoint)" if key != "classes" else f"{where}: {path}: classes {value}; expected "
                                f"this project's {wanted[key]}")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise PipelineError(f"{where}: {path}: weights do not fit a {arch} ({reason})") from None
    return ckpt

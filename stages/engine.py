"""Training and inference steps shared by the train, evaluate and predict stages.

`train_one_epoch` and `evaluate` are small functions returning dicts (pytorch/examples style); the
seed's loss bug is fixed here once: class balance goes through `pos_weight`, not `weight`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from stages.common import PipelineError, progress
from stages.data import IMAGENET_MEAN, IMAGENET_STD, augment, to_model_input
from stages.model import set_train_mode

SCHEDULERS = ("none", "cosine", "plateau")


def positive_weights(labels: np.ndarray, cap: float | None) -> torch.Tensor:
    """BCE pos_weight per class = negatives / positives on the training split (capped for rare classes)."""
    pos = labels.sum(axis=0)
    neg = len(labels) - pos
    weight = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    if cap is not None:
        weight = np.minimum(weight, cap)
    return torch.tensor(weight, dtype=torch.float32)


def pick_device(name: str) -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"params.yaml train.device: {name!r}; expected auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params.yaml train.device: cuda, but no CUDA device is available; use auto or cpu")
    return device


def mean_auc(labels: np.ndarray, probs: np.ndarray) -> tuple[float, list[float | None]]:
    """Macro ROC-AUC over classes that have both positives and negatives; None for the others."""
    per_class: list[float | None] = []
    for k in range(labels.shape[1]):
        y = labels[:, k]
        per_class.append(float(roc_auc_score(y, probs[:, k])) if 0 < y.sum() < len(y) else None)
    defined = [a for a in per_class if a is not None]
    return (float(np.mean(defined)) if defined else float("nan")), per_class


class Batches:
    """Turns loader batches into model input on the device (augmented when training)."""

    def __init__(self, device: torch.device, aug: dict | None = None) -> None:
        self.device, self.aug, self.buffer = device, aug, None
        self.channels_last = device.type == "cuda"

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        if self.aug and generator is not None:
            crop = tuple(self.aug.get("crop_scale", (1.0, 1.0)))
            x = augment(x, generator, self.aug.get("hflip", 0.0), self.aug.get("rotate", 0.0), crop)
        out = self.buffer if self.device.type == "cpu" else None  # reuse on CPU: page faults cost more
        self.buffer = x = to_model_input(x, IMAGENET_MEAN, IMAGENET_STD, out=out)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def train_one_epoch(model, loader, criterion, optimizer, batches, frozen, generator, desc) -> dict:
    """One pass over the training split; returns mean loss, images and seconds."""
    set_train_mode(model, frozen)
    total, seen, start = 0.0, 0, time.perf_counter()
    use_bf16 = batches.device.type == "cuda"
    for images, labels in progress(loader, desc=desc, unit="batch", leave=False):
        x, y = batches(images, generator), labels.to(batches.device)
        with torch.autocast(batches.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        seen += len(y)
    seconds = time.perf_counter() - start
    return {"loss": total / max(seen, 1), "images": seen, "seconds": seconds}


@torch.no_grad()
def evaluate(model, loader, criterion, batches) -> dict:
    """Loss, probabilities and ROC-AUCs on a split (no augmentation, eval mode)."""
    model.eval()
    probs, labels, total = [], [], 0.0
    use_bf16 = batches.device.type == "cuda"
    for images, y in loader:
        with torch.autocast(batches.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(batches(images)).float()
        total += criterion(logits, y.to(batches.device)).item() * len(y)
        probs.append(torch.sigmoid(logits).cpu().numpy())
        labels.append(y.numpy())
    probs_np, labels_np = np.concatenate(probs), np.concatenate(labels)
    auc, per_class = mean_auc(labels_np, probs_np)
    return {"loss": total / len(labels_np), "mean_auc": auc, "per_class_auc": per_class, "probs": probs_np}


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int):
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=1)
    return None

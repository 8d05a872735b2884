"""Training and inference steps shared by the train and evaluate stages and by predict.

`train_one_epoch` and `evaluate` are small functions returning dicts (pytorch/examples style); the
seed's loss bug is fixed here once, in `loss_function`: class balance goes through `pos_weight`, not `weight`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxr14.common import PipelineError, progress
from cxr14.data import IMAGENET_MEAN, IMAGENET_STD, augment, to_model_input
from cxr14.metrics import mean_auc
from cxr14.model import set_train_mode

if TYPE_CHECKING:
    from cxr14.params import Augment

def positive_weights(labels: np.ndarray, cap: float | None) -> torch.Tensor:
    """BCE pos_weight per class = negatives / positives on the training split (capped for rare classes)."""
    pos = labels.sum(axis=0)
    neg = len(labels) - pos
    weight = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    if cap is not None:
        weight = np.minimum(weight, cap)
    return torch.tensor(weight, dtype=torch.float32)


class SmoothedBCE(torch.nn.BCEWithLogitsLoss):
    """BCE against targets pulled `smoothing` / 2 toward 0.5 (label smoothing, for report-mined labels that are
    sometimes wrong); 0 is plain BCE."""

    def __init__(self, pos_weight: torch.Tensor, smoothing: float = 0.0) -> None:
        super().__init__(pos_weight=pos_weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.smoothing:
            target = target * (1 - self.smoothing) + self.smoothing / 2
        return super().forward(logits, target)


def loss_function(labels: np.ndarray, cap: float | None, smoothing: float = 0.0) -> torch.nn.BCEWithLogitsLoss:
    """The training loss: BCE per class with `pos_weight` = negatives / positives (the seed passed `weight=`,
    which scales the negatives' loss too and so does not rebalance anything), its targets smoothed by `smoothing`."""
    return SmoothedBCE(positive_weights(labels, cap), smoothing)


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then the CPU; `cuda:N` is one GPU; `key` names the setting in messages."""
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


class Batches:
    """Turns loader batches into model input on the device (augmented when `aug` is given and a generator passed).

    With `reuse`, CPU batches are written into one buffer that the next call overwrites (a fresh 40 MB tensor
    per batch costs more in page faults than the arithmetic): only for loops that are done with a batch
    before asking for the next, as the training and evaluation loops are. By default every call is a new tensor.
    """

    def __init__(self, device: torch.device, aug: Augment | None = None, reuse: bool = False,
                 part: tuple[int, int] = (0, 1), channels_last: bool | None = None) -> None:
        self.device, self.aug, self.reuse, self.buffer, self.part = device, aug, reuse, None, part
        # channels_last (NHWC): the layout cuDNN's and oneDNN's convolutions are fastest in; by default on CUDA,
        # training asks for it everywhere (faster CPU steps too; the bytes do not depend on ATen's capability)
        self.format = torch.channels_last if (device.type == "cuda" if channels_last is None else channels_last) \
            else torch.contiguous_format

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # the default float type: float32, unless a caller chose float64 (the DDP equivalence test does)
        x = images.to(self.device, non_blocking=True).to(torch.get_default_dtype())
        if self.aug is not None and generator is not None:
            x = augment(x, generator, self.aug.hflip, self.aug.rotate, self.aug.crop_scale, self.part)
        out = self.buffer if self.reuse and self.device.type == "cpu" else None
        x = to_model_input(x, IMAGENET_MEAN, IMAGENET_STD, out=out, memory_format=self.format)
        if self.reuse:
            self.buffer = x
        return x


def train_one_epoch(model, loader, criterion, optimizer, batches, frozen, generator, desc, disable=None,
                    after_step=None) -> dict:
    """One pass over the training split; returns mean loss, images and seconds (this process's share of them).

    `after_step()` runs after every optimizer step (the weights' moving average)."""
    set_train_mode(model, frozen)
    total, seen, start = 0.0, 0, time.perf_counter()
    use_bf16 = batches.device.type == "cuda"
    for images, labels in progress(loader, desc=desc, unit="batch", leave=False, **({"disable": True} if disable
                                                                                     else {})):
        x, y = batches(images, generator), labels.to(batches.device)
        with torch.autocast(batches.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.item() * len(y)
        seen += len(y)
    seconds = time.perf_counter() - start
    return {"loss": total / max(seen, 1), "images": seen, "seconds": seconds}


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits as float32, under the same autocast everywhere (bf16 on CUDA, none elsewhere): evaluate, whose
    predictions the thresholds are fitted on, and predict must compute a probability the same way."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        return model(x).float()


@torch.no_grad()
def infer(model, loader, criterion, batches) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities, labels and the summed loss over a loader's batches (eval mode, no augmentation)."""
    model.eval()
    probs, labels, total = [], [], 0.0
    for images, y in loader:
        logits = forward(model, batches(images))
        total += criterion(logits, y.to(batches.device)).item() * len(y)
        probs.append(torch.sigmoid(logits).cpu().numpy())
        labels.append(y.numpy())
    if not probs:  # an empty share of a split (one process of several)
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), 0.0
    return np.concatenate(probs), np.concatenate(labels), total


def scores(probs: np.ndarray, labels: np.ndarray, total_loss: float) -> dict:
    """Mean loss and ROC-AUCs of a whole split's probabilities."""
    if not np.isfinite(probs).all():
        raise PipelineError("the model's outputs are not finite (NaN or inf): training diverged; "
                            "lower train.lr_head / train.lr_backbone")
    auc, per_class = mean_auc(labels, probs)
    return {"loss": total_loss / len(labels), "mean_auc": auc, "per_class_auc": per_class, "probs": probs}


def evaluate(model, loader, criterion, batches) -> dict:
    """Loss, probabilities and ROC-AUCs on a split (no augmentation, eval mode)."""
    return scores(*infer(model, loader, criterion, batches))


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int, steps_per_epoch: int = 1) -> Any:
    """The learning-rate schedule by name: none, cosine over `epochs`, x0.1 on a val AUC plateau, or one-cycle
    (stepped every batch: `per_step`): warm up to the configured rates over the first quarter, then anneal."""
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(epochs * steps_per_epoch, 1),
            pct_start=0.25)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=1)
    return None

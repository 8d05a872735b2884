"""Inference steps shared by training's validation, the evaluate and explain stages, and predict.

Every caller computes a probability the same way (`forward`: the same autocast everywhere), so the
thresholds fitted on evaluate's predictions hold for predict's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from cxr14.data.loader import IMAGENET_MEAN, IMAGENET_STD, augment, to_model_input
from cxr14.evaluation.metrics import mean_auc
from cxr14.runtime.errors import PipelineError

if TYPE_CHECKING:
    from cxr14.params import Augment


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

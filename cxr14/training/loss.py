"""The training loss: BCE per class, class balance through `pos_weight`, targets optionally smoothed.

The original recipe passed the balance as `weight=`, which scales the negatives' loss too and so
rebalances nothing; this is the one place that gets it right.

A label may be unknown (NaN: a finding an own-data table lacks, docs/datasets.md). An unknown entry is not a
negative: it contributes nothing to the loss, which is the mean over the known entries, and `pos_weight` counts
known labels only. Labels without unknowns take the plain path, bit for bit as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    pass


def positive_weights(labels: np.ndarray, cap: float | None) -> torch.Tensor:
    """BCE pos_weight per class = negatives / positives among the training split's known labels (capped for rare
    classes); 1 for a class with no known positive."""
    unknown = np.isnan(labels)
    if unknown.any():
        pos = np.where(unknown, 0, labels).sum(axis=0)
        neg = (~unknown).sum(axis=0) - pos
    else:
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
        unknown = torch.isnan(target)
        if self.smoothing:
            target = target * (1 - self.smoothing) + self.smoothing / 2
        if not unknown.any():
            return super().forward(logits, target)
        # masked BCE: unknown entries weigh 0, and the mean is over the known ones (0 when a batch has none)
        knowns = (~unknown).to(logits.dtype)
        each = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.where(unknown, torch.zeros_like(target), target), pos_weight=self.pos_weight,
            reduction="none")
        return (each * knowns).sum() / knowns.sum().clamp(min=1)

def loss_function(labels: np.ndarray, cap: float | None, smoothing: float = 0.0) -> torch.nn.BCEWithLogitsLoss:
    """The training loss: BCE per class with `pos_weight` = negatives / positives (the original recipe passed `weight=`,
    which scales the negatives' loss too and so does not rebalance anything), its targets smoothed by `smoothing`."""
    return SmoothedBCE(positive_weights(labels, cap), smoothing)

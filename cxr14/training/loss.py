"""The training loss: BCE per class, class balance through `pos_weight`, targets optionally smoothed.

The original recipe passed the balance as `weight=`, which scales the negatives' loss too and so
rebalances nothing; this is the one place that gets it right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    pass


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
    """The training loss: BCE per class with `pos_weight` = negatives / positives (the original recipe passed `weight=`,
    which scales the negatives' loss too and so does not rebalance anything), its targets smoothed by `smoothing`."""
    return SmoothedBCE(positive_weights(labels, cap), smoothing)

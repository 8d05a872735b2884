"""Learning-rate schedules by the name `train.scheduler` gives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    pass


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

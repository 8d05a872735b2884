"""One training epoch, as a small function returning a dict (pytorch/examples style).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from cxr14.model.factory import set_train_mode
from cxr14.runtime.progress import progress

if TYPE_CHECKING:
    pass


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

"""The training loop: epochs, validation, early stopping, best/last checkpoints, exact resume.

A killed run continues from `last.pt` with the same result as an uninterrupted one: each epoch reseeds
its shuffle and augmentation from (seed, epoch), so nothing but the saved states carries over.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cxr14.common import PipelineError
from cxr14.data import IMAGENET_MEAN, IMAGENET_STD, PreparedImages, make_loader
from cxr14.engine import Batches, evaluate, loss_function, make_scheduler, train_one_epoch
from cxr14.metrics import has_both
from cxr14.model import param_groups, read_checkpoint, save_checkpoint
from cxr14.nih import CLASSES
from cxr14.params import Train


class Logger(Protocol):
    """What `fit` needs of dvclive's `Live`: per-epoch metrics and a step counter."""

    step: int

    def log_metric(self, name: str, value: float) -> None: ...
    def next_step(self) -> None: ...


def fresh_state() -> dict[str, Any]:
    return {"epoch": 0, "best_auc": -1.0, "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0, "images": 0}


def fingerprint(files: list[Path]) -> dict[str, str]:
    """MD5 of each file a run trains on (prepared arrays, split tables): what a resume point must match.

    Read in 8 MB chunks; the real dataset's 5.6 GB of 224 px arrays take seconds, once per run.
    """
    out = {}
    for path in files:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        out[str(path)] = digest.hexdigest()
    return out


def resume_state(path: Path, t: Train, data: dict[str, str], model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, device: torch.device) -> dict[str, Any]:
    """Load model, optimizer and scheduler states from `path`; the recipe and the data must be what it was made
    with: a resume point from other data (another split seed, another image size) would hand back a model
    trained on something else."""
    last = read_checkpoint(path, device)
    if last.get("recipe") != t.recipe():
        raise PipelineError(f"{path} was made with other train params; set train.resume: false")
    changed = [f for f, digest in data.items() if last.get("data", {}).get(f) != digest]
    if changed:
        raise PipelineError(f"{path} was trained on other data ({changed[0]} differs, {len(changed)} file(s) in all); "
                            "set train.resume: false")
    model.load_state_dict(last["model"])
    optimizer.load_state_dict(last["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(last["scheduler"])
    return last["state"]


def check_val_labels(val: PreparedImages) -> None:
    """Early stopping and the best checkpoint need a val mean AUC: at least one class with both outcomes."""
    labels = val.labels
    if labels is None or not any(has_both(labels[:, k]) for k in range(labels.shape[1])):
        raise PipelineError(f"{val.path}: no class has both positive and negative labels among these {len(val)} val "
                            "images, so the val mean ROC-AUC that picks the best epoch is undefined; raise "
                            "split.val_fraction")


def fit(model: nn.Module, frozen: list[str], train_set: PreparedImages, val_set: PreparedImages, t: Train,
        device: torch.device, open_log: Callable[[bool], AbstractContextManager[Logger]], out: Path,
        pretrained: str | None = None, data: dict[str, str] | None = None) -> dict[str, Any]:
    """Train per `t`; the best epoch by val mean AUC goes to out/model.pt, every epoch to out/last.pt.

    `open_log(resumed)` opens the per-epoch log (dvclive's Live) once the resume point is known, so a
    refused resume leaves the old logs alone. Returns the final state: epochs run, best epoch and AUC,
    training seconds and images. `data` (file -> MD5, `fingerprint`) is stored in both checkpoints.

    Each epoch writes last.pt (weights, optimizer, state: the best epoch included) before model.pt: a kill
    between the two leaves a last.pt whose weights are the new best, and a resume rewrites model.pt from them,
    so model.pt, last.pt and metrics/train.json always agree whatever moment a run is killed at.
    """
    data = data or {}
    check_val_labels(val_set)
    criterion = loss_function(train_set.labels, t.pos_weight_cap).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, t.arch, t.lr_head, t.lr_backbone), weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, t.scheduler, t.epochs)
    val_loader = make_loader(val_set, t.batch_size, shuffle=False, workers=t.workers)
    state = fresh_state()
    if t.resume and (out / "last.pt").is_file():
        state = resume_state(out / "last.pt", t, data, model, optimizer, scheduler, device)
        print(f"train: resuming after epoch {state['epoch']} of {t.epochs}")
        best = read_checkpoint(out / "model.pt", device) if (out / "model.pt").is_file() else {}
        if state["best_epoch"] == state["epoch"] and best.get("epoch") != state["epoch"]:  # killed between the writes
            save_checkpoint(out / "model.pt", best_checkpoint(model, t, train_set, pretrained, data, state))
    with open_log(state["epoch"] > 0) as live:
        live.step = state["epoch"]  # dvclive's own resume restarts at 0 when one step was logged
        batches, eval_batches = Batches(device, t.augment, reuse=True), Batches(device, reuse=True)
        while state["epoch"] < t.epochs and state["bad_epochs"] < t.patience:
            epoch = state["epoch"]
            loader = make_loader(train_set, t.batch_size, shuffle=True, seed=t.seed * 1000 + epoch,
                                 workers=t.workers, drop_last=len(train_set) > t.batch_size)
            generator = torch.Generator().manual_seed(t.seed * 1000 + epoch)
            tr = train_one_epoch(model, loader, criterion, optimizer, batches, frozen, generator,
                                 desc=f"epoch {epoch + 1}/{t.epochs}")
            ev = evaluate(model, val_loader, criterion, eval_batches)
            for group in optimizer.param_groups:
                live.log_metric(f"lr/{group['name']}", group["lr"])
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(ev["mean_auc"])
            elif scheduler is not None:
                scheduler.step()
            live.log_metric("train/loss", tr["loss"])
            live.log_metric("val/loss", ev["loss"])
            live.log_metric("val/mean_auc", ev["mean_auc"])
            for name, auc in zip(CLASSES, ev["per_class_auc"], strict=True):
                if auc is not None:
                    live.log_metric(f"val/auc/{name}", auc)
            state["epoch"] += 1
            state["seconds"] += tr["seconds"]
            state["images"] += tr["images"]
            improved = ev["mean_auc"] > state["best_auc"]
            if improved:
                state.update(best_auc=ev["mean_auc"], best_epoch=state["epoch"], bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            save_checkpoint(out / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "scheduler": scheduler.state_dict() if scheduler else {},
                                              "state": state, "recipe": t.recipe(), "data": data})
            if improved:
                save_checkpoint(out / "model.pt", best_checkpoint(model, t, train_set, pretrained, data, state))
            print(f"epoch {state['epoch']}: train loss {tr['loss']:.4f}, val loss {ev['loss']:.4f}, "
                  f"val mean AUC {ev['mean_auc']:.4f}{' (best)' if improved else ''}, "
                  f"{tr['images'] / tr['seconds']:.0f} images/s")
            live.next_step()
    return state


def best_checkpoint(model: nn.Module, t: Train, train_set: PreparedImages, pretrained: str | None,
                    data: dict[str, str], state: dict[str, Any]) -> dict[str, Any]:
    """models/model.pt: the weights with everything predict needs to use them (classes, input size, normalisation)
    and what made them (recipe, pretrained weights, data)."""
    return {"state_dict": model.state_dict(), "arch": t.arch, "output_stride": t.output_stride,
            "classes": list(CLASSES), "image_size": train_set.image_size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "pretrained": pretrained, "params": t.recipe(), "data": data,
            "epoch": state["best_epoch"], "val_mean_auc": state["best_auc"]}

"""Train stage: the seed's fine-tuning recipe with its bugs fixed, logged with dvclive, resumable.

Fixed against the seed: `pos_weight` (not `weight`) in the loss, frozen layers' BatchNorm kept in
eval mode, validation patients disjoint from training (split stage). The best epoch by validation
mean ROC-AUC goes to models/model.pt. `train.resume: true` continues a killed run from
models/last.pt with the same result as an uninterrupted run: each epoch reseeds its shuffle and
augmentation from (seed, epoch), so nothing but the saved states carries over.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from dvclive import Live

from stages.common import PipelineError, atomic_path, cpu_count, load_params, run_main, write_json
from stages.data import IMAGENET_MEAN, IMAGENET_STD, PreparedImages, make_loader, read_labels
from stages.engine import SCHEDULERS, Batches, evaluate, make_scheduler, pick_device, positive_weights, train_one_epoch
from stages.model import build_model, freeze, param_groups
from stages.nih import CLASSES

PREPARED, SPLIT, MODELS = Path("data/prepared"), Path("data/split"), Path("models")
RESULT_KEYS = ("arch", "output_stride", "weights", "freeze", "epochs", "batch_size", "lr_head", "lr_backbone",
               "weight_decay", "scheduler", "pos_weight_cap", "patience", "augment", "seed")  # what shapes the model


def check_params(t: dict) -> None:
    """Refuse settings that would fail late (after minutes of training) or silently do nothing."""
    for key in ("lr_head", "lr_backbone"):
        if not isinstance(t.get(key), (int, float)) or t[key] <= 0:
            raise PipelineError(f"params.yaml train.{key}: {t.get(key)!r}; expected a positive number")
    for key in ("epochs", "batch_size", "patience"):
        if not isinstance(t.get(key), int) or t[key] < 1:
            raise PipelineError(f"params.yaml train.{key}: {t.get(key)!r}; expected a positive integer")
    if t.get("scheduler") not in SCHEDULERS:
        raise PipelineError(f"params.yaml train.scheduler: {t.get('scheduler')!r}; expected one of {SCHEDULERS}")
    if not isinstance(t.get("freeze", []), list):
        raise PipelineError(f"params.yaml train.freeze: {t.get('freeze')!r}; expected a list of module prefixes")


def save(path: Path, payload: dict) -> None:
    """Atomic torch.save; through a file object, so the zip's inner name is fixed and equal runs give equal bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section train)")
    args = parser.parse_args(argv)
    t = load_params("train", path=args.params)
    check_params(t)
    device = pick_device(t.get("device", "auto"))
    torch.set_num_threads(cpu_count())
    torch.manual_seed(t["seed"])
    output_stride = t.get("output_stride", 32)
    model = build_model(t["arch"], t.get("weights", "none"), len(CLASSES), output_stride)  # bad arch/stride: fails here
    frozen = freeze(model, t.get("freeze", []))
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)

    train_set = PreparedImages(PREPARED / "train.npy", read_labels(SPLIT / "train.csv"))
    val_set = PreparedImages(PREPARED / "val.npy", read_labels(SPLIT / "val.csv"))
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=positive_weights(train_set.labels, t.get("pos_weight_cap")))
    criterion = criterion.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, t["arch"], t["lr_head"], t["lr_backbone"]),
                                  weight_decay=t["weight_decay"])
    scheduler = make_scheduler(optimizer, t["scheduler"], t["epochs"])
    val_loader = make_loader(val_set, t["batch_size"], shuffle=False, workers=t.get("workers", 0))
    recipe = {k: t.get(k) for k in RESULT_KEYS}
    state = {"epoch": 0, "best_auc": -1.0, "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0, "images": 0}

    if t.get("resume") and (MODELS / "last.pt").is_file():
        last = torch.load(MODELS / "last.pt", map_location=device, weights_only=True)
        if last["recipe"] != recipe:
            raise PipelineError(f"{MODELS / 'last.pt'} was made with other train params; set train.resume: false")
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(last["scheduler"])
        state = last["state"]
        print(f"train: resuming after epoch {state['epoch']} of {t['epochs']}")
    image_size = int(train_set[[0]][0].shape[-1])
    batches = Batches(device, t.get("augment") or {})
    eval_batches = Batches(device)

    with Live(dir="dvclive", resume=state["epoch"] > 0, save_dvc_exp=False, dvcyaml=None) as live:
        live.step = state["epoch"]  # dvclive's own resume restarts at 0 when one step was logged
        while state["epoch"] < t["epochs"] and state["bad_epochs"] < t["patience"]:
            epoch = state["epoch"]
            loader = make_loader(train_set, t["batch_size"], shuffle=True, seed=t["seed"] * 1000 + epoch,
                                 workers=t.get("workers", 0), drop_last=len(train_set) > t["batch_size"])
            generator = torch.Generator().manual_seed(t["seed"] * 1000 + epoch)
            tr = train_one_epoch(model, loader, criterion, optimizer, batches, frozen, generator,
                                 desc=f"epoch {epoch + 1}/{t['epochs']}")
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
                save(MODELS / "model.pt", {
                    "state_dict": model.state_dict(), "arch": t["arch"], "output_stride": output_stride,
                    "classes": list(CLASSES), "image_size": image_size,
                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                    "params": recipe, "epoch": state["epoch"], "val_mean_auc": ev["mean_auc"],
                })
            else:
                state["bad_epochs"] += 1
            save(MODELS / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scheduler": scheduler.state_dict() if scheduler else {},
                                      "state": state, "recipe": recipe})
            print(f"epoch {state['epoch']}: train loss {tr['loss']:.4f}, val loss {ev['loss']:.4f}, "
                  f"val mean AUC {ev['mean_auc']:.4f}{' (best)' if improved else ''}, "
                  f"{tr['images'] / tr['seconds']:.0f} images/s")
            live.next_step()

    write_json("metrics/train.json", {
        "best_epoch": state["best_epoch"], "best_val_mean_auc": round(state["best_auc"], 6),
        "epochs_run": state["epoch"], "seconds": round(state["seconds"], 1),
        "images_per_second": round(state["images"] / max(state["seconds"], 1e-9), 1),
    })


if __name__ == "__main__":
    run_main(main)

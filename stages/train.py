"""Train stage: the original ChestX-ray14 ResNet50 fine-tuning recipe, its bugs fixed; logged with dvclive, resumable.

Fixed against that recipe: `pos_weight` (not `weight`) in the loss, frozen layers' BatchNorm kept in
eval mode, validation patients disjoint from training (split stage). Every epoch updates the resume
point models/resume/last.pt (outside DVC's outputs, so neither `dvc exp run` nor `dvc checkout` restores
an older one over it); `train.resume: true` continues a killed run from there with the same result as an
uninterrupted run. When training ends, the best epoch goes to models/model.pt, the per-epoch log to
dvclive/, the summary with its timings to reports/train.json and the best val mean AUC, its epoch and the
epochs run to metrics/train.json (timings vary by machine: no figure to compare experiments on), all from
the resume point. The checkpoint carries the out-of-distribution fit of its weights (`cxr14.model.ood`): a
Gaussian on the train images' penultimate features and its threshold on val.

`train.init` starts from a checkpoint (fine-tuning on this data); with `train.epochs: 0` that checkpoint is
copied to models/model.pt byte for byte and only scored on val: external validation, evaluating a model trained
elsewhere on these images (docs/datasets.md), with the out-of-distribution fit it came with (its training
images are what it knows). metrics/train.json names the model written (`model`: the first 8 hex digits of its MD5)
and the data it was trained and validated on (`data`).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from cxr14 import paths
from cxr14.data.loader import PreparedImages, make_loader, read_labels
from cxr14.data.nih import CLASSES
from cxr14.model.checkpoint import read_init, save_checkpoint
from cxr14.model.factory import build_model, freeze, imagenet_weights
from cxr14.model.inference import Batches, evaluate
from cxr14.model.ood import fit_ood
from cxr14.params import PARAMS_FILE, Train, load_params
from cxr14.runtime.devices import cpu_count, cpu_kernels, pick_device
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import atomic_path, file_digest, remove_leftovers, rounded, short_id, write_json
from cxr14.runtime.signals import Terminated, run_main
from cxr14.training.distributed import LAUNCHER, QUIET_EXIT, PeerLost, launch, start, stop, world_from_env
from cxr14.training.loop import (
    TrainingData,
    best_checkpoint,
    check_val_labels,
    check_world,
    fingerprint,
    fit,
    write_log,
)
from cxr14.training.loss import loss_function

TRAIN_METRICS = paths.METRICS / "train.json"
TRAIN_REPORT = paths.REPORTS / "train.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (section train)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    train = params.train
    world = world_from_env()
    cpu_kernels(train.cpu_kernels)
    try:  # settings and weights before any data: offline, a missing download fails within seconds
        device = pick_device(train.device)
        if train.epochs == 0:  # external validation: no processes to launch, nothing trained
            return use_as_is(train, device)
        if train.nproc > 1 and not under_torchrun():  # this process launches the others, and trains nothing itself
            check_gpus(device, train.nproc)
            if train.weights != "none" and train.init is None:
                imagenet_weights(train.arch, train.weights)  # offline, a missing download fails once, here
            check_world(PreparedImages(paths.PREPARED / "train.npy"), train, train.nproc)
            return launch(train.nproc, "stages.train", ["--params", str(args.params)], device.type == "cuda")
        if world.size > 1:
            device = start(world, device)
        torch.set_num_threads(cpu_count())
        torch.manual_seed(train.seed)
        # from train.init: its weights replace any others, so none are downloaded
        model = build_model(train.arch, "none" if train.init else train.weights, len(CLASSES), train.output_stride)
        frozen = freeze(model, train.freeze)
        init = None if train.init is None else read_init(train.init, model, train.arch, train.output_stride, CLASSES)
    except PipelineError as exc:  # name the params file for errors about a train.* value
        raise PipelineError(f"{args.params} {exc}" if str(exc).startswith("train.") else str(exc)) from None
    model.to(device)
    # what the weights started from (train.init: model.pt's data fingerprint holds its MD5)
    pretrained = train.init if init is not None else None if train.weights == "none" else \
        str(imagenet_weights(train.arch, train.weights))
    if world.main:
        for output in (paths.RESUME_POINT, paths.MODEL, paths.DVCLIVE, TRAIN_REPORT, TRAIN_METRICS):
            remove_leftovers(output)  # what a SIGKILLed run left, before anything else can fail
    train_set = PreparedImages(paths.PREPARED / "train.npy", read_labels(paths.SPLIT / "train.csv"))
    val_set = PreparedImages(paths.PREPARED / "val.npy", read_labels(paths.SPLIT / "val.csv"))
    if init is not None:
        train_set.require_size(init["image_size"], train.init)
    data = fingerprint([paths.PREPARED / "train.npy", paths.PREPARED / "val.npy", paths.SPLIT / "train.csv",
                        paths.SPLIT / "val.csv", *([Path(train.init)] if train.init is not None else [])])
    final = fit(model, frozen, TrainingData(train_set, val_set, data), train, device, paths.RESUME_POINT, world)
    if not world.main:
        return
    state = final.state
    # Derived from the resume point in this order; a kill between two of them is undone by any re-run.
    best = best_checkpoint(final.best_model, state, train, train_set.image_size, pretrained, data)
    best["ood"] = fit_best(best, device, train.batch_size)
    save_checkpoint(paths.MODEL, best)
    report = {"best_epoch": state.best_epoch, "best_val_mean_auc": rounded(state.best_auc),
              "epochs_run": state.epoch, "seconds": rounded(state.seconds, 1),
              "images_per_second": rounded(state.images / max(state.seconds, 1e-9), 1)}
    if init is not None:
        report["init"] = {"path": train.init, "model": short_id([data[train.init]])}
    finish(state.history, report, data)


def finish(history: list[dict[str, float]], report: dict, data: dict[str, str]) -> None:
    """What follows models/model.pt, whichever way it was made (trained, or `train.init` as it is): the log, the
    report and the headline, which names the model written and the data (train and val files) behind it."""
    write_log(history, paths.DVCLIVE)
    split_files = [d for f, d in data.items() if f.startswith((str(paths.PREPARED), str(paths.SPLIT)))]
    ids = {"model": short_id([file_digest(paths.MODEL)]), "data": short_id(split_files)}
    write_json(TRAIN_REPORT, {**report, **ids})
    write_json(TRAIN_METRICS, {"val_auc": report["best_val_mean_auc"], "best_epoch": report["best_epoch"],
                               "epochs_run": report["epochs_run"], **ids})


def use_as_is(train: Train, device: torch.device) -> None:
    """`train.epochs: 0`: the checkpoint `train.init` becomes models/model.pt byte for byte (a model trained
    elsewhere, validated on this data); its val mean AUC here is what metrics/train.json reports."""
    torch.set_num_threads(cpu_count())
    model = build_model(train.arch, "none", len(CLASSES), train.output_stride)
    try:
        ckpt = read_init(train.init, model, train.arch, train.output_stride, CLASSES)
    except PipelineError as exc:
        raise PipelineError(f"{exc} (train.epochs: 0)") from None
    for output in (paths.MODEL, paths.DVCLIVE, TRAIN_REPORT, TRAIN_METRICS):
        remove_leftovers(output)
    val_set = PreparedImages(paths.PREPARED / "val.npy", read_labels(paths.SPLIT / "val.csv"))
    val_set.require_size(ckpt["image_size"], train.init)
    check_val_labels(val_set)
    model.to(device).eval()
    labels = read_labels(paths.SPLIT / "train.csv")
    ev = evaluate(model, make_loader(val_set, train.batch_size, shuffle=False),
                  loss_function(labels, train.pos_weight_cap, train.label_smoothing).to(device),
                  Batches(device, reuse=True))
    with atomic_path(paths.MODEL) as tmp:
        shutil.copyfile(train.init, tmp)  # the same bytes: the same model id as where it was trained
    data = fingerprint([paths.PREPARED / "train.npy", paths.PREPARED / "val.npy", paths.SPLIT / "train.csv",
                        paths.SPLIT / "val.csv"])
    row = {"val/loss": ev["loss"], "val/mean_auc": ev["mean_auc"]}
    row.update({f"val/auc/{name}": auc for name, auc in zip(CLASSES, ev["per_class_auc"], strict=True)
                if auc is not None})
    report = {"best_epoch": 0, "best_val_mean_auc": rounded(ev["mean_auc"]), "epochs_run": 0, "seconds": 0.0,
              "images_per_second": None, "init": {"path": train.init, "model": short_id([file_digest(train.init)]),
                                                  "trained_epoch": ckpt.get("epoch"),
                                                  "trained_val_mean_auc": rounded(ckpt.get("val_mean_auc"))}}
    finish([row], report, data)
    print(f"train: {train.init} used as it is (train.epochs: 0) -> {paths.MODEL}; val mean AUC here "
          f"{report['best_val_mean_auc']}")


def fit_best(best: dict, device: torch.device, batch_size: int) -> dict:
    """The out-of-distribution fit of the best epoch's weights (eval mode, no augmentation): carried in the
    checkpoint, so evaluate, export and predict score images against the model they run."""
    model = build_model(best["arch"], "none", len(best["classes"]), best["output_stride"])
    model.load_state_dict(best["state_dict"])
    model.to(device).eval()
    images = [np.load(paths.PREPARED / f"{split}.npy", mmap_mode="r") for split in ("train", "val")]
    return fit_ood(model, *images, best["arch"], tuple(best["mean"]), tuple(best["std"]), batch_size)


def under_torchrun() -> bool:
    """Started by torchrun (a user's, or `launch`): its environment decides the processes, not train.nproc."""
    return any(os.environ.get(k) for k in ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK"))


def check_gpus(device: torch.device, nproc: int) -> None:
    """One process per GPU: more processes than visible GPUs would share one, or fail in NCCL far from here."""
    if device.type not in ("cuda", "cpu"):
        raise PipelineError(f"train.nproc: {nproc} on {device.type}; several processes run on CUDA GPUs or on the "
                            "CPU (set train.device: cpu, or train.nproc: 1)")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and nproc > count:
        raise PipelineError(f"train.nproc: {nproc}, but {count} CUDA device(s) are visible here "
                            f"(CUDA_VISIBLE_DEVICES {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); expected at "
                            f"most {count}")


def worker(argv: list[str] | None = None) -> None:
    """One of several processes (or the only one): a rank stopped by another's failure exits quietly when
    started by `launch`, which reports the cause once. The process group is left cleanly, except after a lost
    peer or a signal, when leaving it could wait on the lost one."""
    leave = True
    try:
        main(argv)
    except PeerLost:
        leave = False
        if os.environ.get(LAUNCHER):
            raise SystemExit(QUIET_EXIT) from None
        raise
    except (KeyboardInterrupt, Terminated):
        leave = False
        raise
    finally:
        if leave:
            stop()


if __name__ == "__main__":
    run_main(worker, quiet_signals=bool(os.environ.get(LAUNCHER)))  # launched ranks: the launcher says it once

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
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from cxr14 import paths
from cxr14.data.loader import PreparedImages, read_labels
from cxr14.data.nih import CLASSES
from cxr14.model.checkpoint import save_checkpoint
from cxr14.model.factory import build_model, freeze, imagenet_weights
from cxr14.model.ood import fit_ood
from cxr14.params import PARAMS_FILE, load_params
from cxr14.runtime.devices import cpu_count, cpu_kernels, pick_device
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import remove_leftovers, rounded, write_json
from cxr14.runtime.signals import Terminated, run_main
from cxr14.training.distributed import LAUNCHER, QUIET_EXIT, PeerLost, launch, start, stop, world_from_env
from cxr14.training.loop import TrainingData, best_checkpoint, check_world, fingerprint, fit, write_log

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
        if train.nproc > 1 and not under_torchrun():  # this process launches the others, and trains nothing itself
            check_gpus(device, train.nproc)
            if train.weights != "none":
                imagenet_weights(train.arch, train.weights)  # offline, a missing download fails once, here
            check_world(PreparedImages(paths.PREPARED / "train.npy"), train, train.nproc)
            return launch(train.nproc, "stages.train", ["--params", str(args.params)], device.type == "cuda")
        if world.size > 1:
            device = start(world, device)
        torch.set_num_threads(cpu_count())
        torch.manual_seed(train.seed)
        model = build_model(train.arch, train.weights, len(CLASSES), train.output_stride)
        frozen = freeze(model, train.freeze)
    except PipelineError as exc:  # name the params file for errors about a train.* value
        raise PipelineError(f"{args.params} {exc}" if str(exc).startswith("train.") else str(exc)) from None
    model.to(device)
    pretrained = None if train.weights == "none" else str(imagenet_weights(train.arch, train.weights))
    if world.main:
        for output in (paths.RESUME_POINT, paths.MODEL, paths.DVCLIVE, TRAIN_REPORT, TRAIN_METRICS):
            remove_leftovers(output)  # what a SIGKILLed run left, before anything else can fail
    train_set = PreparedImages(paths.PREPARED / "train.npy", read_labels(paths.SPLIT / "train.csv"))
    val_set = PreparedImages(paths.PREPARED / "val.npy", read_labels(paths.SPLIT / "val.csv"))
    data = fingerprint([paths.PREPARED / "train.npy", paths.PREPARED / "val.npy", paths.SPLIT / "train.csv",
                        paths.SPLIT / "val.csv"])
    final = fit(model, frozen, TrainingData(train_set, val_set, data), train, device, paths.RESUME_POINT, world)
    if not world.main:
        return
    state = final.state
    # Derived from the resume point in this order; a kill between two of them is undone by any re-run.
    best = best_checkpoint(final.best_model, state, train, train_set.image_size, pretrained, data)
    best["ood"] = fit_best(best, device, train.batch_size)
    save_checkpoint(paths.MODEL, best)
    write_log(state.history, paths.DVCLIVE)
    report = {"best_epoch": state.best_epoch, "best_val_mean_auc": rounded(state.best_auc),
              "epochs_run": state.epoch, "seconds": rounded(state.seconds, 1),
              "images_per_second": rounded(state.images / max(state.seconds, 1e-9), 1)}
    write_json(TRAIN_REPORT, report)
    write_json(TRAIN_METRICS, {"val_auc": report["best_val_mean_auc"], "best_epoch": state.best_epoch,
                               "epochs_run": state.epoch})


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

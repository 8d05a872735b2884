"""The training loop: epochs, validation, early stopping, one resume point, exact resume.

A killed run continues from its resume point with the same result as an uninterrupted one: each epoch
reseeds its shuffle and augmentation from (train.seed, epoch), so nothing but the saved states carries over.

During training only the resume point is written: one file (`save_checkpoint`, atomic) holding the latest
weights and optimizer, the best epoch's weights, the per-epoch log and what the run trained on. The stage's
outputs (model.pt, dvclive/, metrics/train.json) are derived from it when the run ends, so they cannot
disagree with each other, and a run killed at any moment leaves the previous outputs as they were.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr14.data.loader import IMAGENET_MEAN, IMAGENET_STD, PreparedImages, make_loader
from cxr14.data.nih import CLASSES
from cxr14.evaluation.metrics import has_both
from cxr14.model.checkpoint import read_checkpoint, save_checkpoint
from cxr14.model.factory import param_groups
from cxr14.model.inference import Batches, evaluate, infer, scores
from cxr14.params import Train
from cxr14.runtime.errors import PipelineError, warn
from cxr14.runtime.outputs import ensure_space, file_digest, replace_dir
from cxr14.training.distributed import World, agree, all_sum, blocks, gather_rows, peers_watched, same_buffers
from cxr14.training.loss import loss_function
from cxr14.training.schedules import make_scheduler
from cxr14.training.steps import train_one_epoch


@dataclass
class TrainState:
    """Where a run stands after its last finished epoch: what the resume point carries besides the weights and
    optimizer, and what model.pt's metadata, train.json and the dvclive log are derived from."""

    epoch: int = 0  # epochs finished
    best_auc: float = -1.0  # the best val mean ROC-AUC so far (-1: no epoch yet)
    best_epoch: int = 0  # the epoch (1-based) that reached it
    bad_epochs: int = 0  # epochs since then: early stopping ends the run at train.patience
    seconds: float = 0.0  # time in the training passes, validation excluded
    images: int = 0  # images those passes trained on
    history: list[dict[str, float]] = field(default_factory=list)  # each epoch's logged metrics, by name

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as the resume point stores it (it is loaded with `weights_only=True`: no classes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Any, where: Path | str) -> TrainState:
        """The state a resume point stored; one line naming the file when it holds something else."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(saved, dict) or sorted(saved) != sorted(names):
            found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise PipelineError(f"{where}: state holds {found}; expected the keys {names}; set train.resume: false")
        return cls(**saved)


@dataclass(frozen=True)
class TrainingData:
    """The splits a run trains and validates on, and their `fingerprint` (file -> MD5), which a resume point
    must match."""

    train: PreparedImages
    val: PreparedImages
    digests: dict[str, str] = field(default_factory=dict)


@dataclass
class Trained:
    """What `fit` hands back: the final state and the best epoch's weights (on the CPU)."""

    state: TrainState
    best_model: dict[str, torch.Tensor]


def fingerprint(files: list[Path]) -> dict[str, str]:
    """MD5 of each file a run trains on (prepared arrays, split tables): what a resume point must match.

    Read in 8 MB chunks, so memory stays flat whatever the arrays' size; once per run.
    """
    return {str(path): file_digest(path) for path in files}


def check_resume_point(path: Path, point: dict[str, Any], t: Train, data: dict[str, str]) -> None:
    """The recipe and the data must be what the resume point was made with: one from other data (another
    split seed, another image size) would hand back a model trained on something else."""
    if point.get("recipe") != t.recipe():
        raise PipelineError(f"{path} was made with other train params; set train.resume: false")
    changed = [f for f, digest in data.items() if point.get("data", {}).get(f) != digest]
    if changed:
        raise PipelineError(f"{path} was trained on other data ({changed[0]} differs, {len(changed)} file(s) in all); "
                            "set train.resume: false")


def check_val_labels(val: PreparedImages) -> None:
    """Early stopping and the best checkpoint need a val mean AUC: at least one class with both outcomes."""
    labels = val.labels
    if labels is None or not any(has_both(labels[:, k]) for k in range(labels.shape[1])):
        raise PipelineError(f"{val.path}: no class has both positive and negative labels among these {len(val)} val "
                            "images, so the val mean ROC-AUC that picks the best epoch is undefined; raise "
                            "split.val_fraction")


def tensor_bytes(tensors: Any) -> int:
    """Bytes of these tensors: what a checkpoint of them takes on disk, within a few KB."""
    return sum(t.numel() * t.element_size() for t in tensors)


def cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def check_world(train_set: PreparedImages, t: Train, size: int) -> None:
    """Several processes split every batch equally (`train.batch_size` is global): each batch must be whole."""
    if t.batch_size % size:  # train.nproc is checked with the params; torchrun's WORLD_SIZE here
        raise PipelineError(f"train.batch_size: {t.batch_size}; expected a multiple of the {size} processes "
                            "torchrun started: the batch is global, each process takes an equal share")
    if size > 1 and len(train_set) < t.batch_size:
        raise PipelineError(f"{train_set.path}: {len(train_set)} training images, fewer than train.batch_size "
                            f"({t.batch_size}), which {size} processes share; lower train.batch_size or use "
                            "train.nproc: 1")


def validate(model: nn.Module, val_set: PreparedImages, criterion: nn.Module, batches: Batches, t: Train,
             world: World) -> dict[str, Any]:
    """Val loss and AUCs, once per epoch: one process scores the whole split; several score a contiguous block
    each and gather the probabilities, so every rank computes the same AUC and takes the same decisions."""
    if world.size == 1:
        return evaluate(model, make_loader(val_set, t.batch_size, shuffle=False, workers=t.workers), criterion,
                        batches)
    rows = blocks(len(val_set), world.size)[world.rank]
    loader = make_loader(val_set, t.batch_size, shuffle=False, workers=t.workers, rows=rows)
    probs, _, loss = infer(model, loader, criterion, batches)
    if len(probs) == 0:
        probs = np.zeros((0, val_set.labels.shape[1]), np.float32)
    probs = gather_rows(torch.from_numpy(probs), len(val_set), world).numpy()
    return scores(probs, val_set.labels, all_sum([loss], world)[0])


def wrap(model: nn.Module, t: Train, device: torch.device, world: World) -> nn.Module:
    """What the training steps run: the model itself, in DDP with several processes, compiled with train.compile.

    Trainable BatchNorm is synchronised across GPUs (SyncBatchNorm); PyTorch has it for CUDA only, so on the
    CPU each process normalises over its own share of the batch. Frozen BatchNorm is in eval mode either way.
    """
    runner = model
    if world.size > 1:
        if device.type == "cuda":
            runner = nn.SyncBatchNorm.convert_sync_batchnorm(runner)
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda"
                                                     else None)
    if t.compile:
        runner = torch.compile(runner)
    return runner


@dataclass
class Run:
    """What every epoch of one run works with, built once by `start_run`."""

    model: nn.Module
    frozen: list[str]
    data: TrainingData
    t: Train
    world: World
    resume_file: Path
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler, ReduceLROnPlateau, or None
    per_step: bool  # the scheduler steps after every optimizer step (one-cycle), not once per epoch
    ema: torch.optim.swa_utils.AveragedModel | None

    @property
    def part(self) -> tuple[int, int]:
        return self.world.rank, self.world.size

    @property
    def scored(self) -> nn.Module:
        """What is validated and saved: the weights' moving average when there is one, else the model."""
        return self.ema.module if self.ema is not None else self.model


def fit(model: nn.Module, frozen: list[str], data: TrainingData, t: Train, device: torch.device,
        resume_file: Path, world: World | None = None) -> Trained:
    """Train per `t`, writing the resume point `resume_file` after every epoch; return the final state.

    With several processes (`world`), each runs this with the same arguments; rank 0 alone writes.
    The resume point holds `model`, `optimizer`, `ema`, `scheduler` (latest epoch), `best_model` (the best
    epoch's weights, or None when that is the latest), `state` (`TrainState.to_dict`), `recipe` and `data`
    (`data.digests`). With `t.resume`, training continues from an existing one after checking both.
    """
    world = world or World()
    check_val_labels(data.val)
    check_world(data.train, t, world.size)
    # channels_last (NHWC): cuDNN's and oneDNN's fastest layout; the model here, every batch below (Batches)
    model.to(memory_format=torch.channels_last)
    run = start_run(model, frozen, data, t, device, world, resume_file)
    state, best = TrainState(), None
    if t.resume and resume_file.is_file():
        state, best = resume(run, device)
    elif t.resume and world.main:
        warn(f"train.resume: no resume point {resume_file} (a run writes it after its first epoch, in the folder "
             "it runs in); training from the first epoch")
    if world.main:
        make_room(resume_file, model, t)
    agree("data", data.digests, world)
    agree("resume point", (state.epoch, state.best_auc), world)
    batches = Batches(device, t.augment, reuse=True, part=run.part, channels_last=True)
    eval_batches = Batches(device, reuse=True, channels_last=True)
    runner = wrap(model, t, device, world)
    while state.epoch < t.epochs and state.bad_epochs < t.patience:
        best = run_epoch(run, runner, batches, eval_batches, state, best)
    return Trained(state, best)


def start_run(model: nn.Module, frozen: list[str], data: TrainingData, t: Train, device: torch.device,
              world: World, resume_file: Path) -> Run:
    """The loss, optimizer, schedule and moving average of a run, as a fresh run starts them."""
    criterion = loss_function(data.train.labels, t.pos_weight_cap, t.label_smoothing).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, t.arch, t.lr_head, t.lr_backbone), weight_decay=t.weight_decay)
    steps = len(make_loader(data.train, t.batch_size, shuffle=True, seed=0, workers=0,
                            drop_last=len(data.train) > t.batch_size, part=(world.rank, world.size)))
    scheduler = make_scheduler(optimizer, t.scheduler, t.epochs, steps)
    per_step = isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    return Run(model, frozen, data, t, world, resume_file, criterion, optimizer, scheduler, per_step,
               moving_average(model, t.ema))


def resume(run: Run, device: torch.device) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Load the resume point into the run's model, average, optimizer and schedule; its state and best weights."""
    point = read_checkpoint(run.resume_file, device)
    check_resume_point(run.resume_file, point, run.t, run.data.digests)
    run.model.load_state_dict(point["model"])
    if run.ema is not None:
        run.ema.load_state_dict(point["ema"])
    run.optimizer.load_state_dict(point["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(point["scheduler"])
    state = TrainState.from_dict(point["state"], run.resume_file)
    best = ({k: v.to("cpu") for k, v in point["best_model"].items()} if point["best_model"] is not None
            else cpu_copy(run.scored))  # on the CPU, as an uninterrupted run keeps it: model.pt's bytes are equal
    if run.world.main:
        print(f"train: resuming from {run.resume_file} after epoch {state.epoch} of {run.t.epochs}")
    return state, best


def make_room(resume_file: Path, model: nn.Module, t: Train) -> None:
    """Stop now rather than epochs later when the disk cannot hold what the run will write.

    A resume point holds up to two sets of weights (latest, best) and AdamW's two moments; each new one is
    written beside the old before replacing it, and model.pt (one set) beside its old one at the end.
    """
    weights = tensor_bytes(model.state_dict().values())
    trainable = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    point = (2 + (t.ema > 0)) * weights + 2 * trainable  # latest, best (and the average); AdamW's 2 moments
    ensure_space(resume_file, 2 * point - (resume_file.stat().st_size if resume_file.is_file() else 0) + weights)
    keep_out_of_git(resume_file.parent)


def run_epoch(run: Run, runner: nn.Module, batches: Batches, eval_batches: Batches, state: TrainState,
              best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """One epoch: train, validate, step the schedule, update `state`, and (rank 0) write the resume point.
    Returns the best epoch's weights so far."""
    t, world, epoch = run.t, run.world, state.epoch
    loader = make_loader(run.data.train, t.batch_size, shuffle=True, seed=t.seed * 1000 + epoch,
                         workers=t.workers, drop_last=len(run.data.train) > t.batch_size, part=run.part)
    generator = torch.Generator().manual_seed(t.seed * 1000 + epoch)
    with peers_watched(world):  # DDP's gradient all-reduce: a rank that died is one line on the others
        tr = train_one_epoch(runner, loader, run.criterion, run.optimizer, batches, run.frozen, generator,
                             desc=f"epoch {epoch + 1}/{t.epochs}", disable=not world.main,
                             after_step=lambda: after_step(run.ema, run.model, run.scheduler if run.per_step else None))
    if world.size > 1:  # the whole batch's loss and images, as one process counts them
        loss_sum, images = all_sum([tr["loss"] * tr["images"], tr["images"]], world)
        tr.update(loss=loss_sum / max(images, 1), images=int(images))
    same_buffers(run.scored, world)
    ev = validate(run.scored, run.data.val, run.criterion, eval_batches, t, world)
    row = {f"lr/{group['name']}": group["lr"] for group in run.optimizer.param_groups}  # the rates this epoch used
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(ev["mean_auc"])
    elif run.scheduler is not None and not run.per_step:
        run.scheduler.step()
    row.update({"train/loss": tr["loss"], "val/loss": ev["loss"], "val/mean_auc": ev["mean_auc"]})
    row.update({f"val/auc/{name}": auc for name, auc in zip(CLASSES, ev["per_class_auc"], strict=True)
                if auc is not None})
    state.history.append(row)
    state.epoch += 1
    state.seconds += tr["seconds"]
    state.images += tr["images"]
    improved = ev["mean_auc"] > state.best_auc
    if improved:
        state.best_auc, state.best_epoch, state.bad_epochs = ev["mean_auc"], state.epoch, 0
        best = cpu_copy(run.scored)
    else:
        state.bad_epochs += 1
    if world.main:
        save_resume_point(run, state, None if improved else best)
        print(f"epoch {state.epoch}: train loss {tr['loss']:.4f}, val loss {ev['loss']:.4f}, "
              f"val mean AUC {ev['mean_auc']:.4f}{' (best)' if improved else ''}, "
              f"{tr['images'] / tr['seconds']:.0f} images/s")
    return best


def save_resume_point(run: Run, state: TrainState, best_model: dict[str, torch.Tensor] | None) -> None:
    """The resume point (`fit` lists what it holds); `best_model` None when the latest epoch is the best."""
    save_checkpoint(run.resume_file, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "scheduler": run.scheduler.state_dict() if run.scheduler else {},
        "best_model": best_model, "state": state.to_dict(), "recipe": run.t.recipe(), "data": run.data.digests})


def after_step(ema: torch.optim.swa_utils.AveragedModel | None, model: nn.Module,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
    """What follows every optimizer step: the weights' moving average, a per-step schedule."""
    if ema is not None:
        ema.update_parameters(model)
    if scheduler is not None:
        scheduler.step()


def moving_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics (None when `decay` is 0): on small,
    noisy data it smooths out the last steps' noise, and it is what gets validated and saved."""
    if decay == 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def keep_out_of_git(folder: Path) -> None:
    """The resume point is scratch, hundreds of MB: a `.gitignore` of `*` keeps it out of any commit, and so out of
    what `dvc exp run` records, whatever the project's own .gitignore says."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / ".gitignore").is_file():
        (folder / ".gitignore").write_text("# written by the train stage: the resume point is not versioned\n*\n")


def best_checkpoint(best_model: dict[str, torch.Tensor], state: TrainState, t: Train, image_size: int,
                    pretrained: str | None, data: dict[str, str]) -> dict[str, Any]:
    """models/model.pt: the weights with everything predict needs to use them (classes, input size, normalisation)
    and what made them (recipe, pretrained weights, data)."""
    return {"state_dict": best_model, "arch": t.arch, "output_stride": t.output_stride,
            "classes": list(CLASSES), "image_size": image_size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "pretrained": pretrained, "params": t.recipe(), "data": data,
            "epoch": state.best_epoch, "val_mean_auc": state.best_auc}


def write_log(history: list[dict[str, float]], folder: Path) -> None:
    """The per-epoch log as dvclive writes it (plots/metrics/<name>.tsv, metrics.json), replayed from the resume
    point into a new folder that replaces `folder` whole: a resumed run's log has each epoch once."""
    from dvclive import Live  # imported here: slow to import, and only the run's end needs it

    with replace_dir(folder) as tmp:
        with Live(dir=str(tmp), save_dvc_exp=False, dvcyaml=None) as live:
            for row in history:
                for name, value in row.items():
                    live.log_metric(name, value)
                live.next_step()

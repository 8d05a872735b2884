"""Training data from prepared arrays: whole batches read from a memory-mapped uint8 .npy.

Fetching a batch with one sorted fancy-index on the memmap (instead of 64 `__getitem__` calls
and a collate) is what lets one core keep the model fed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from cxr14.data.arrays import open_array
from cxr14.data.nih import CLASSES
from cxr14.data.splits import read_split_table
from cxr14.runtime.errors import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_labels(table: Path | str) -> np.ndarray:
    """(N, 14) float32 labels of a split table, in CLASSES order."""
    return read_split_table(table, CLASSES).to_numpy(dtype=np.float32)


class PreparedImages(Dataset):
    """A prepared split, indexed by lists of rows: `ds[[3, 7, 1]]` -> (uint8 images (3,1,H,W), labels (3,14)),
    in the order asked for.

    Attributes: `path` (the .npy file), `labels` ((N, 14) float32 or None), `image_size` (side in pixels).
    """

    def __init__(self, array: Path | str, labels: np.ndarray | None = None) -> None:
        self.path = Path(array)
        shape = open_array(self.path).shape
        if labels is not None and len(labels) != shape[0]:
            raise PipelineError(f"{self.path}: {shape[0]} images but {len(labels)} label rows; re-run prepare")
        self.length, self.image_size = shape[0], shape[1]
        self.labels = labels
        self._array: np.ndarray | None = None  # opened lazily, once per DataLoader worker

    def __len__(self) -> int:
        return self.length

    def require_size(self, size: int, model: Path | str = "the model") -> None:
        """A model sees only the input size it was trained at: other arrays would silently change every score."""
        if self.image_size != size:
            raise PipelineError(f"{self.path}: images are {self.image_size} px, not {size} px as {model} was "
                                "trained; run dvc repro")

    def __getstate__(self) -> dict:
        """Pickled by path (DataLoader workers started by spawn, as on macOS and Windows): an opened memory map
        would pickle its pixels."""
        return {**self.__dict__, "_array": None}

    def __getitem__(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._array is None:
            self._array = open_array(self.path)
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # read the memory map in file order, hand rows back as asked
        images = np.empty((len(rows), *self._array.shape[1:]), dtype=np.uint8)
        images[order] = self._array[rows[order]]
        labels = torch.from_numpy(self.labels[rows]) if self.labels is not None else torch.empty(len(rows), 0)
        return torch.from_numpy(images)[:, None], labels


class SortedBatchSampler(BatchSampler):
    """Batches whose rows are in file order: a shuffled batch is the same set of images, read sequentially
    from the memory map (and each image meets the same augmentation draw on every machine).

    With `part` = (index, parts), each batch is cut in `parts` equal contiguous slices and slice `index` is
    yielded: one process of several (DDP) reads its share of the batch one process would read.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool, part: tuple[int, int] = (0, 1)) -> None:  # noqa: ANN001
        super().__init__(sampler, batch_size, drop_last)
        self.part = part

    def __iter__(self):  # noqa: ANN204 - BatchSampler's own signature
        index, parts = self.part
        for batch in super().__iter__():
            share = len(batch) // parts
            yield sorted(batch)[index * share:(index + 1) * share] if parts > 1 else sorted(batch)


def make_loader(
    dataset: PreparedImages, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0, drop_last: bool = False,
    part: tuple[int, int] = (0, 1), rows: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader yielding whole batches; seeded so the shuffle order is reproducible. `part`: this process's
    share of each batch (`SortedBatchSampler`); `rows`: only these rows, in order (not with `shuffle`).

    `workers` > 0 are forked (torch's default on Linux) for one pass and stopped at its end: once in CI a DDP
    rank's worker hung in CPython 3.11's after-fork clean-up, forked while other Python threads ran (tqdm's
    monitor, now off: `cxr14.runtime.progress`; and the queue feeder of the previous loader's workers, which
    persistent workers kept alive into the next fork, measured: train makes a loader per epoch and per
    validation; `feeders_stopped`). Gloo's threads are native, not Python's. Workers from a fork server were
    tried and were worse: a process making loaders hung in their IPC (the pid hand-over, a shared tensor's fd)
    in several of ~30 SIGTERMs, where forked workers hung in none seen."""
    if shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset) if rows is None else rows
    return Loader(
        dataset,
        sampler=SortedBatchSampler(sampler, batch_size, drop_last, part),
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )


class Loader(DataLoader):
    """A DataLoader whose workers, forked as a pass begins, find no queue feeder thread of an earlier loader
    alive (`feeders_stopped`)."""

    def __iter__(self) -> Any:
        if self.num_workers > 0:
            feeders_stopped()
        return super().__iter__()


def feeders_stopped(timeout: float = 2.0) -> None:
    """Wait for the queue feeder threads of loaders whose pass has ended (their queues are closed, so the threads
    are on their way out) to exit, so that the next pass forks its workers with no other Python thread alive.
    Without this, one fork in four of a tiny two-epoch run still saw one (measured). A loader left mid-pass keeps
    its thread: waited for `timeout` seconds, then the fork goes ahead."""
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(timeout)


def to_model_input(
    images: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    out: torch.Tensor | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 (B,1,H,W) -> float (B,3,H,W) normalised as the backbone's pretraining expects.

    One fused pass (addcmul), written in `memory_format` (channels_last for training: no second copy). On CPU,
    pass a reused `out` buffer: a fresh 40 MB tensor per batch costs more in page faults than the arithmetic.
    """
    scale = 1.0 / (255.0 * torch.tensor(std, device=images.device))
    bias = -torch.tensor(mean, device=images.device) / torch.tensor(std, device=images.device)
    shape = (images.shape[0], len(mean), *images.shape[2:])
    if (out is None or out.shape != shape or out.device != images.device
            or not out.is_contiguous(memory_format=memory_format)):
        out = torch.empty(shape, device=images.device, memory_format=memory_format)
    return torch.addcmul(bias.view(1, -1, 1, 1), images, scale.view(1, -1, 1, 1), out=out)


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    hflip: float = 0.0,
    rotate: float = 0.0,
    crop_scale: tuple[float, float] = (1.0, 1.0),
    part: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Random flip, rotation (degrees) and resized crop (area fraction range) of a float (B,1,H,W) batch.

    One affine resampling for the whole batch (grid_sample), so augmentation costs one pass on any
    device instead of a PIL round trip per sample. The same size comes out; borders fill with 0.
    With `part` = (index, parts), `images` is slice `index` of a batch `parts` times its size: the draws are
    made for the whole batch and the slice's kept, so each image is augmented as in one process.
    """
    n = images.shape[0]
    if hflip <= 0 and rotate <= 0 and crop_scale[0] >= 1.0:
        return images
    index, parts = part
    u = torch.rand(n * parts, 5, generator=generator)[index * n:(index + 1) * n].to(images.device)
    flip = torch.where(u[:, 0] < hflip, -1.0, 1.0)
    angle = torch.deg2rad((u[:, 1] * 2 - 1) * rotate)
    side = torch.sqrt(crop_scale[0] + u[:, 2] * (crop_scale[1] - crop_scale[0]))  # crop side / image side
    shift = (u[:, 3:5] * 2 - 1) * (1 - side[:, None])  # crop centre stays inside the image
    cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

"""Prepared arrays: every image decoded once into one memory-mappable uint8 .npy per split.

The original ChestX-ray14 recipe decoded a 1024x1024 PNG per sample per epoch, so decoding, not the model,
set the pace of training; training from `data/prepared/<split>.npy` reads whole batches from a memory map
instead. Decoding runs in worker processes and streams rows straight to disk in split-table order, so
memory stays flat whatever the dataset size.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from cxr14.data.images import decode_gray
from cxr14.runtime.errors import PipelineError, warn
from cxr14.runtime.processes import exit_with, process_context
from cxr14.runtime.progress import progress
from cxr14.runtime.signals import raise_pending, signals_deferred

CHUNK = 4  # images per task sent to a worker
IN_FLIGHT = 4 * CHUNK  # images per worker decoded ahead of the writer, at most


Decoded = tuple[int, np.ndarray | str, list[str]]  # (row, image or error text, warnings)


def _decode(job: tuple[int, str, int]) -> Decoded:
    """(row, path, size) -> (row, image or error text, warnings): errors and warnings travel back from workers
    as text, printed by the parent between progress-bar updates rather than into the bar."""
    row, path, size = job
    try:
        return row, *decode_gray(path, size)
    except ValueError as exc:
        return row, str(exc), []


def _decode_chunk(jobs: list[tuple[int, str, int]]) -> list[Decoded]:
    """Worker: a few images per task, so the inter-process round trip is paid per chunk, not per image."""
    return [_decode(job) for job in jobs]


def decoded_rows(paths: Sequence[str], size: int, workers: int) -> Iterator[Decoded]:
    """Yield (row, image-or-error, warnings) in row order, decoding in `workers` processes (1 = in-process).

    At most `IN_FLIGHT` images per worker are queued or decoded but not yet written, so memory
    stays bounded even if the disk is slower than decoding. A ProcessPoolExecutor rather than
    multiprocessing.Pool: leaving a Pool early (a bad image) goes through Pool.terminate(), which
    can kill a worker holding the result queue's lock and then wait on that lock forever
    (cpython#96995), and a
    Pool waits forever for a worker the kernel killed where the executor raises BrokenProcessPool.
    """
    jobs = [(i, str(p), size) for i, p in enumerate(paths)]
    if workers <= 1 or len(paths) < 2 * workers:
        yield from map(_decode, jobs)
        return
    chunks = iter([jobs[i : i + CHUNK] for i in range(0, len(jobs), CHUNK)])
    # A kill (SIGTERM, Ctrl-C) is acted on between chunks, never inside the executor's locks (signals_deferred).
    with signals_deferred(), ProcessPoolExecutor(workers, mp_context=process_context(["cxr14.data.images"]),
                                                 initializer=exit_with, initargs=(os.getpid(),)) as pool:
        ahead = IN_FLIGHT * workers // CHUNK  # chunks submitted but not yet written
        pending = deque((c, pool.submit(_decode_chunk, c)) for c in itertools.islice(chunks, ahead))
        try:
            while pending:
                raise_pending()
                chunk, future = pending.popleft()
                try:
                    done = future.result()
                    # a worker killed after finishing this chunk breaks the pool here, at the next submit
                    pending.extend((c, pool.submit(_decode_chunk, c)) for c in itertools.islice(chunks, 1))
                except BrokenProcessPool:  # which image killed it is unknown: the first not yet written is named
                    yield chunk[0][0], ("a decoding worker process died at or after this image (out of memory?);"
                                        " try fewer prepare.workers"), []
                    return
                yield from done
        finally:
            for _, future in pending:
                future.cancel()  # leaving early: the pool shuts down after the chunks already running


def open_array(path: Path | str) -> np.ndarray:
    """A prepared array, memory-mapped read-only: (images, size, size) uint8, as `write_array` writes it.

    Checked on opening so that a missing, truncated or foreign file stops a stage with one line naming it,
    rather than failing later inside a DataLoader worker or silently training on other pixels.
    """
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:  # a 0-byte file is an EOFError
        raise PipelineError(f"{path}: cannot open prepared array ({exc or 'empty file'}); run the prepare "
                            "stage") from None
    if array.dtype != np.uint8:
        raise PipelineError(f"{path}: {array.dtype} pixels; expected uint8 from the prepare stage")
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise PipelineError(f"{path}: shape {array.shape}; expected (images, size, size) from the prepare stage")
    return array


def write_array(paths: Sequence[str], size: int, workers: int, out: Path, table: Path | str, desc: str = "") -> None:
    """Stream decoded images into `out` as an (N, size, size) uint8 .npy (callers make it atomic)."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(paths), size, size)}
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        # closing(): on a bad image the workers stop here, before the error propagates.
        rows = contextlib.closing(decoded_rows(paths, size, workers))
        with rows as results, progress(total=len(paths), desc=desc or Path(out).stem, unit="img") as bar:
            for row, image, notes in results:
                for note in notes:
                    bar.clear()
                    warn(f"{paths[row]}: {note}")
                if isinstance(image, str):
                    # Row numbers are file lines of the split table (header = line 1).
                    raise PipelineError(f"{paths[row]} ({table} line {row + 2}): {image}")
                f.write(image.tobytes())
                bar.update()
        f.flush()

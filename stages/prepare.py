"""Prepare stage: decode every image once into one memory-mappable uint8 array per split.

The seed decoded a 1024x1024 PNG per sample per epoch (~50 images/s per core); training from
`data/prepared/<split>.npy` reads thousands of images/s. Decoding runs in worker processes and
streams rows straight to disk in split-table order, so memory stays flat whatever the dataset size.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import PipelineError, atomic_path, cpu_count, load_params, progress, run_main
from stages.nih import load_gray

SPLIT_DIR = Path("data/split")
OUT_DIR = Path("data/prepared")
SPLITS = ("train", "val", "test")
CHUNK = 4  # images per task sent to a worker
IN_FLIGHT = 4 * CHUNK  # images per worker decoded ahead of the writer, at most


def _decode(job: tuple[int, str, int]) -> tuple[int, np.ndarray | str]:
    """Worker: (row, path, size) -> (row, image) or (row, error text); errors travel back as text."""
    row, path, size = job
    try:
        return row, load_gray(path, size)
    except ValueError as exc:
        return row, str(exc)


def decoded_rows(paths: Sequence[str], size: int, workers: int) -> Iterator[tuple[int, np.ndarray | str]]:
    """Yield (row, image-or-error) in row order, decoding in `workers` processes (1 = in-process).

    At most `IN_FLIGHT` images per worker are queued or decoded but not yet written, so memory
    stays bounded even if the disk is slower than decoding.
    """
    if workers <= 1 or len(paths) < 2 * workers:
        yield from map(_decode, ((i, str(p), size) for i, p in enumerate(paths)))
        return
    slots, stop = threading.Semaphore(IN_FLIGHT * workers), threading.Event()

    def jobs() -> Iterator[tuple[int, str, int]]:
        for i, p in enumerate(paths):
            slots.acquire()  # runs in the pool's feeder thread: it waits here, not the writer
            if stop.is_set():
                return
            yield i, str(p), size

    context = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers) as pool:
        try:
            for result in pool.imap(_decode, jobs(), chunksize=CHUNK):
                slots.release()
                yield result
        finally:
            stop.set()
            for _ in range(IN_FLIGHT * workers):
                slots.release()  # unblock the feeder so the pool can shut down


def write_array(paths: Sequence[str], size: int, workers: int, out: Path, table: Path | str, desc: str = "") -> None:
    """Stream decoded images into `out` as an (N, size, size) uint8 .npy (callers make it atomic)."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(paths), size, size)}
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        with progress(total=len(paths), desc=desc or Path(out).stem, unit="img") as bar:
            for row, image in decoded_rows(paths, size, workers):
                if isinstance(image, str):
                    # Row numbers are file lines of the split table (header = line 1).
                    raise PipelineError(f"{paths[row]} ({table} line {row + 2}): {image}")
                f.write(image.tobytes())
                bar.update()
        f.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (section prepare)")
    parser.add_argument("--split-dir", type=Path, default=SPLIT_DIR, help="folder of train/val/test.csv")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for <split>.npy")
    args = parser.parse_args(argv)
    params = load_params("prepare", path=args.params)
    size, workers = params.get("image_size"), params.get("workers", 0)
    if not isinstance(size, int) or not 8 <= size <= 4096:
        raise PipelineError(f"{args.params} prepare.image_size: {size!r}; expected an integer from 8 to 4096")
    if not isinstance(workers, int) or workers < 0:
        raise PipelineError(f"{args.params} prepare.workers: {workers!r}; expected 0 (all cores) or a positive integer")
    workers = workers or cpu_count()
    tables = {name: args.split_dir / f"{name}.csv" for name in SPLITS}
    paths = {}
    for name, table in tables.items():
        try:
            paths[name] = pd.read_csv(table, usecols=["path"])["path"].tolist()
        except (FileNotFoundError, ValueError) as exc:
            raise PipelineError(f"{table}: cannot read the split table ({exc}); run the split stage first") from None
    # All three arrays appear together or not at all: a bad image in test leaves no new train.npy.
    with contextlib.ExitStack() as stack:
        for name in SPLITS:
            tmp = stack.enter_context(atomic_path(args.out / f"{name}.npy"))
            write_array(paths[name], size, workers, tmp, tables[name], desc=f"prepare {name}")
    for name in SPLITS:
        print(f"prepare: {name}: {len(paths[name])} images -> {args.out / name}.npy ({size}x{size} uint8)")


if __name__ == "__main__":
    run_main(main)

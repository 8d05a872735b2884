"""stages.prepare and cxr14.data.arrays (decode once into .npy per split), the loader's reading of those
arrays, the atomic-output plumbing of cxr14.runtime and the params loader of cxr14.params."""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    NIH,
    NIH_IMAGES,
    REPO,
    RGBA_FILES,
    TINY_I16,
    TINY_RGBA,
    TINY_WIDE,
    files_under,
    run_module,
    write_params,
)
from torch.utils.data import BatchSampler, RandomSampler

from cxr14.data.arrays import write_array
from cxr14.data.images import load_gray
from cxr14.data.loader import PreparedImages, SortedBatchSampler, make_loader
from cxr14.data.nih import CLASSES
from cxr14.params import Data, Prepare, load_section
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import atomic_path, write_json
from cxr14.runtime.signals import run_main
from stages import prepare, split

SPLITS = ("train", "val", "test")
NPY_FILES = sorted(f"{n}.npy" for n in SPLITS)


def assert_no_temp_files(folder: Path) -> None:
    assert not [p for p in files_under(folder) if p.endswith(".tmp") or os.path.basename(p).startswith(".")]


# ---------------------------------------------------------------- the 308 real images in ../shared/nih


@pytest.fixture(scope="module")
def nih_prepared(nih_sample_split):
    """`python -m stages.prepare` (64 px, 2 workers) on the split of ../shared/nih."""
    assert nih_sample_split["result"].returncode == 0, nih_sample_split["result"].stderr
    out = nih_sample_split["work"] / "prepared"
    result = run_module(
        "prepare", "--params", nih_sample_split["params"], "--split-dir", nih_sample_split["out"], "--out", out
    )
    tables = {n: pd.read_csv(nih_sample_split["out"] / f"{n}.csv") for n in SPLITS}
    return {"result": result, "out": out, "tables": tables}


@pytest.mark.xdist_group("nih_prepared")  # one worker, one after the other: the module fixture runs prepare once
def test_prepare_cli_writes_every_real_image(nih_prepared):
    result, out, tables = nih_prepared["result"], nih_prepared["out"], nih_prepared["tables"]
    assert result.returncode == 0, result.stderr
    assert files_under(out) == NPY_FILES  # and nothing else: no temporary files left
    arrays = {n: np.load(out / f"{n}.npy", mmap_mode="r") for n in SPLITS}
    assert sum(len(a) for a in arrays.values()) == NIH_IMAGES
    for name, array in arrays.items():
        assert isinstance(array, np.memmap)
        assert array.dtype == np.uint8
        assert array.shape == (len(tables[name]), 64, 64)
        assert f"prepare: {name}: {len(tables[name])} images" in result.stdout
    assert {len(arrays["train"]) + len(arrays["val"]), len(arrays["test"])} == {257, 51}


@pytest.mark.xdist_group("nih_prepared")
def test_prepare_cli_rows_follow_the_split_tables(nih_prepared):
    out, tables = nih_prepared["out"], nih_prepared["tables"]
    checked_rgba = 0
    for name in SPLITS:
        array = np.load(out / f"{name}.npy", mmap_mode="r")
        table = tables[name]
        rows = {0, len(table) - 1, len(table) // 2}
        rows |= set(np.flatnonzero(table["Image Index"].isin(RGBA_FILES).to_numpy()))
        for row in sorted(rows):
            expected = load_gray(REPO / table["path"][row], 64)
            np.testing.assert_array_equal(array[row], expected, err_msg=f"{name} row {row}")
            checked_rgba += table["Image Index"][row] in RGBA_FILES
    assert checked_rgba == len(RGBA_FILES)


# ---------------------------------------------------------------- the tiny dataset


@pytest.fixture
def tiny_split(tiny_nih, tmp_path):
    """Split tables of the tiny dataset (17 images: RGBA, 16-bit, non-square) and params for prepare."""
    params = write_params(tmp_path / "params.yaml", tiny_nih.root, missing="error", image_size=32, workers=2)
    split_dir = tmp_path / "split"
    split.main(["--params", str(params), "--out", str(split_dir), "--metrics", str(tmp_path / "split.json")])
    out = tmp_path / "prepared"
    argv = ["--params", str(params), "--split-dir", str(split_dir), "--out", str(out)]
    tables = {n: pd.read_csv(split_dir / f"{n}.csv") for n in SPLITS}
    return {"data": tiny_nih, "params": params, "split_dir": split_dir, "out": out, "argv": argv, "tables": tables}


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_tiny_every_row_equals_load_gray(tiny_split, workers):
    write_params(tiny_split["params"], tiny_split["data"].root, image_size=32, workers=workers)
    prepare.main(tiny_split["argv"])
    out = tiny_split["out"]
    assert files_under(out) == NPY_FILES
    seen = set()
    for name in SPLITS:
        array = np.load(out / f"{name}.npy")
        table = tiny_split["tables"][name]
        assert array.shape == (len(table), 32, 32) and array.dtype == np.uint8
        for row, path in enumerate(table["path"]):
            np.testing.assert_array_equal(array[row], load_gray(path, 32), err_msg=f"{name} row {row}")
        seen |= set(table["Image Index"])
    assert {TINY_RGBA, TINY_I16, TINY_WIDE} <= seen
    # the 16-bit image was scaled, not clipped: its array is not saturated
    where = {n: (s, i) for s in SPLITS for i, n in enumerate(tiny_split["tables"][s]["Image Index"])}
    split_name, row = where[TINY_I16]
    assert np.load(out / f"{split_name}.npy")[row].max() < 255


def test_prepare_workers_do_not_change_the_result(tiny_split):
    results = {}
    for workers in (1, 2):
        write_params(tiny_split["params"], tiny_split["data"].root, image_size=16, workers=workers)
        prepare.main(tiny_split["argv"])
        results[workers] = {n: np.load(tiny_split["out"] / f"{n}.npy") for n in SPLITS}
    for name in SPLITS:
        np.testing.assert_array_equal(results[1][name], results[2][name])


def break_image(kind: str, path: Path) -> None:
    path.unlink()
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        real = (NIH / "images" / "00000003_000.png").read_bytes()
        path.write_bytes(real[: len(real) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        path.write_bytes((NIH / "images" / "00000003_000.png").read_bytes())
        path.chmod(0)
    # "missing": deleted after the split was made


BAD_KINDS = ["corrupt", "truncated", "directory", "missing", "unreadable"]


@pytest.mark.parametrize("where", ["train", "test"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_prepare_bad_image_names_path_and_table_line_and_keeps_old_outputs(
    tiny_split, capsys, monkeypatch, kind, where
):
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (the 'directory' case covers it)")
    table = tiny_split["tables"][where]
    row = len(table) - 1 if where == "test" else 2  # test is written last: train and val temps must vanish too
    bad = Path(table["path"][row])
    break_image(kind, bad)
    out = tiny_split["out"]
    out.mkdir()
    sentinel = b"an earlier, good train.npy"
    (out / "train.npy").write_bytes(sentinel)

    with pytest.raises(PipelineError) as err:
        prepare.main(tiny_split["argv"])
    message = str(err.value)
    split_table = tiny_split["split_dir"] / f"{where}.csv"
    assert message.startswith(f"{bad} ({split_table} line {row + 2}): cannot decode image (")
    assert message.endswith("expected a readable PNG or JPEG")
    assert split_table.read_text().splitlines()[row + 1].startswith(bad.name)  # that line is the bad image's row
    assert files_under(out) == ["train.npy"]
    assert (out / "train.npy").read_bytes() == sentinel

    capsys.readouterr()
    monkeypatch.setenv("CI", "1")  # no progress bars: stderr holds the message alone
    with pytest.raises(SystemExit) as exit_info:
        run_main(prepare.main, tiny_split["argv"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert files_under(out) == ["train.npy"]


def test_bad_image_shuts_the_worker_pool_down_before_the_error_returns(tmp_path):
    """The pool must not outlive the error: its cleanup, left to the garbage collector, can run in its own
    feeder thread and deadlock there (the suite once hung for 90 min in CI that way)."""
    import multiprocessing
    import threading

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good = [str(p) for p in sorted((NIH / "images").glob("*.png"))[:12]]
    with pytest.raises(PipelineError) as err:
        write_array([*good, str(bad), *good], 16, 2, tmp_path / "out.npy", "table.csv")
    assert "table.csv line 14" in str(err.value)
    assert multiprocessing.active_children() == []  # while `err` (and its traceback's frames) still live
    assert [t.name for t in threading.enumerate() if "_handle_" in t.name] == []  # the pool's three threads


@pytest.mark.slow
def test_a_worker_killed_mid_decode_is_an_error_not_a_hang(tmp_path):
    """The kernel's OOM killer ends a worker without a word: the stage must fail, naming where, not wait forever."""
    import multiprocessing
    import signal
    import threading

    images = [str(p) for p in sorted((NIH / "images").glob("*.png"))] * 2  # ~10 s of decoding on 2 cores

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 60
        while not multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # decoding under way
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    with pytest.raises(PipelineError) as err:
        write_array(images, 16, 2, tmp_path / "out.npy", "table.csv")
    killer.join()
    path, line = re.fullmatch(r"(.+) \(table.csv line (\d+)\): a decoding worker process died at or after this "
                              r"image \(out of memory\?\); try fewer prepare.workers", str(err.value)).groups()
    assert images[int(line) - 2] == path and int(line) - 2 < len(images) - 1
    assert multiprocessing.active_children() == []


def test_a_pool_broken_between_chunks_is_the_same_error(tmp_path, monkeypatch):
    """A worker killed after its chunk finished breaks the pool at the next submit, not at a result (seen once in
    CI as a BrokenProcessPool traceback): the same one-line error, naming the first image not yet written."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    import cxr14.data.arrays as arrays

    class PoolBrokenAfterFirstResult:  # decodes in-process; breaks once the first result has been taken
        def __init__(self, *args, **kwargs) -> None:
            self.taken = False

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def submit(self, fn, chunk):
            if self.taken:
                raise BrokenProcessPool("A child process terminated abruptly")
            future = Future()
            future.result = lambda: (setattr(self, "taken", True), fn(chunk))[1]
            return future

    monkeypatch.setattr(arrays, "ProcessPoolExecutor", PoolBrokenAfterFirstResult)
    images = [str(p) for p in sorted((NIH / "images").glob("*.png"))[:40]]
    with pytest.raises(PipelineError) as err:
        write_array(images, 16, 2, tmp_path / "out.npy", "table.csv")
    assert str(err.value) == (f"{images[0]} (table.csv line 2): a decoding worker process died at or after this "
                              "image (out of memory?); try fewer prepare.workers")


def test_prepare_cli_bad_image_is_one_line_without_traceback(tiny_split):
    table = tiny_split["tables"]["val"]
    bad = Path(table["path"][0])
    break_image("corrupt", bad)
    expected = f"error: {bad} ({tiny_split['split_dir'] / 'val.csv'} line 2): cannot decode image"
    result = run_module("prepare", *tiny_split["argv"])
    assert result.returncode == 1
    assert result.stderr.startswith(expected)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert files_under(tiny_split["out"]) == []
    # With progress bars on (stderr not a terminal, CI unset), the error is still the one last line.
    result = run_module("prepare", *tiny_split["argv"], ci=False)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(expected)
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.stderr
    assert files_under(tiny_split["out"]) == []


@pytest.mark.parametrize(
    ("image_size", "workers", "fragment"),
    [
        (4, 2, "prepare.image_size: 4; expected an integer in [8, 4096]"),
        ("'64'", 2, "prepare.image_size: '64'; expected an integer in [8, 4096]"),
        (64.0, 2, "prepare.image_size: 64.0; expected an integer in [8, 4096]"),
        (64, -1, "prepare.workers: -1; expected 0 (all cores) or a positive integer"),
    ],
)
def test_prepare_bad_params(tiny_split, image_size, workers, fragment):
    params = tiny_split["params"]
    params.write_text(f"prepare:\n  image_size: {image_size}\n  workers: {workers}\n")
    with pytest.raises(PipelineError) as err:
        prepare.main(tiny_split["argv"])
    assert str(err.value) == f"{params} {fragment}"
    assert files_under(tiny_split["out"]) == []


def test_prepare_without_split_tables(tiny_split):
    (tiny_split["split_dir"] / "val.csv").unlink()
    with pytest.raises(PipelineError) as err:
        prepare.main(tiny_split["argv"])
    assert str(err.value).startswith(f"{tiny_split['split_dir'] / 'val.csv'}: cannot read the split table")
    assert "cannot read the split table" in str(err.value) and "run the split stage" in str(err.value)
    assert files_under(tiny_split["out"]) == []


# ---------------------------------------------------------------- reading prepared arrays (cxr14.data.loader)


def numbered_array(tmp_path: Path, n: int, size: int = 8) -> tuple[Path, np.ndarray, np.ndarray]:
    """A prepared-like .npy whose row i is filled with i (noise elsewhere in it), and distinct labels per row."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    array[:, 0, 0] = np.arange(n)
    path = tmp_path / "train.npy"
    np.save(path, array)
    labels = rng.random((n, len(CLASSES))).astype(np.float32)
    return path, array, labels


def test_prepared_images_returns_rows_in_the_order_asked(tmp_path):
    """Regression: __getitem__ sorted the rows it was asked for, while its docstring promised `ds[[3, 7, 1]]`."""
    path, array, labels = numbered_array(tmp_path, 10)
    ds = PreparedImages(path, labels)
    assert len(ds) == 10 and ds.image_size == 8
    images, got = ds[[3, 7, 1]]
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 8, 8)
    assert images[:, 0, 0, 0].tolist() == [3, 7, 1]
    np.testing.assert_array_equal(images[:, 0].numpy(), array[[3, 7, 1]])
    np.testing.assert_array_equal(got.numpy(), labels[[3, 7, 1]])
    # a numpy index, a repeated row, descending order: still row for row as asked
    rows = np.array([9, 0, 9, 4])
    images, got = ds[rows]
    np.testing.assert_array_equal(images[:, 0].numpy(), array[rows])
    np.testing.assert_array_equal(got.numpy(), labels[rows])
    images, got = PreparedImages(path)[[5, 2]]  # without labels
    np.testing.assert_array_equal(images[:, 0].numpy(), array[[5, 2]])
    assert got.shape == (2, 0)


def test_shuffled_loader_batches_come_out_sorted(tmp_path):
    """Training order depends on it: a shuffled batch is read (and augmented) in file order, labels alongside."""
    n, batch = 23, 5
    path, array, labels = numbered_array(tmp_path, n)
    loader = make_loader(PreparedImages(path, labels), batch_size=batch, shuffle=True, seed=3)
    assert isinstance(loader.sampler, SortedBatchSampler)
    batches = []
    for images, got in loader:
        rows = images[:, 0, 0, 0].tolist()
        assert rows == sorted(rows)
        np.testing.assert_array_equal(images[:, 0].numpy(), array[rows])
        np.testing.assert_array_equal(got.numpy(), labels[rows])
        batches.append(rows)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(r for b in batches for r in b) == list(range(n))  # every row once
    assert batches != [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]  # shuffled across batches
    # The sorted batches hold the same rows as the seeded shuffle's, and the same seed gives the same batches.
    shuffled = BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(3)), batch, False)
    assert batches == [sorted(b) for b in shuffled]
    again = [images[:, 0, 0, 0].tolist() for images, _ in make_loader(PreparedImages(path, labels), batch, True, 3)]
    assert again == batches
    plain = [images[:, 0, 0, 0].tolist() for images, _ in make_loader(PreparedImages(path, labels), batch, False)]
    assert plain == [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]


def test_loader_workers_give_the_same_batches_and_the_dataset_pickles_by_path(tmp_path):
    """train.workers > 0 gives the batches 0 workers give; a dataset opened here pickles without its pixels (for
    workers started by spawn, as on macOS)."""
    path, array, labels = numbered_array(tmp_path, 23, size=64)
    ds = PreparedImages(path, labels)
    ds[[0]]  # opened here: the memory map must not be pickled with it
    assert len(pickle.dumps(ds)) < 4_000 < array.nbytes
    batches = [(images.numpy(), got.numpy()) for images, got in make_loader(ds, 5, True, 3, workers=2)]
    alone = [(images.numpy(), got.numpy()) for images, got in make_loader(ds, 5, True, 3)]
    assert len(batches) == len(alone) == 5
    for (images, got), (images0, got0) in zip(batches, alone, strict=True):
        np.testing.assert_array_equal(images, images0)
        np.testing.assert_array_equal(got, got0)


def test_a_loader_forks_its_workers_with_no_python_thread_of_ours_alive(tmp_path, monkeypatch):
    """Train makes a loader per epoch and per validation: each forks its workers after the previous loader's have
    stopped and their queue feeder threads have exited, and no progress bar runs tqdm's monitor thread (a fork
    with other Python threads alive once hung a DDP rank's worker in CPython's after-fork clean-up)."""
    import threading

    from tqdm.std import tqdm

    from cxr14.runtime.progress import progress

    if tqdm.monitor is not None:  # another test's plain tqdm bar started it: stopped, to see whether ours does
        tqdm.monitor.exit()
        tqdm.monitor = None
    path, _, labels = numbered_array(tmp_path, 23, size=16)
    ds = PreparedImages(path, labels)
    seen: list[list[str]] = []
    real_fork = os.fork

    def fork() -> int:
        seen.append(sorted(t.name for t in threading.enumerate() if t.name in ("QueueFeederThread", "tqdm_monitor")))
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    for epoch in range(3):  # as train: an epoch's loader, then validation's, each used to its end
        for loader in (make_loader(ds, 5, True, epoch, workers=1), make_loader(ds, 5, False, workers=1)):
            assert len(list(progress(loader, disable=False, file=open(os.devnull, "w")))) == 5
    assert seen == [[]] * 6


# ------------------------------------------------------- atomic outputs (cxr14.runtime.outputs), params (cxr14.params)


def test_atomic_path_keeps_old_file_when_the_block_raises(tmp_path):
    target = tmp_path / "out" / "table.csv"
    target.parent.mkdir()
    target.write_text("old contents\n")
    with pytest.raises(RuntimeError, match="killed halfway"), atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("half of the new con")
        raise RuntimeError("killed halfway")
    assert target.read_text() == "old contents\n"
    assert os.listdir(target.parent) == ["table.csv"]


def test_atomic_path_without_old_file_leaves_nothing_when_the_block_raises(tmp_path):
    target = tmp_path / "new" / "deep" / "x.npy"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_atomic_path_replaces_on_success_with_usual_permissions(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible until the block ends
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["metrics.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_write_json_is_stable_and_atomic(tmp_path):
    path = tmp_path / "m" / "split.json"
    write_json(path, {"b": 1, "a": {"x": [1, 2]}})
    assert path.read_text() == '{\n  "b": 1,\n  "a": {\n    "x": [\n      1,\n      2\n    ]\n  }\n}\n'
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"b": 1, "a": {"x": [1, 2]}}
    assert os.listdir(path.parent) == ["split.json"]


def test_load_section_errors(tmp_path):
    path = tmp_path / "params.yaml"
    with pytest.raises(PipelineError) as err:
        load_section(path, Data)
    assert str(err.value) == f"{path}: not found; run stages from the project root or pass --params"
    path.write_text("data: [unclosed\n")
    with pytest.raises(PipelineError, match=f"^{re.escape(str(path))}: not valid YAML"):
        load_section(path, Data)
    path.write_text("data:\n  format: nih\n  root: x\n  table: null\n  missing: skip\n")
    assert load_section(path, Data) == Data(format="nih", root="x", table=None, missing="skip")
    with pytest.raises(PipelineError) as err:
        load_section(path, Prepare)
    assert str(err.value) == f"{path}: missing section 'prepare'; expected keys image_size, workers"
    path.write_text("data:\n  format: nih\n  root: x\n  table: null\n")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))} data\.missing: missing; expected one of"):
        load_section(path, Data)

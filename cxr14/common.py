"""Plumbing every stage shares: one-line errors and warnings, atomic outputs, progress bars, rounding.

A stage that fails must say what to fix in one line and leave no half-written file behind,
so stages raise `PipelineError` and write through `atomic_path`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


class PipelineError(Exception):
    """An error in the user's data or settings; printed as one line, never as a traceback."""


def warn(message: str) -> None:
    """A warning the user should read, on stderr, in one format everywhere."""
    print(f"warning: {message}", file=sys.stderr)


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats rounded in nested dicts/lists (NaN becomes None), so metrics files diff cleanly and stay valid JSON."""
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if value != value else round(float(value), digits)
    return value


def remove_leftovers(path: Path) -> None:
    """Delete what a killed run left beside `path` (`.<name>.*.tmp` files or folders, `.<name>.*.old` folders).

    A SIGKILL skips every `finally`, so nothing else removes them (a killed training run leaves a checkpoint-sized
    file each time). Safe because one pipeline writes one target at a time: DVC locks the repository for a run.
    """
    for pattern in (".tmp", ".old"):
        for stale in path.parent.glob(glob.escape(f".{path.name}.") + "*" + pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def exit_with(pid: int) -> None:
    """Worker-process initializer: end this worker within a second of process `pid` (the stage) ending, SIGKILL
    included.

    Pool workers come from a fork server, and each holds the pipe that keeps the fork server alive, so after a
    killed prepare or demo all of them stayed (hundreds of MB) waiting on a queue no one fills. On Linux the
    parent-death signals of `cxr14.lifeline` end them sooner; this daemon thread, polling the stage's pid, is
    what ends them where there are none (spawned workers, other systems). Workers ignore Ctrl-C, which the
    terminal sends to the whole process group: the stage handles it and shuts them down.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, and someone else's (cannot happen for our own stage)
                pass

    threading.Thread(target=watch, name="exit-with-stage", daemon=True).start()


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def free_bytes(path: Path | str) -> int:
    """Free space where `path` would be written (its nearest existing folder)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def ensure_space(path: Path | str, needed: int) -> None:
    """Stop before the work, not after it: decoding 112k images or an epoch of training ends in ENOSPC otherwise."""
    free = free_bytes(path)
    if free < needed:
        raise PipelineError(f"{path}: needs about {human_bytes(needed)} of disk space, {human_bytes(free)} is free "
                            "there; free some space and re-run")


def _out_of_space(exc: OSError, target: Path) -> None:
    """A full disk names the output being written (the temporary's name, or none at all, says nothing)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise PipelineError(f"{target}: the disk filled up while writing it ({human_bytes(free_bytes(target))} "
                            "free now; the previous version is untouched); free some space and re-run") from None


def usual_permissions(path: Path, mode: int) -> Path:
    """`mode` less the umask: mkstemp and mkdtemp make 0600 and 0700, and outputs get what any new file would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)
    return path


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = usual_permissions(Path(tmp), 0o666)
    try:
        yield tmp_path
        with signals_deferred():
            os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)  # before measuring what is free
        _out_of_space(exc, path)
        raise
    finally:
        with signals_deferred():
            tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def replace_dir(path: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` in one step where Linux
    can exchange two names (renameat2), so a kill at any moment leaves the old folder or the new one, whole.

    Elsewhere it takes two renames, and a kill between them leaves neither (the old one is beside it, `.old`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = usual_permissions(Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)), 0o777)
    try:
        yield tmp
        with signals_deferred():
            if not (path.is_dir() and not path.is_symlink() and exchange(tmp, path)):  # else tmp holds the old one
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                if path.is_dir() and not path.is_symlink():
                    os.replace(path, old)  # a directory may replace an empty one
                elif path.exists() or path.is_symlink():
                    path.unlink()
                os.replace(tmp, path)
                shutil.rmtree(old)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # before measuring what is free
        _out_of_space(exc, path)
        raise
    finally:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)


_deferring = 0  # depth of nested signals_deferred() blocks (the main thread's; Python runs handlers there)
_pending: BaseException | None = None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and Ctrl-C (with `run_main`'s handlers) while an output is renamed into place, a temporary
    removed, or a worker pool is in use: the signal takes effect when the block ends (or at `raise_pending`),
    not half way through a rename, and not inside the pool's locks, where an exception left the pool's shutdown
    waiting forever. SIGKILL cannot be held; the next run removes what it leaves (`remove_leftovers`)."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    except BaseException:
        _deferring -= 1
        raise  # already unwinding: the stage ends anyway
    else:
        _deferring -= 1
        if _deferring == 0:
            raise_pending()


def raise_pending() -> None:
    """Where a long deferred block can stop safely (between two chunks of work): act on a held signal now."""
    global _pending
    if _pending is not None:
        exc, _pending = _pending, None
        raise exc


def _on_signal(signum: int, frame: Any) -> None:
    """Raise at once, unless held; either way remember it, so that one raised where Python swallows exceptions
    (a `__del__`, a callback) is raised again at the next safe point (`progress` steps, the stage's end)."""
    global _pending
    import signal

    exc: BaseException = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
    _pending = _pending or exc
    if not _deferring and not in_finalizer(frame):
        raise exc


def in_finalizer(frame: Any) -> bool:
    """Whether `frame` runs inside a `__del__` (a DataLoader shutting its workers down, say): Python would print
    the exception raised there as "Exception ignored" with a traceback, and swallow it; held, it is raised at
    the next safe point instead, quietly."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another C library
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_json(path: Path | str, data: Any) -> None:
    """Write JSON atomically, with stable key order so metrics diff cleanly in git."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_csv(path: Path | str, frame: Any, **options: Any) -> None:
    """Write a pandas DataFrame as CSV atomically, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **options)


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr that stays quiet when stderr is not a terminal and CI is set."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    kwargs.setdefault("disable", None if sys.stderr.isatty() else bool(os.environ.get("CI")))
    return _bar_class()(iterable, **kwargs)


@functools.cache
def _bar_class() -> type:
    """tqdm, with each step a safe point for a held or swallowed SIGTERM / Ctrl-C (`raise_pending`). Notebook
    bars in IPython; elsewhere the terminal's, without tqdm.auto's asyncio import (10 ms of predict's start)."""
    if "IPython" in sys.modules:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm

    class Bar(tqdm):
        def __iter__(self) -> Iterator[Any]:
            for item in super().__iter__():
                raise_pending()
                yield item

        def update(self, n: float | None = 1) -> bool | None:
            raise_pending()
            return super().update(n)

    return Bar


def cpu_count() -> int:
    """Cores this process may use: its affinity mask (container limits), or fewer when OMP_NUM_THREADS says so.

    Every stage sizes its thread pool and its default worker count with this, so experiments run side by side
    (`OMP_NUM_THREADS=1 dvc queue start -j 2`) share the cores instead of each taking all of them.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    return max(1, min(cores, int(limit))) if limit.isdigit() and int(limit) > 0 else cores


def cpu_kernels(kind: str) -> None:
    """`avx2`: cap oneDNN (PyTorch's CPU convolutions) at AVX2, so every x86-64 CPU with AVX2 computes the same
    numbers; `native`: leave oneDNN its best kernels for this CPU.

    oneDNN picks AVX-512 kernels where the CPU has them, and they round differently from the AVX2 ones:
    measured on the demo (2 threads), val mean AUC 0.923421 and test 0.9334 with AVX-512 against 0.923647
    and 0.9391 with AVX2, while ATen's own capability (ATEN_CPU_CAPABILITY) changed nothing there; the cap
    made demo training 1.58x slower on that AVX-512 CPU (benchmarks/bench_isa.py). oneDNN reads the cap at
    its first convolution, so calling this before any forward pass is enough; it needs no torch import. A
    user's own ONEDNN_MAX_CPU_ISA wins. The thread count still changes the numbers (docs/reproducibility.md).
    """
    if kind == "avx2":
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def process_context(preload: list[str]) -> multiprocessing.context.BaseContext:
    """Workers from a fork server where there is one, else spawned. Forking this process, which may hold
    threads (progress bars, torch's pool, a test runner), can copy another thread's held lock into a worker,
    which then never finishes; the server forks from a clean process that imported `preload` once, and
    `cxr14.lifeline_armed` before it (the server and its workers die with the stage, SIGKILL included)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cxr14.lifeline_armed", *preload])  # first: server and workers die with us
    return context


class Terminated(BaseException):
    """SIGTERM (`kill`, a scheduler's cancel) as an exception, so every `finally` removes its temporaries."""


def run_main(main: Callable[..., Any], argv: list[str] | None = None, quiet_signals: bool = False) -> None:
    """Run a stage entry point; a PipelineError becomes one line on stderr and exit code 1.

    SIGTERM and Ctrl-C unwind like an error (temporaries removed, previous outputs untouched) and exit
    143 and 130, saying so unless `quiet_signals` (a training process whose launcher says it once); SIGKILL
    cannot, and the next run of the stage removes what it left (`remove_leftovers`).
    """
    import signal

    global _pending
    _pending = None
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        main(argv)
        raise_pending()  # a signal swallowed on the way: the outputs are whole, the exit status says it came
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:  # a folder we may not read, a full disk outside our writes: what and where
        where = f"{exc.filename}: " if exc.filename else ""
        hint = "; free some space and re-run" if exc.errno == errno.ENOSPC else ""
        print(f"error: {where}{exc.strerror or exc}{hint}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if not quiet_signals:
            print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Terminated:
        if not quiet_signals:
            print("terminated", file=sys.stderr)
        raise SystemExit(143) from None
    finally:
        _pending = None  # acted on, or moot: the stage is over
        for sig, handler in previous.items():
            signal.signal(sig, handler)

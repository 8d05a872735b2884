"""Atomic outputs: a stage killed at any moment leaves the previous file or folder whole, never half a new one.

Every output goes through `atomic_path` or `replace_dir` (a temporary beside the target, renamed in place
on success); `remove_leftovers` clears what a SIGKILL left. `rounded` keeps metrics files diffable.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cxr14.runtime.errors import PipelineError
from cxr14.runtime.signals import signals_deferred


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

"""Atomic outputs: a stage killed at any moment leaves the previous file or folder whole, never half a new one.

Every output goes through `atomic_path` or `replace_dir` (a temporary beside the target, renamed in place
on success); `remove_leftovers` clears what a SIGKILL left. Both first refuse a target whose replacement
would destroy something that is not a previous output (`output_target`); a command checks its output options
with `check_output` before any work. `rounded` keeps metrics files diffable.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
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

def file_digest(path: Path | str) -> str:
    """MD5 (hex) of a file, read in 8 MB chunks so memory stays flat whatever its size."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def short_id(digests: Iterable[str]) -> str:
    """8 hex digits naming a model or a dataset in metrics files (`dvc exp show` prints them as text): one file's
    id is its MD5's first 8 digits (`md5sum models/model.pt`), several files' the MD5 of their MD5s, in order."""
    digests = list(digests)
    if len(digests) == 1:
        return digests[0][:8]
    return hashlib.md5("\n".join(digests).encode(), usedforsecurity=False).hexdigest()[:8]


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

NOT_REGULAR = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def output_target(path: Path | str, folder: bool = False, option: str = "", purpose: str = "") -> Path:
    """The file (`folder`: the folder) that writing an output at `path` replaces; PipelineError, one line naming
    `option` and `path`, for a target whose replacement would destroy what is not a previous output.

    Refused: a folder where a file goes and a file where a folder goes; a device, FIFO or socket (as root,
    a rename would replace /dev/null with a regular file); a parent that is a file. Symlinks are followed: the
    link stays and the file or folder it points to is replaced atomically, checked like any other target, and
    errors name the link and what it points to. A link to a read-only target is refused: that is someone's
    protected copy (DVC's cache, with cache.type symlink), which writing through the link would corrupt.
    """
    given, label = Path(path), output_label(path, option)
    target = given
    if given.is_symlink():
        target = Path(os.path.realpath(given))
        if target.is_symlink():  # realpath stops where links loop
            raise PipelineError(f"{label}: the link loops; name a file, or a link that ends at one")
        if target.exists() and not target.stat().st_mode & 0o222:
            raise PipelineError(f"{label}: what it points to is read-only (a DVC cache file?); writing through "
                                "the link would change it: remove the link or name another file")
    expected = "a folder" if folder else "a file name"
    if target.exists():
        mode = target.stat().st_mode
        kind = next((name for test, name in NOT_REGULAR if test(mode)), "")
        if kind:
            raise PipelineError(f"{label}: is {kind}; expected {expected}{purpose} (a device, FIFO or socket is "
                                "never replaced)")
        if stat.S_ISDIR(mode) != folder:
            raise PipelineError(f"{label}: is {'a file' if folder else 'a folder'}; expected {expected}{purpose}")
    nearest_folder(target, label)
    return target


def output_label(path: Path | str, option: str = "") -> str:
    """How errors name an output: the option and the path as given, and where a link leads when it is one."""
    label = f"{option} {path}" if option else str(path)
    return f"{label} (a link to {os.path.realpath(path)})" if os.path.islink(path) else label


def nearest_folder(target: Path, label: str) -> Path:
    """The nearest existing folder above `target` (where its missing parents would be made); PipelineError when
    a parent on the way is a file or a broken link, which `mkdir` would report as a temporary's `File exists`."""
    for parent in target.parents:
        if parent.is_dir():
            return parent
        if parent.exists() or parent.is_symlink():
            what = "a file" if parent.is_file() else "a broken link" if not parent.exists() else "not a folder"
            raise PipelineError(f"{label}: {parent} is {what}, not a folder")
    return Path(target.anchor or ".")


def cannot_write(exc: OSError, target: Path, label: str) -> PipelineError:
    """Why a folder took no new file, naming the output and never the temporary that found out."""
    _out_of_space(exc, target)
    if exc.errno in (errno.EROFS, errno.ENOENT):  # /proc answers ENOENT to a new name in a folder that exists
        reason = "read-only or virtual file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    else:
        reason = exc.strerror or type(exc).__name__
    return PipelineError(f"{label}: cannot write here ({reason})")


def check_output(path: Path | str, folder: bool = False, option: str = "", purpose: str = "",
                 inputs: Iterable[Path | str] = ()) -> Path:
    """`output_target`, and a new file made and removed where the output would go, before any work: a command
    should not spend an hour and then find it may not write. Also refuses a target that is one of `inputs`
    (the same file, through any link), which the output would destroy."""
    label = output_label(path, option)
    for item in inputs:  # first: of all reasons to refuse, the one that names what would be lost
        if same_file(Path(path), Path(item)):
            raise PipelineError(f"{label}: is the input {item}; writing the output there would destroy it, so "
                                f"name another {'folder' if folder else 'file'}")
    target = output_target(path, folder, option, purpose)
    where = target if target.is_dir() else nearest_folder(target, label)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=where)
    except OSError as exc:
        raise cannot_write(exc, target, label) from None
    os.close(fd)
    os.unlink(probe)
    return target


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: by device and inode where both exist, else by resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def usual_permissions(path: Path, mode: int) -> Path:
    """`mode` less the umask: mkstemp and mkdtemp make 0600 and 0700, and outputs get what any new file would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)
    return path

@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    `path` is checked first (`output_target`: a device, a folder or a link into a read-only file is refused,
    a link is followed); an error names `path`, never the temporary."""
    given = path
    path = output_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise cannot_write(exc, path, output_label(given)) from None
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
    `path` is checked first, as `atomic_path` checks a file's.
    """
    given = path
    path = output_target(path, folder=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path)
        made = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise cannot_write(exc, path, output_label(given)) from None
    tmp = usual_permissions(Path(made), 0o777)
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

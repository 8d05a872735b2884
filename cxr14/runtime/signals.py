"""SIGTERM and Ctrl-C as exceptions that unwind cleanly, held while an output is renamed into place.

`run_main` wraps every entry point: a `PipelineError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from cxr14.runtime.errors import PipelineError

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

"""Worker processes that end when their stage does, SIGKILL included.

Pools start from a fork server (`process_context`): forking a process that holds threads can copy a held
lock into a worker. On Linux the fork server and every worker get the kernel's parent-death signal
(`arm`, run by `cxr14.runtime.forkserver_init`, which the fork server alone preloads); elsewhere each worker
polls its stage (`exit_with`). A parent-death signal follows the parent *thread*, so it is never set
in a stage itself (a stage started from a thread would die with that thread).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time


def exit_with(pid: int) -> None:
    """Worker-process initializer: end this worker within a second of process `pid` (the stage) ending, SIGKILL
    included.

    Pool workers come from a fork server, and each holds the pipe that keeps the fork server alive, so after a
    killed prepare or demo all of them stayed (hundreds of MB) waiting on a queue no one fills. On Linux the
    parent-death signals of `arm` end them sooner; this daemon thread, polling the stage's pid, is
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

def process_context(preload: list[str]) -> multiprocessing.context.BaseContext:
    """Workers from a fork server where there is one, else spawned. Forking this process, which may hold
    threads (progress bars, torch's pool, a test runner), can copy another thread's held lock into a worker,
    which then never finishes; the server forks from a clean process that imported `preload` once, and
    `cxr14.runtime.forkserver_init` before it (the server and its workers die with the stage, SIGKILL included)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cxr14.runtime.forkserver_init", *preload])  # first: server and workers die with us
    return context


PR_SET_PDEATHSIG = 1

def die_with_parent(parent: int) -> None:
    """SIGKILL this process when `parent` ends; if it already has (the race at fork), end now."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # another C library: the workers' own watchdog still applies
        return
    if os.getppid() != parent:
        os._exit(1)

def arm() -> None:
    """In the fork server: it dies with the stage, and each process it forks dies with it."""
    if not sys.platform.startswith("linux"):
        return
    die_with_parent(os.getppid())  # the stage started the server a moment ago
    server = os.getpid()  # every worker's parent: a worker whose server died before its prctl ends at once
    os.register_at_fork(after_in_child=lambda: die_with_parent(server))


def worker_start_failed(kind: type[BaseException], value: BaseException, tb: object) -> None:
    """sys.excepthook of the fork server and the processes it forks, where Python's multiprocessing reports a
    worker that failed before running any of our code (forkserver.main): one line, not a traceback. An OSError
    there (FileNotFoundError rebuilding a queue's semaphore) means the stage already let go of what the worker
    was to use: it is stopping on SIGTERM or Ctrl-C and says so itself, so nothing is printed (measured while
    DataLoader workers briefly came from this server: 5 of 15 stops printed that traceback, 0 with this)."""
    if issubclass(kind, OSError):
        return
    sys.stderr.write(f"a worker process did not start: {kind.__name__}: {' '.join(str(value).split())[:300]}\n")

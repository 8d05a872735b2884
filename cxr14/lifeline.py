"""Worker processes end when their stage does, SIGKILL included (Linux): armed in the fork server only.

A killed stage's fork server and the workers it was still starting stayed alive (the probe found four, about
200 MB, a minute later; the per-worker watchdog of `common.exit_with` starts only once a worker is up). The
kernel's parent-death signal closes that gap: the fork server gets SIGKILL when the stage dies, and every
worker it forks gets SIGKILL when the fork server dies, from the first instruction after the fork.

Nothing happens on import: `cxr14.lifeline_armed`, which the fork server alone preloads
(`common.process_context`), calls `arm()`. A parent-death signal follows the parent *thread*, so it must
never be set in a stage (a stage started from a thread would die with that thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

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

"""Worker processes end when their stage does, SIGKILL included (Linux): imported first by the fork server.

A killed stage's fork server and the workers it was still starting stayed alive (the probe found four, about
200 MB, a minute later; the per-worker watchdog of `common.exit_with` starts only once a worker is up). The
kernel's parent-death signal closes that gap: the fork server gets SIGKILL when the stage dies, and every
worker it forks gets SIGKILL when the fork server dies, from the first instruction after the fork.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends; if the parent already ended (the race at fork), end now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # another C library: the workers' own watchdog still applies
        return
    if os.getppid() != parent:
        os._exit(1)


if __name__ != "__main__":
    # On import (the fork server's preload): the server, then each process it forks, dies with its parent.
    die_with_parent()
    os.register_at_fork(after_in_child=die_with_parent)

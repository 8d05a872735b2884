"""The pipeline's DVC entry points, one per stage: `python -m stages.<name>` (see dvc.yaml); thin scripts over cxr14.

`predict.py` and `compare.py` are not stages: deprecated aliases of `cxr14-predict` and `cxr14-compare`, kept
for one release.

Importing a stage takes seconds (torch, pandas). Ctrl-C or SIGTERM in that time has nothing to undo, so it
ends the process at once, with one word instead of an import traceback; `run_main` takes over from there.
"""

import os
import signal
import sys
import threading


def _quit_before_work(signum: int, frame: object) -> None:
    if not os.environ.get("CXR14_LAUNCHER"):  # one of several training processes: its launcher says it
        print("interrupted" if signum == signal.SIGINT else "terminated", file=sys.stderr)
    os._exit(128 + signum)


# Only for `python -m stages.<name>` (argv[0] is "-m" while the module is located): a program importing
# the package keeps its own Ctrl-C.
if sys.argv[:1] == ["-m"] and threading.current_thread() is threading.main_thread():
    for _signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signal, _quit_before_work)

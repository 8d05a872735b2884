"""Preloaded by the fork server alone (`processes.process_context`): arms the parent-death signals there, and
reports a worker that fails to start in one line (`processes.worker_start_failed`)."""

import sys

from cxr14.runtime.processes import arm, worker_start_failed

arm()
sys.excepthook = worker_start_failed

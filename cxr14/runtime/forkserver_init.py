"""Preloaded by the fork server alone (`processes.process_context`): arms the parent-death signals there."""

from cxr14.runtime.processes import arm

arm()

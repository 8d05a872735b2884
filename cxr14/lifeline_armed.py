"""Preloaded by the fork server alone (`common.process_context`): arms `cxr14.lifeline` there."""

from cxr14.lifeline import arm

arm()

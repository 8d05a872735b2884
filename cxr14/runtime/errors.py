"""One-line errors and warnings: a stage that fails says what to fix in one line, never a traceback.
"""

from __future__ import annotations

import sys


class PipelineError(Exception):
    """An error in the user's data or settings; printed as one line, never as a traceback."""

def warn(message: str) -> None:
    """A warning the user should read, on stderr, in one format everywhere."""
    print(f"warning: {message}", file=sys.stderr)

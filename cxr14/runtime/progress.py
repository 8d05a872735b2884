"""Progress bars on every long step, quiet in CI, each step a safe point for a held signal.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from typing import Any

from cxr14.runtime.signals import raise_pending


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr that stays quiet when stderr is not a terminal and CI is set."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    kwargs.setdefault("disable", None if sys.stderr.isatty() else bool(os.environ.get("CI")))
    return _bar_class()(iterable, **kwargs)

@functools.cache
def _bar_class() -> type:
    """tqdm, with each step a safe point for a held or swallowed SIGTERM / Ctrl-C (`raise_pending`). Notebook
    bars in IPython; elsewhere the terminal's, without tqdm.auto's asyncio import (predict starts sooner)."""
    if "IPython" in sys.modules:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm

    class Bar(tqdm):
        # no monitor thread (tqdm's adjusts miniters, unused with mininterval): train forks DataLoader workers
        # from this process, and a fork with other Python threads alive can hang in the child (make_loader)
        monitor_interval = 0

        def __iter__(self) -> Iterator[Any]:
            for item in super().__iter__():
                raise_pending()
                yield item

        def update(self, n: float | None = 1) -> bool | None:
            raise_pending()
            return super().update(n)

    return Bar

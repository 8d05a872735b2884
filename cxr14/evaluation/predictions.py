"""The predictions contract between evaluate and the stages after it: `data/predictions/<split>.csv` holds
Image Index, Patient ID, one 0/1 label column per class (empty where unknown: a finding an own-data table lacks)
and `prob_<Class>` per class, in split-table order.

Calibrate and explain read it here, checked cell by cell, so a hand-edited or truncated file is a
one-line error naming the row and column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from cxr14.data.nih import CLASSES
from cxr14.runtime.errors import PipelineError

PROB_PREFIX = "prob_"
EXPERT_PREFIX = "expert_"  # expert_<finding>: Google's adjudicated label (expert.py), empty where there is none


def read_predictions(path: Path, names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities), both (N, 14) in CLASSES order (labels int64, or float64 with NaN where some are
    unknown), from the evaluate stage's CSV; checked, and
    with `names` (the split table's Image Index column) checked to be those images in that order."""
    return read_prediction_table(path, names)[1:]


def read_prediction_table(source: Path | IO[str], names: Sequence[str] | None = None, where: str | None = None
                          ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The whole file (with its subgroup and expert columns where evaluate wrote them), labels, probabilities.

    `source` may be an open text stream (a file at a git revision, read through DVC), named as `where`.
    """
    path = where or source
    try:
        frame = pd.read_csv(source)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro evaluate` first") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable CSV ({exc})") from None
    prob_columns = [PROB_PREFIX + n for n in CLASSES]
    missing = [c for c in [*CLASSES, *prob_columns] if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {', '.join(missing)}; expected <Class> and prob_<Class> per class")
    if frame.empty:
        raise PipelineError(f"{path}: no rows")
    if names is not None and ("Image Index" not in frame or frame["Image Index"].tolist() != list(names)):
        raise PipelineError(f"{path}: rows are not the split table's images in its order; run dvc repro evaluate")
    labels = numeric(path, frame, list(CLASSES), lambda v: np.isin(v, (0, 1)) | blank(frame, list(CLASSES)),
                     "0, 1 or empty (unknown)")
    probs = numeric(path, frame, prob_columns, lambda v: (v >= 0) & (v <= 1), "a probability in [0, 1]")
    expert = [c for c in frame.columns if c.startswith(EXPERT_PREFIX)]
    if expert:
        numeric(path, frame, expert, lambda v: np.isin(v, (0, 1)) | np.isnan(v), "0, 1 or empty")
    return frame, (labels if np.isnan(labels).any() else labels.astype(np.int64)), probs


def blank(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Cells left empty (an unknown label), as opposed to text that is not a number."""
    return frame[columns].isna().to_numpy()


def numeric(path: Path | str, frame: pd.DataFrame, columns: list[str], valid: Callable, expected: str) -> np.ndarray:
    """The columns as floats; the first bad cell is named by file row (the header is row 1) and column."""
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ok = valid(values)  # NaN (empty or not a number) fails every check
    if not ok.all():
        row, col = np.argwhere(~ok)[0]
        cell = frame[columns[col]].iloc[row]
        raise PipelineError(f"{path}: row {row + 2}, column {columns[col]}: {cell!r}; expected {expected}")
    return values

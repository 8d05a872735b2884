"""NIH's expert box list (`BBox_List_2017.csv`): only the stages that score or draw localisation read it.

Apart from `nih.py` so that editing the box parser re-runs explain, not the whole pipeline (DVC
re-runs a stage when a module it imports changes).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.data.nih import CLASSES
from cxr14.runtime.errors import PipelineError

BBOX_LIST = "BBox_List_2017.csv"
BOX_LABELS = {"Infiltrate": "Infiltration"}  # NIH's spelling in BBox_List_2017.csv


def read_box_list(path: Path | str) -> pd.DataFrame:
    """NIH's box list as Image Index, Finding (a CLASSES name), x, y, w, h in original-image pixels, and the
    file line of each box.

    The file's header has the quirk `Bbox [x,y,w,h],,,` (nine names for six fields), so it is read
    with the csv module, row by row, to name the line of any bad value.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise PipelineError(f"{path}: box list not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{path}: cannot read box list ({exc})") from None
    if not rows or rows[0][:2] != ["Image Index", "Finding Label"]:
        raise PipelineError(f"{path} line 1: expected the header 'Image Index,Finding Label,Bbox [x,y,w,h],,,'")
    out = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 6 or any(cell.strip() for cell in row[6:]):
            raise PipelineError(f"{path} line {lineno}: {len(row)} fields; expected image,finding,x,y,w,h")
        finding = BOX_LABELS.get(row[1].strip(), row[1].strip())
        if finding not in CLASSES:
            raise PipelineError(f"{path} line {lineno}: unknown finding '{row[1]}'; expected one of "
                                f"{', '.join(CLASSES)} (or Infiltrate)")
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            raise PipelineError(f"{path} line {lineno}: box {row[2:6]} is not four numbers x,y,w,h") from None
        if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0:
            raise PipelineError(f"{path} line {lineno}: box {row[2:6]}; expected finite x,y and positive w,h")
        out.append((row[0].strip(), finding, x, y, w, h, lineno))
    return pd.DataFrame(out, columns=["Image Index", "Finding", "x", "y", "w", "h", "line"])

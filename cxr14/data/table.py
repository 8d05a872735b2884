"""Your own labelled images as a dataset (`data.format: table`): one CSV row per image, in any folder structure.

Columns (docs/datasets.md): `image` (a PNG, JPEG or DICOM file, relative to the CSV's folder or absolute),
`patient` (any id: splits keep a patient's images together), any of the 14 findings (CLASSES) as 1, 0 or empty
(unknown), and optionally `sex` (M/F), `age` (years), `view` (PA/AP/LATERAL) and `test` (1: the dataset's official
test image, 0: not; without the column the test split is drawn by patient, `split.test_fraction`). A finding the
table does not have, or a cell left empty, is unknown (NaN) from the split tables on: masked in the loss, left out
of every AUC, threshold and calibrator, never taken as a negative. Every refusal is one line naming the file,
line and column.
"""

from __future__ import annotations

import difflib
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.data.nih import CLASSES
from cxr14.data.splits import split_metrics, stratified_patient_split
from cxr14.runtime.errors import PipelineError, warn

REQUIRED = ("image", "patient")
OPTIONAL = {"sex": "Patient Gender", "age": "Patient Age", "view": "View Position"}  # -> the split tables' names
TEST = "test"
COLUMNS = (*REQUIRED, *CLASSES, *OPTIONAL, TEST)
SEXES, VIEWS = ("M", "F"), ("PA", "AP", "LATERAL")


def table_path(root: Path | str, table: str) -> Path:
    """The CSV `data.table` names: relative to `data.root` (the folder DVC tracks), or absolute."""
    return Path(table) if os.path.isabs(table) else Path(root) / table


def bad_cells(path: Path, frame: pd.DataFrame, column: str, ok: np.ndarray, expected: str) -> None:
    """One line for the first cell of `column` failing `ok`, naming the file line (the header is line 1)."""
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise PipelineError(f"{path} line {i + 2}, column {column}: {frame[column].iloc[i]!r}; expected {expected}")


def read_table(path: Path | str) -> pd.DataFrame:
    """The table, checked: known columns, the required ones filled, one row per image, findings 0/1/empty, the
    optional columns in range. Findings as float (NaN = unknown); every other column as text."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such table (data.table, relative to data.root or absolute)") from None
    except (OSError, UnicodeDecodeError, EOFError, zlib.error, pd.errors.ParserError) as exc:
        raise PipelineError(f"{path}: cannot read the table ({' '.join(str(exc).split())})") from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: empty; expected a header line with image, patient and findings") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for column in frame.columns:
        if column not in COLUMNS:
            close = difflib.get_close_matches(column, COLUMNS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"expected {', '.join(REQUIRED)}, findings among " \
                   f"{', '.join(CLASSES)}, or {', '.join([*OPTIONAL, TEST])}"
            raise PipelineError(f"{path}: unknown column {column!r}; {hint}")
    dup = pd.Index(frame.columns).duplicated()
    if dup.any():
        raise PipelineError(f"{path}: column {frame.columns[int(np.flatnonzero(dup)[0])]!r} appears twice")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: no column {', '.join(missing)}; expected image (a file path) and patient (an id)")
    findings = [c for c in CLASSES if c in frame.columns]
    if not findings:
        raise PipelineError(f"{path}: no finding column; expected at least one of {', '.join(CLASSES)} (1, 0 or "
                            "empty per image)")
    if frame.empty:
        raise PipelineError(f"{path}: no rows; expected one per image")
    for column in REQUIRED:
        frame[column] = frame[column].str.strip()
        bad_cells(path, frame, column, frame[column].fillna("").to_numpy() != "", "a non-empty value")
    dup = frame["image"].duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero((frame["image"] == frame["image"].iloc[i]).to_numpy())[0])
        raise PipelineError(f"{path} line {i + 2}: image {frame['image'].iloc[i]} already on line {first + 2}; "
                            "expected one row per image")
    for column in findings:
        text = frame[column].str.strip()
        bad_cells(path, frame, column, (text.isna() | text.isin(["0", "1"])).to_numpy(), "1, 0 or empty (unknown)")
        frame[column] = pd.to_numeric(text).astype(np.float64)
    if "sex" in frame:
        frame["sex"] = frame["sex"].str.strip().str.upper()
        bad_cells(path, frame, "sex", (frame["sex"].isna() | frame["sex"].isin(SEXES)).to_numpy(), "M, F or empty")
    if "view" in frame:
        frame["view"] = frame["view"].str.strip().str.upper()
        bad_cells(path, frame, "view", (frame["view"].isna() | frame["view"].isin(VIEWS)).to_numpy(),
                  f"{', '.join(VIEWS)} or empty")
    if "age" in frame:
        age = pd.to_numeric(frame["age"], errors="coerce")
        bad_cells(path, frame, "age", (frame["age"].isna() | ((age >= 0) & (age <= 150))).to_numpy(),
                  "an age in years (0 to 150) or empty")
    if TEST in frame:
        frame[TEST] = frame[TEST].str.strip()
        bad_cells(path, frame, TEST, frame[TEST].isin(["0", "1"]).to_numpy(), "1 (an official test image) or 0")
        both = frame.groupby("patient")[TEST].nunique()
        if (both > 1).any():
            patient = both[both > 1].index[0]
            rows = np.flatnonzero((frame["patient"] == patient).to_numpy())
            raise PipelineError(f"{path} line {rows[0] + 2}, column {TEST}: patient {patient} has images on both sides "
                                f"of the test flag ({int((both > 1).sum())} such patient(s)); expected all of a "
                                "patient's images in test or none")
    return frame


def build_table_splits(root: Path | str, table: str, val_fraction: float, test_fraction: float, seed: int,
                       missing: str) -> tuple[dict, dict]:
    """Read the table `data.table` (under `data.root`); return ({split: table}, report) as `build_splits` does for
    NIH: the test split from the table's `test` flag (or drawn by patient), train/val patient-disjoint and
    stratified; image paths resolved against the CSV's folder."""
    path = table_path(root, table)
    frame = read_table(path)
    folder = path.parent
    frame["path"] = [image if os.path.isabs(image) else os.path.join(folder, image) for image in frame["image"]]
    present = np.array([os.path.isfile(p) for p in frame["path"]])
    if not present.all():
        i = int(np.flatnonzero(~present)[0])
        if missing == "error":
            raise PipelineError(f"{path} line {i + 2}, column image: {frame['path'].iloc[i]} not found "
                                f"({int((~present).sum())} of {len(frame)} images missing); expected a file relative "
                                "to the table's folder or absolute, or set data.missing: skip")
        warn(f"{path}: {int((~present).sum())} of {len(frame)} images missing (first: line {i + 2}, "
             f"{frame['path'].iloc[i]}); left out (data.missing: skip)")
    absent = int((~present).sum())
    frame = frame[present].reset_index(drop=True)
    if frame.empty:
        raise PipelineError(f"{path}: none of its images were found")
    out = pd.DataFrame({"Image Index": frame["image"], "Patient ID": frame["patient"],
                        **{name: frame[c] for c, name in OPTIONAL.items() if c in frame},
                        "path": frame["path"],
                        **{c: frame[c] if c in frame else np.full(len(frame), np.nan) for c in CLASSES}})
    if TEST in frame:
        in_test = (frame[TEST] == "1").to_numpy()
    else:
        in_test = stratified_patient_split(out, test_fraction, seed)
    test, train_val = out[in_test].reset_index(drop=True), out[~in_test].reset_index(drop=True)
    if test.empty or train_val.empty:
        raise PipelineError(f"{path}: no {'test' if test.empty else 'train/val'} images; expected some of each "
                            f"({'the test column' if TEST in frame else 'split.test_fraction'} decides)")
    in_val = stratified_patient_split(train_val, val_fraction, seed)
    splits = {"train": train_val[~in_val].reset_index(drop=True), "val": train_val[in_val].reset_index(drop=True),
              "test": test}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        overlap = set(splits[a]["Patient ID"]) & set(splits[b]["Patient ID"])
        assert not overlap, f"patients in both {a} and {b}: {sorted(overlap)[:5]}"
    report = {"format": "table", "table": str(path), **split_metrics(Path(root), absent, splits)}
    for name, t in splits.items():
        report[name]["unknown"] = {c: int(t[c].isna().sum()) for c in CLASSES if t[c].isna().any()}
    absent_findings = [c for c in CLASSES if c not in frame]
    if absent_findings:
        report["findings_absent"] = absent_findings
    for cls in CLASSES:
        if cls in frame and report["val"]["positives"][cls] == 0:
            warn(f"no {cls} positives in val; its val AUC will be undefined")
    return splits, report

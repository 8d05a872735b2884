"""The official test list, and a patient-disjoint, label-stratified train/val split.

The original ChestX-ray14 recipe split validation by image, so a patient's follow-ups sat in both train and val and
inflated val AUC. Here whole patients go to one split, and rare findings (Hernia: 227 of
112,120 images) are placed first so that val still has positives of every class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.data.nih import (
    CLASSES,
    META_COLUMNS,
    TEST_LIST,
    TRAIN_VAL_LIST,
    find_label_table,
    read_image_list,
    read_label_table,
    scan_images,
)
from cxr14.runtime.errors import PipelineError, warn


def read_split_table(table: Path | str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A split stage table (or some of its columns), or a one-line error saying to run the split stage."""
    try:
        return pd.read_csv(table, usecols=list(columns) if columns else None)
    except PermissionError:  # the table is there: re-running split would not help
        raise PipelineError(f"{table}: permission denied; the split table must be readable by this user") from None
    except (OSError, ValueError, pd.errors.EmptyDataError) as exc:  # ParserError is a ValueError
        raise PipelineError(f"{table}: cannot read the split table ({' '.join(str(exc).split())}); "
                            "run the split stage (dvc repro split)") from None


def _line_of(path: Path, name: str) -> int:
    """File line (1-based) of `name` in a split list, for error messages."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == name)


def check_official_lists(table: pd.DataFrame, train_val: list[str], test: list[str], root: Path) -> None:
    """Refuse lists that overlap by image or patient, or name images the label table lacks."""
    test_set = set(test)
    both = [n for n in train_val if n in test_set]
    if both:
        raise PipelineError(
            f"{root / TEST_LIST} line {_line_of(root / TEST_LIST, both[0])}: {both[0]} is also in {TRAIN_VAL_LIST} "
            f"({len(both)} image(s) in both); expected disjoint official lists"
        )
    known = set(table["Image Index"])
    for list_name, names in ((TRAIN_VAL_LIST, train_val), (TEST_LIST, test)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PipelineError(
                f"{root / list_name} line {_line_of(root / list_name, unknown[0])}: {unknown[0]} is not in the label "
                f"table ({len(unknown)} such image(s)); expected every listed image to have a row"
            )
    patient = table.set_index("Image Index")["Patient ID"]
    shared = set(patient.loc[train_val]) & set(patient.loc[test])
    if shared:
        pid = min(shared)
        example = next(n for n in test if patient[n] == pid)
        raise PipelineError(
            f"{root / TEST_LIST} line {_line_of(root / TEST_LIST, example)}: patient {pid} ({example}) is also in "
            f"{TRAIN_VAL_LIST} ({len(shared)} such patient(s)); expected patient-disjoint lists"
        )


def stratified_patient_split(table: pd.DataFrame, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of `table` rows in val: whole patients, each class's positives near `val_fraction`.

    Greedy iterative stratification over patients: patients are visited rarest-finding first and
    each goes to whichever side is further (relatively) below its target for that finding.
    """
    # an unknown label (NaN, an own-data table's) counts as no positive here
    labels = np.nan_to_num(table[list(CLASSES)].to_numpy(dtype=np.float64)).astype(np.int64)
    patients, inverse = np.unique(table["Patient ID"].to_numpy(), return_inverse=True)
    counts = np.zeros((len(patients), len(CLASSES)), dtype=np.int64)
    np.add.at(counts, inverse, labels)
    images = np.bincount(inverse, minlength=len(patients)).astype(np.float64)

    totals = counts.sum(axis=0).astype(np.float64)
    # Column 0 balances image counts (decides patients without findings); then one column per class.
    target = np.vstack([(1 - val_fraction) * np.r_[images.sum(), totals], val_fraction * np.r_[images.sum(), totals]])
    need = target.copy()
    rarity = np.where(counts > 0, totals[None, :], np.inf)
    key_class = np.where(np.isfinite(rarity.min(axis=1)), rarity.argmin(axis=1) + 1, 0)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(patients)), np.where(key_class > 0, totals[key_class - 1], np.inf)))
    in_val = np.zeros(len(patients), dtype=bool)
    gains = np.hstack([images[:, None], counts])
    for p in order:
        k = key_class[p]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = need[:, k] / np.where(target[:, k] > 0, target[:, k], 1)
        side = int(rel[1] > rel[0]) if rel[0] != rel[1] else int(rng.random() < val_fraction)
        in_val[p] = bool(side)
        need[side] -= gains[p]
    return in_val[inverse]


def build_splits(root: Path | str, val_fraction: float, seed: int, missing: str) -> tuple[dict, dict]:
    """Read the dataset at `root`; return ({split: table}, metrics)."""
    root = Path(root)
    table = read_label_table(find_label_table(root))
    train_val = read_image_list(root / TRAIN_VAL_LIST)
    test = read_image_list(root / TEST_LIST)
    check_official_lists(table, train_val, test, root)

    files = scan_images(root)
    listed = train_val + test
    absent = [n for n in listed if n not in files]
    if absent and missing == "error":
        raise PipelineError(
            f"{root}: {len(absent)} of {len(listed)} listed images are missing (first: {', '.join(absent[:3])}); "
            "expected them under images/ or images_*/images/, or set data.missing: skip"
        )
    table = table.set_index("Image Index", drop=False)
    table["path"] = table["Image Index"].map(files)
    present = table["path"].notna()

    test_table = table.loc[test]
    tv_table = table.loc[train_val]
    tv_table, test_table = tv_table[present.loc[train_val]], test_table[present.loc[test]]
    if tv_table.empty or test_table.empty:
        raise PipelineError(f"{root}: no images found for {'train/val' if tv_table.empty else 'test'}")
    in_val = stratified_patient_split(tv_table.reset_index(drop=True), val_fraction, seed)
    columns = ["Image Index", "Patient ID", *[c for c in META_COLUMNS if c in table.columns], "path", *CLASSES]
    splits = {  # the split tables' contract (paths.SPLIT)
        "train": tv_table[~in_val][columns].reset_index(drop=True),
        "val": tv_table[in_val][columns].reset_index(drop=True),
        "test": test_table[columns].reset_index(drop=True),
    }
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        overlap = set(splits[a]["Patient ID"]) & set(splits[b]["Patient ID"])
        assert not overlap, f"patients in both {a} and {b}: {sorted(overlap)[:5]}"
    metrics = split_metrics(root, len(absent), splits)
    for cls in CLASSES:
        if metrics["val"]["positives"][cls] == 0:
            warn(f"no {cls} positives in val; its val AUC will be undefined")
    return splits, metrics


def split_metrics(root: Path, missing_images: int, splits: dict[str, pd.DataFrame]) -> dict:
    """The split stage's metrics: where the data came from, how many listed images were missing, and per split
    its images, patients and positives per class."""
    return {
        "root": str(root),
        "missing_images": missing_images,
        **{
            name: {
                "images": len(t),
                "patients": int(t["Patient ID"].nunique()),
                "positives": {c: int(t[c].sum()) for c in CLASSES},
            }
            for name, t in splits.items()
        },
    }

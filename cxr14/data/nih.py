"""The NIH ChestX-ray14 layout, defined once: class names, label table, split lists, image files.

Both download layouts are understood: the NIH box (`images/`) and Kaggle's
(`images_001/images/` ... `images_012/images/`). Images are found with one directory scan per
folder, because 112,120 globs (one per image) take minutes on network storage.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr14.runtime.errors import PipelineError

if TYPE_CHECKING:  # pandas is imported where a table is read: predict's ONNX path imports this module without it
    import pandas as pd

# The original ChestX-ray14 recipe's order; every array of 14 scores or labels in this project follows it.
CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
LABEL_TABLE_NAMES = (
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
)
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
# Kept as they are when the table has them (subgroup metrics check their values, and count the bad ones).
META_COLUMNS = ("Patient Age", "Patient Gender", "View Position")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")  # DICOM: also found by content when named
# Google's expert labels (evaluation/expert.py), under the name torchxrayvision ships them; looked for in the data root.
EXPERT_FILES = ("google2019_nih-chest-xray-labels.csv", "google2019_nih-chest-xray-labels.csv.gz")
FINDINGS: dict[str, tuple[str, ...]] = {  # expert finding: the NIH classes it maps onto (why: cxr14.evaluation.expert)
    "Pneumothorax": ("Pneumothorax",),
    "Nodule or mass": ("Nodule", "Mass"),
    "Airspace opacity": ("Infiltration", "Consolidation", "Pneumonia", "Edema"),
    "Fracture": (),
}


def find_label_table(root: Path | str) -> Path:
    """The label table under `root`, whichever of NIH's names (original, 2020 revision, gzipped) it has."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{root}: data root is not a directory (set data.root in params.yaml)")
    for name in LABEL_TABLE_NAMES:
        if (root / name).is_file():
            return root / name
    raise PipelineError(f"{root}: no label table; expected one of {', '.join(LABEL_TABLE_NAMES)}")


def parse_findings(text: str, where: str) -> np.ndarray:
    """'Mass|Nodule' -> 0/1 vector in CLASSES order; 'No Finding' is all zeros."""
    labels = np.zeros(len(CLASSES), dtype=np.uint8)
    if not isinstance(text, str) or not text.strip():
        raise PipelineError(f"{where}: empty 'Finding Labels'; expected class names joined by '|' or '{NO_FINDING}'")
    names = [t.strip() for t in text.split("|")]
    for name in names:
        if name == NO_FINDING:
            if len(names) > 1:
                raise PipelineError(f"{where}: '{NO_FINDING}' combined with findings in '{text}'")
            continue
        try:
            labels[CLASSES.index(name)] = 1
        except ValueError:
            raise PipelineError(
                f"{where}: unknown finding '{name}' in '{text}'; expected one of {', '.join(CLASSES)} or '{NO_FINDING}'"
            ) from None
    return labels


def read_label_table(path: Path | str) -> pd.DataFrame:
    """Image Index, Patient ID, the META_COLUMNS it has (unchecked), one 0/1 column per class; checked row by row."""
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"Image Index": str, "Finding Labels": str}, low_memory=False)
    except (OSError, UnicodeDecodeError, EOFError, zlib.error, pd.errors.ParserError) as exc:
        raise PipelineError(f"{path}: cannot read label table ({exc})") from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: label table is empty") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"expected at least {', '.join(REQUIRED_COLUMNS)}"
        )
    if table.empty:
        raise PipelineError(f"{path}: label table has no rows")
    # Row numbers in messages are file lines: the header is line 1.
    patient = pd.to_numeric(table["Patient ID"], errors="coerce")
    bad = patient.isna() | (patient != patient.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise PipelineError(
            f"{path} line {i + 2}: Patient ID {table['Patient ID'].iloc[i]!r} is not an integer"
        )
    names = table["Image Index"]
    if names.isna().any():
        i = int(np.flatnonzero(names.isna().to_numpy())[0])
        raise PipelineError(f"{path} line {i + 2}: empty 'Image Index'")
    dup = names.duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise PipelineError(f"{path} line {i + 2}: image {names.iloc[i]} appears twice; expected one row per image")
    # 112k rows but only ~800 distinct label strings: parse each string once.
    unique = table["Finding Labels"].fillna("").unique()
    first_row = {text: i for i, text in reversed(list(enumerate(table["Finding Labels"].fillna(""))))}
    parsed = {text: parse_findings(text, f"{path} line {first_row[text] + 2}") for text in unique}
    labels = np.stack([parsed[t] for t in table["Finding Labels"].fillna("")])
    out = pd.DataFrame({"Image Index": names.to_numpy(), "Patient ID": patient.astype(np.int64).to_numpy(),
                        **{c: table[c].to_numpy() for c in META_COLUMNS if c in table.columns}})
    return pd.concat([out, pd.DataFrame(labels, columns=list(CLASSES))], axis=1)


def read_image_list(path: Path | str) -> list[str]:
    """One image name per line (NIH's official split lists); blank lines ignored, duplicates refused."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise PipelineError(f"{path}: split list not found; expected NIH's {path.name} in the data root") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read split list ({exc})") from None
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise PipelineError(f"{path} line {lineno}: {name} already listed on line {seen[name]}")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise PipelineError(f"{path}: split list is empty; expected one image name per line")
    return names


def image_dirs(root: Path | str) -> list[Path]:
    """Folders holding images: `images/` (NIH) and/or `images_NNN/images/` (Kaggle), sorted."""
    root = Path(root)
    dirs = [root / "images"] if (root / "images").is_dir() else []
    dirs += sorted(p / "images" for p in root.glob("images_*") if (p / "images").is_dir())
    # Some Kaggle mirrors unpack images_NNN/ without the inner images/ folder.
    dirs += sorted(p for p in root.glob("images_*") if p.is_dir() and not (p / "images").is_dir())
    return dirs


def scan_images(root: Path | str) -> dict[str, str]:
    """Map image file name -> path (as `root`/..., relative if root is), one os.scandir per folder."""
    found: dict[str, str] = {}
    for folder in image_dirs(root):
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.name not in found:
                    found[entry.name] = os.path.join(folder, entry.name)
    return found

"""Derive the small statistics file the demo stage samples from, out of NIH's real label table.

The demo dataset must look like ChestX-ray14 (label frequencies, co-occurrence, follow-ups, age,
sex, view) without shipping the 112,120-row table. This tool boils the table down to a few KB of
counts, committed as `cxr14/data/demo_stats.json`; rerun it only if NIH publishes a new table.

    python tools/derive_demo_stats.py [--nih ../shared/nih] [--out cxr14/data/demo_stats.json]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.data.demo import STATS_FILE
from cxr14.data.nih import CLASSES, NO_FINDING, find_label_table, read_label_table
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import write_json
from cxr14.runtime.signals import run_main

IMAGES_PER_PATIENT_CAP = 30  # the last bucket counts patients with >= this many images
AGE_BIN = 5  # years per age bucket
MIN_COMBO_COUNT = 1  # keep every label combination; raise this to shrink the file


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def combo_name(row: np.ndarray) -> str:
    """Canonical 'Finding Labels' text: names in CLASSES order, or No Finding."""
    names = [c for c, on in zip(CLASSES, row, strict=True) if on]
    return "|".join(names) if names else NO_FINDING


def derive(table: pd.DataFrame, labels: pd.DataFrame) -> dict:
    """Counts only: nothing that identifies an image or a patient survives."""
    matrix = labels[list(CLASSES)].to_numpy()
    combos = pd.Series([combo_name(r) for r in matrix]).value_counts()
    combos = combos.sort_index(kind="stable").sort_values(ascending=False, kind="stable")  # count desc, then name
    kept = combos[combos >= MIN_COMBO_COUNT]
    per_patient = table.groupby("Patient ID").size().clip(upper=IMAGES_PER_PATIENT_CAP)
    ipp = per_patient.value_counts().reindex(range(1, IMAGES_PER_PATIENT_CAP + 1), fill_value=0)
    age = pd.to_numeric(table["Patient Age"], errors="coerce").dropna()
    age_hist, _ = np.histogram(age, bins=np.arange(0, 100 + AGE_BIN, AGE_BIN))
    return {
        "classes": list(CLASSES),
        "images": len(table),
        "patients": int(table["Patient ID"].nunique()),
        "class_counts": dict(zip(CLASSES, map(int, matrix.sum(axis=0)), strict=True)),
        "combinations": {
            "note": f"images per label set ('Finding Labels' canonicalised to CLASSES order: "
            f"{table['Finding Labels'].nunique()} strings -> {len(combos)} sets); "
            + (f"sets seen < {MIN_COMBO_COUNT} times dropped ({int(combos[combos < MIN_COMBO_COUNT].sum())} images)"
               if MIN_COMBO_COUNT > 1 else "all kept"),
            "counts": {k: int(v) for k, v in kept.items()},
        },
        "images_per_patient": {
            "note": f"patients with 1..{IMAGES_PER_PATIENT_CAP} images; the last bucket is >= {IMAGES_PER_PATIENT_CAP}",
            "counts": [int(v) for v in ipp],
        },
        "view_position": {str(k): int(v) for k, v in table["View Position"].value_counts().sort_index().items()},
        "gender": {str(k): int(v) for k, v in table["Patient Gender"].value_counts().sort_index().items()},
        "age": {
            "bin_years": AGE_BIN,
            "counts": [int(v) for v in age_hist],
            "mean": round(float(age.mean()), 2),
            "std": round(float(age.std()), 2),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=Path("../shared/nih"), help="folder with NIH's label table")
    parser.add_argument("--out", type=Path, default=STATS_FILE, help="JSON file to write (what the demo stage reads)")
    args = parser.parse_args(argv)
    if not args.nih.is_dir():
        raise PipelineError(f"{args.nih}: not a directory; pass --nih with the folder holding NIH's label table")
    path = find_label_table(args.nih)
    try:
        table = pd.read_csv(path, low_memory=False)
    except (OSError, pd.errors.ParserError) as exc:
        raise PipelineError(f"{path}: cannot read ({exc})") from None
    for column in ("Patient Age", "Patient Gender", "View Position"):
        if column not in table.columns:
            raise PipelineError(f"{path}: missing column '{column}'")
    stats = {"source": {"file": path.name, "sha256": sha256(path)}, **derive(table, read_label_table(path))}
    write_json(args.out, stats)
    print(f"{args.out}: {len(stats['combinations']['counts'])} label combinations, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    run_main(main)

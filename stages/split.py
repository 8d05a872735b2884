"""Split stage: NIH's official test list, and a patient-disjoint, label-stratified train/val split.

Replaces the folder data/split with {train,val,test}.csv (Image Index, Patient ID, path, one 0/1 column per class)
and metrics/split.json (images, patients and positives per class in each split).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr14 import paths
from cxr14.data.splits import build_splits
from cxr14.params import PARAMS_FILE, Data, Split, load_section
from cxr14.runtime.outputs import replace_dir, write_json
from cxr14.runtime.signals import run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (sections data, split)")
    parser.add_argument("--out", type=Path, default=paths.SPLIT, help="folder for train.csv, val.csv, test.csv")
    parser.add_argument("--metrics", type=Path, default=paths.METRICS / "split.json", help="JSON file of split sizes")
    args = parser.parse_args(argv)
    data, split = load_section(args.params, Data), load_section(args.params, Split)
    splits, metrics = build_splits(data.root, split.val_fraction, split.seed, data.missing)
    with replace_dir(args.out) as tmp:  # the three tables are replaced together, in one rename, or not at all
        for name, frame in splits.items():
            frame.to_csv(tmp / f"{name}.csv", index=False)
    write_json(args.metrics, metrics)
    sizes = ", ".join(f"{n} {metrics[n]['images']} images / {metrics[n]['patients']} patients" for n in paths.SPLITS)
    skipped = f"; skipped {metrics['missing_images']} missing" if metrics["missing_images"] else ""
    print(f"split: {sizes}{skipped}")


if __name__ == "__main__":
    run_main(main)

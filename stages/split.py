"""Split stage: NIH's official test list (or an own-data table's test flag), and a patient-disjoint, stratified
train/val split.

Replaces the folder data/split with {train,val,test}.csv (Image Index, Patient ID, path, one 0/1 column per class),
writes reports/split.json (images, patients and positives per class in each split) and metrics/split.json
(images per split: the figures an experiment changes only when its data does).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr14 import paths
from cxr14.data.splits import build_splits
from cxr14.data.table import build_table_splits
from cxr14.params import PARAMS_FILE, load_params
from cxr14.runtime.outputs import replace_dir, write_json
from cxr14.runtime.signals import run_main

METRICS = paths.METRICS / "split.json"


def headline(report: dict) -> dict[str, int]:
    """metrics/split.json: images per split; patients and positives per class stay in the report."""
    return {f"{name}_images": report[name]["images"] for name in paths.SPLITS}



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (sections data, split)")
    parser.add_argument("--out", type=Path, default=paths.SPLIT, help="folder for train.csv, val.csv, test.csv")
    parser.add_argument("--metrics", type=Path, default=METRICS, help="JSON file of images per split")
    parser.add_argument("--report", type=Path, help="JSON file of split sizes and positives per class (default: "
                        "reports/split.json, or <metrics>.report.json beside a --metrics given elsewhere)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    data, split = params.data, params.split
    if data.format == "table":
        splits, report = build_table_splits(data.root, data.table, split.val_fraction, split.test_fraction,
                                            split.seed, data.missing)
    else:
        splits, report = build_splits(data.root, split.val_fraction, split.seed, data.missing)
    with replace_dir(args.out) as tmp:  # the three tables are replaced together, in one rename, or not at all
        for name, frame in splits.items():
            frame.to_csv(tmp / f"{name}.csv", index=False)
    write_json(paths.report_for(args.metrics, args.report), report)
    write_json(args.metrics, headline(report))
    sizes = ", ".join(f"{n} {report[n]['images']} images / {report[n]['patients']} patients" for n in paths.SPLITS)
    skipped = f"; skipped {report['missing_images']} missing" if report["missing_images"] else ""
    print(f"split: {sizes}{skipped}")


if __name__ == "__main__":
    run_main(main)

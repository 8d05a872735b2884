"""Prepare stage: decode every image once into one memory-mappable uint8 array per split.

Writes data/prepared/{train,val,test}.npy, uint8 (N, S, S) in split-table order, with S =
prepare.image_size; all three appear together or not at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr14 import paths
from cxr14.data.arrays import write_array
from cxr14.data.splits import read_split_table
from cxr14.params import PARAMS_FILE, load_params
from cxr14.runtime.devices import cpu_count
from cxr14.runtime.outputs import ensure_space, replace_dir
from cxr14.runtime.signals import run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (section prepare)")
    parser.add_argument("--split-dir", type=Path, default=paths.SPLIT, help="folder of train/val/test.csv")
    parser.add_argument("--out", type=Path, default=paths.PREPARED, help="folder for <split>.npy")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    prepare = params.prepare
    workers = prepare.workers or cpu_count()
    tables = {name: args.split_dir / f"{name}.csv" for name in paths.SPLITS}
    image_paths = {name: read_split_table(table, ["path"])["path"].tolist() for name, table in tables.items()}
    # The old arrays stay until the new ones are complete: room for both, checked before hours of decoding.
    ensure_space(args.out, sum(len(v) * prepare.image_size ** 2 + 128 for v in image_paths.values()))
    # All three arrays replace the old folder in one rename or not at all: a bad image in test leaves no new
    # train.npy, and a kill at any moment leaves no temporary file inside the output DVC tracks.
    with replace_dir(args.out) as tmp:
        for name in paths.SPLITS:
            write_array(image_paths[name], prepare.image_size, workers, tmp / f"{name}.npy", tables[name],
                        desc=f"prepare {name}")
    for name in paths.SPLITS:
        print(f"prepare: {name}: {len(image_paths[name])} images -> {args.out / name}.npy "
              f"({prepare.image_size}x{prepare.image_size} uint8)")


if __name__ == "__main__":
    run_main(main)

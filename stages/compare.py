"""Compare two runs' test ROC-AUC: paired patient-bootstrap interval and p-value, DeLong's test per class.

    python -m stages.compare [A] [B] [--json] [--bootstrap N] [--seed S]

A and B are git revisions (commit, branch, tag), experiment names as `dvc exp show` lists them, or
`workspace` (defaults: HEAD against the workspace). Their test predictions are read through DVC at those
revisions, so nothing is checked out; the difference reported is B - A. Not a pipeline stage: it reads
runs, it writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxr14.evaluation.compare import WORKSPACE, compare, paired, read_run, table
from cxr14.params import PARAMS_FILE, Evaluate, load_section
from cxr14.runtime.signals import run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", nargs="?", default="HEAD", help="baseline run: git revision, experiment name or "
                        f"{WORKSPACE} (default HEAD)")
    parser.add_argument("b", nargs="?", default=WORKSPACE, help=f"run compared with it (default {WORKSPACE})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--bootstrap", type=int, help="paired patient resamples (default: evaluate.bootstrap)")
    parser.add_argument("--seed", type=int, help="resampling seed (default: evaluate.seed)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project (default: this folder)")
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file for the defaults (section evaluate)")
    args = parser.parse_args(argv)
    e = load_section(args.repo / args.params, Evaluate)
    resamples = args.bootstrap if args.bootstrap is not None else e.bootstrap
    if resamples < 10:
        parser.error(f"--bootstrap {resamples}: expected at least 10 resamples")
    runs = (read_run(args.repo, args.a), read_run(args.repo, args.b))
    paired(*runs, (args.a, args.b))
    result = compare(*runs, resamples, args.seed if args.seed is not None else e.seed)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **result}, indent=2))
    else:
        print(table(result, (args.a, args.b)))


if __name__ == "__main__":
    run_main(main)

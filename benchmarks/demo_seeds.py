"""Benchmark: the demo recipe over several seeds: test mean ROC-AUC against the oracle, and `dvc repro` time.

The demo's oracle (the clean labels scored against the noisy ones) is the best any model can reach, so the
gap to it says how well a recipe learns the demo, whatever the seed. In a scratch clone of this repository
(its committed state, with its own empty DVC cache, so every run starts from nothing), for each seed set
`dvc exp run -S demo.seed=D -S split.seed=S -S train.seed=T [-S recipe overrides]` runs the whole DAG; the
script prints per seed set the val mean AUC (what a recipe is chosen on), the test mean AUC, the oracle, the
gap and the wall time of the run, then the worst gap and the mean time.

    python -m benchmarks.demo_seeds [--seeds 0,42,0 7,3,5 ...] [--set train.epochs=8 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.bench_queue import ROOT, dvc  # the same dvc runner, beside this Python

SEEDS = ["0,42,0", "7,3,5", "1,1,1", "2,2,2", "3,3,3"]  # demo.seed,split.seed,train.seed; the first is params.yaml's


def seed_args(triple: str) -> list[str]:
    """`-S` options for one 'demo,split,train' seed triple."""
    try:
        demo, split, train = (int(v) for v in triple.split(","))
    except ValueError:
        raise SystemExit(f"error: --seeds {triple!r}: expected three integers 'demo,split,train'") from None
    return ["-S", f"demo.seed={demo}", "-S", f"split.seed={split}", "-S", f"train.seed={train}"]


def run_one(work: Path, triple: str, overrides: list[str], stages: list[str]) -> dict:
    """One whole-DAG experiment in the scratch clone; its figures from the reports it wrote."""
    start = time.perf_counter()
    dvc("exp", "run", "-q", *seed_args(triple), *[a for o in overrides for a in ("-S", o)], *stages, cwd=work,
        capture=True)
    seconds = time.perf_counter() - start
    train = json.loads((work / "reports" / "train.json").read_text())
    evaluate = json.loads((work / "reports" / "evaluate.json").read_text())
    return {"seeds": triple, "val_mean_auc": train["best_val_mean_auc"], "best_epoch": train["best_epoch"],
            "test_mean_auc": evaluate["mean_auc"], "oracle_mean_auc": evaluate["oracle_mean_auc"],
            "gap_to_oracle": evaluate["gap_to_oracle"], "seconds": round(seconds, 1),
            "per_class": {k: [v["auc"], v.get("oracle_auc")] for k, v in evaluate["per_class"].items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", default=SEEDS, help="'demo,split,train' seed triples")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (-S)")
    parser.add_argument("--through", default="", help="last stage to run (default: the whole DAG)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="demo_seeds_")) / "repo"
    rows = []
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        for triple in args.seeds:
            print(f"seeds {triple} {' '.join(args.set)} ...", flush=True)
            rows.append(run_one(work, triple, args.set, [args.through] if args.through else []))
            r = rows[-1]
            print(f"  val {r['val_mean_auc']:.4f}  test {r['test_mean_auc']:.4f}  oracle {r['oracle_mean_auc']:.4f}"
                  f"  gap {r['gap_to_oracle']:.4f}  (best epoch {r['best_epoch']}, {r['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)
    summary = {"recipe": args.set, "cores": len(os.sched_getaffinity(0)), "runs": rows,
               "worst_gap": max(r["gap_to_oracle"] for r in rows),
               "mean_val_auc": round(sum(r["val_mean_auc"] for r in rows) / len(rows), 4),
               "mean_seconds": round(sum(r["seconds"] for r in rows) / len(rows), 1)}
    print(f"recipe {' '.join(args.set) or '(params.yaml)'}: worst gap {summary['worst_gap']:.4f}, mean val AUC "
          f"{summary['mean_val_auc']:.4f}, mean {summary['mean_seconds']:.0f} s per run from an empty cache")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

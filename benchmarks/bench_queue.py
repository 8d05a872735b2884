"""Benchmark: two demo experiments side by side (`dvc queue start -j 2`) against one after the other.

In a scratch clone of this repository (its committed state, sharing this checkout's DVC cache so the baseline's
data is not rebuilt), in one run:
  1. one after the other: `dvc exp run -S train.seed=.. -S train.lr_head=..` twice in the workspace, each stage
     using every core (OMP_NUM_THREADS unset);
  2. side by side: the same two recipes with other seeds (so DVC's run cache cannot answer them),
     `dvc exp run --queue` twice, then `OMP_NUM_THREADS=<cores / 2> dvc queue start -j 2`, timed until both
     have finished; each stage sizes its threads and workers from OMP_NUM_THREADS (cxr14.runtime.devices.cpu_count).
Prints both wall times and their ratio (issue 12's target: side by side <= 1.1x one after the other).

    python benchmarks/bench_queue.py [--epochs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [{"train.lr_head": "1e-3"}, {"train.lr_head": "2e-3"}]


def dvc(*args: str, cwd: Path, env: dict[str, str] | None = None, capture: bool = False) -> str:
    """Run a dvc command in `cwd` (the venv's dvc, beside this Python); stop the benchmark on failure."""
    exe = Path(sys.executable).with_name("dvc")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # stages run this Python
    result = subprocess.run([str(exe) if exe.is_file() else "dvc", *args], cwd=cwd, text=True,
                            env={**os.environ, "PATH": path, **(env or {})}, capture_output=capture)
    if result.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)} failed in {cwd} (exit {result.returncode})"
                         + (f": {result.stderr.strip().splitlines()[-1]}" if capture and result.stderr.strip() else ""))
    return result.stdout if capture else ""


def settings(recipe: dict[str, str], seed: int, epochs: int) -> list[str]:
    """`-S` options: the recipe, a seed, and all `epochs` epochs run (patience beyond them)."""
    values = {**recipe, "train.seed": str(seed), "train.epochs": str(epochs), "train.patience": str(epochs + 1)}
    return [arg for key, value in values.items() for arg in ("-S", f"{key}={value}")]


def wait_for_queue(work: Path, count: int, timeout: float) -> list[str]:
    """Poll `dvc queue status` until `count` tasks have finished; their statuses."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = dvc("queue", "status", cwd=work, capture=True).splitlines()
        done = [line for line in lines if any(s in line for s in ("Success", "Failed"))]
        if len(done) >= count:
            return done
        time.sleep(1.0)
    raise SystemExit(f"error: the queue did not finish {count} experiments within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per experiment (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch clone (printed)")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip():
        print("note: uncommitted changes are not benchmarked: the scratch clone holds the last commit",
              file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench_queue_")) / "repo"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        dvc("cache", "dir", "--local", str(ROOT / ".dvc" / "cache"), cwd=work)
        print("baseline: checking out (or reproducing) the committed pipeline ...", flush=True)
        dvc("checkout", "-q", cwd=work)
        dvc("repro", "-q", cwd=work)  # a no-op when the cache held every output

        start = time.perf_counter()
        for i, recipe in enumerate(RECIPES):
            print(f"one after the other: experiment {i + 1} of {len(RECIPES)} ...", flush=True)
            dvc("exp", "run", "-q", *settings(recipe, 100 + i, args.epochs), cwd=work)
        sequential = time.perf_counter() - start
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=work, check=True)
        dvc("checkout", "-q", "--force", cwd=work)

        for i, recipe in enumerate(RECIPES):
            dvc("exp", "run", "--queue", "-q", *settings(recipe, 200 + i, args.epochs), cwd=work)
        threads = max(1, cores // len(RECIPES))
        print(f"side by side: dvc queue start -j {len(RECIPES)}, OMP_NUM_THREADS={threads} ...", flush=True)
        start = time.perf_counter()
        dvc("queue", "start", "-j", str(len(RECIPES)), cwd=work, env={"OMP_NUM_THREADS": str(threads)},
            capture=True)
        statuses = wait_for_queue(work, len(RECIPES), timeout=3600)
        parallel = time.perf_counter() - start
        dvc("queue", "stop", cwd=work, capture=True)
        if any("Failed" in s for s in statuses):
            raise SystemExit("error: a queued experiment failed: " + "; ".join(statuses))
    finally:
        if args.keep:
            print(f"scratch clone kept: {work}")
        else:
            shutil.rmtree(work.parent, ignore_errors=True)
    figures = {"cores": cores, "experiments": len(RECIPES), "epochs": args.epochs,
               "one_after_the_other_s": round(sequential, 1), "side_by_side_s": round(parallel, 1),
               "ratio": round(parallel / sequential, 3), "threads_each_side_by_side": threads}
    print(f"{len(RECIPES)} demo experiments, {args.epochs} epochs each, {cores} cores:")
    print(f"  one after the other (dvc exp run, all cores each):     {sequential:7.1f} s")
    print(f"  side by side (dvc queue start -j {len(RECIPES)}, {threads} thread(s) each): {parallel:7.1f} s")
    print(f"  ratio side by side / one after the other: {parallel / sequential:.2f}x (target <= 1.1x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

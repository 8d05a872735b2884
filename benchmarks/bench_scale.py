"""Benchmark: the whole DVC pipeline at NIH scale, per stage seconds and peak memory, and how they grow.

The demo has 2,000 images; the real ChestX-ray14 has 112,120. This builds, in a scratch folder, a dataset
root in NIH layout from the real metadata in ../shared/nih (label table, official split lists, box list) for
subsets of about `--sizes` images, and runs every stage with `dvc repro -s <stage>` in a scratch copy of the
pipeline (git init + dvc init, as tests/conftest.py copy_pipeline does) with data.root pointing there.

Images: the 880 images that carry NIH's expert boxes are 1024x1024 (box coordinates are in that space):
the real PNG where ../shared/nih/images has it, else one of a few synthetic 1024 px PNGs, hard-linked.
Every other image is a small synthetic grayscale PNG (`--small-px`), each one distinct, so the model's test
scores are distinct as on real data (a handful of repeated images would turn the AUC's 25k scores into a
handful of ties and make evaluate's bootstrap look cheaper than it is).

Subsets keep all 880 boxed images (all in NIH's test list), official list membership, and otherwise whole
patients: the test list gets its official share of the images (22.8%), the boxed images' patients whole only
where all their 15,938 images fit in that share (so at the full size), else their boxed images alone.

Training is capped by the params there are (no step cap exists): `train.epochs=1`, resnet18, 64 px, batch
128, `train.cpu_kernels=native`; `--set section.key=value` overrides any param (e.g. a step cap, once one exists).
Each stage runs under a psutil sampler (every 100 ms) of the `dvc repro -s` process tree: seconds and peak
RSS of the whole tree (DVC's hashing and caching included) and of the stage's own command (the
`python -m stages.<name>` process and its workers); "anon" is RSS minus file-backed and shared pages
(what a memory-mapped array does not count). Then the time of a no-op `dvc status` (median of 3).

    python benchmarks/bench_scale.py [--sizes 2000 20000 112120] [--json OUT] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NIH = ROOT.parent / "shared" / "nih"
STAGES = ("demo", "split", "prepare", "train", "evaluate", "calibrate", "explain")
BOX_SIZE = 1024  # NIH's box coordinates are in the 1024x1024 images' pixels
BIG_VARIANTS = 4  # distinct synthetic 1024 px PNGs, hard-linked under every boxed image's name
CHUNK = 2048  # small images written per worker task
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.org"]
OVERRIDES: dict[str, dict[str, Any]] = {
    # The demo stage is in the DAG whatever data.root says; at its smallest it costs seconds and keeps
    # `dvc status` clean.
    "demo": {"patients": 24, "images": 60, "image_size": 64},
    "prepare": {"workers": 0},
    # No param caps training steps: one epoch of a small model on small images, in large batches, with
    # oneDNN's own kernels (1.6x faster here than the AVX2 cap; evaluate and explain follow this param too).
    "train": {"arch": "resnet18", "epochs": 1, "batch_size": 128, "cpu_kernels": "native", "device": "cpu",
              "workers": 0},
}


# ---------------------------------------------------------------------------------------------- the dataset


def read_metadata(nih: Path) -> tuple[list[str], list[str], pd.DataFrame, set[str], set[str]]:
    """The label table's header and raw lines (written back verbatim), the table, the test list, the boxed images."""
    table_path = next((nih / n for n in ("Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv.gz",
                                         "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv") if (nih / n).is_file()),
                      None)
    if table_path is None:
        raise SystemExit(f"{nih}: no label table Data_Entry_2017*.csv[.gz]; pass --nih")
    opener = gzip.open if table_path.suffix == ".gz" else open
    with opener(table_path, "rt", newline="") as f:
        header, *lines = [line for line in f.read().splitlines() if line.strip()]
    table = pd.read_csv(io.StringIO("\n".join([header, *lines])), usecols=["Image Index", "Patient ID"])
    if len(table) != len(lines):
        raise SystemExit(f"{table_path}: {len(table)} rows parsed from {len(lines)} lines")
    test = set((nih / "test_list.txt").read_text().split())
    boxed = set(pd.read_csv(nih / "BBox_List_2017.csv", usecols=[0]).iloc[:, 0])
    return header, lines, table, test, boxed


def meta_boxes(nih: Path, test_images: set[str]) -> int:
    """Boxes in NIH's list on these test images: what explain must score."""
    return int(pd.read_csv(nih / "BBox_List_2017.csv", usecols=[0]).iloc[:, 0].isin(test_images).sum())


def choose_subset(table: pd.DataFrame, test: set[str], boxed: set[str], size: int, seed: int) -> np.ndarray:
    """Boolean mask of table rows: all boxed images, whole patients otherwise, the test list's official share."""
    if size >= len(table):
        return np.ones(len(table), dtype=bool)
    names, patients = table["Image Index"].to_numpy(), table["Patient ID"].to_numpy()
    in_test, is_boxed = np.isin(names, list(test)), np.isin(names, list(boxed))
    box_patients = np.isin(patients, np.unique(patients[is_boxed]))
    test_quota = round(size * in_test.sum() / len(table))
    keep = box_patients.copy() if box_patients.sum() <= test_quota else is_boxed.copy()
    rng = np.random.default_rng(seed)
    sizes = pd.Series(patients).value_counts()
    for want_test, quota in ((True, test_quota), (False, size)):
        candidates = np.unique(patients[(in_test == want_test) & ~box_patients])
        order = rng.permutation(candidates)
        # whole patients in random order until the running total reaches the quota (one patient may overshoot)
        have = int(keep.sum()) if not want_test else int((keep & in_test).sum())
        running = have + np.cumsum(sizes.loc[order].to_numpy())
        take = order[: int(np.searchsorted(running, quota)) + 1] if have < quota else order[:0]
        keep |= np.isin(patients, take)
    return keep


def phantom(size: int, seed: int, noise: float = 12.0) -> np.ndarray:
    """A radiograph-like uint8 image: bright body, two dark lung fields, noise (distinct per seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((x - 0.3) / 0.13) ** 2 + ((y - 0.45) / 0.25) ** 2))
    lungs += np.exp(-(((x - 0.7) / 0.13) ** 2 + ((y - 0.45) / 0.25) ** 2))
    image = 180 - 60 * y - 110 * lungs + rng.normal(0, noise, (size, size))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", compress_level=1)  # fastest zlib level: writing is the point
    return out.getvalue()


def write_small(job: tuple[Path, list[str], int, int]) -> int:
    """Worker: one chunk of distinct small PNGs, a phantom plus per-image noise."""
    folder, names, size, seed = job
    base = phantom(size, 0, noise=0.0).astype(np.int16)
    noise = np.random.default_rng(seed).integers(-24, 25, (len(names), size, size), dtype=np.int16)
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    for name, image in zip(names, images, strict=True):
        (folder / name).write_bytes(png_bytes(image))
    return len(names)


def build_root(root: Path, nih: Path, meta: tuple, mask: np.ndarray, small_px: int, workers: int) -> dict[str, int]:
    """The dataset root in NIH layout: label table, split lists, box list, images/ (see the module docstring)."""
    header, lines, table, test, boxed = meta
    images = root / "images"
    images.mkdir(parents=True)
    pool = root.parent / f"{root.name}_pool"  # hard-link sources, outside the root DVC hashes
    pool.mkdir()
    names = table["Image Index"].to_numpy()[mask]
    kept = set(names)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join([header, *np.asarray(lines)[mask]]) + "\n")
    for name in ("train_val_list.txt", "test_list.txt"):
        listed = [n for n in (nih / name).read_text().split() if n in kept]
        (root / name).write_text("".join(f"{n}\n" for n in listed))
    shutil.copyfile(nih / "BBox_List_2017.csv", root / "BBox_List_2017.csv")

    counts = {"real_1024": 0, "synthetic_1024": 0, "small": 0}
    variants = []
    for i in range(BIG_VARIANTS):
        variants.append(pool / f"big_{i}.png")
        variants[-1].write_bytes(png_bytes(phantom(BOX_SIZE, seed=1000 + i)))
    for i, name in enumerate(sorted(n for n in names if n in boxed)):
        real = nih / "images" / name
        if real.is_file():
            shutil.copyfile(real, images / name)  # a copy: the shared sample is read-only and owned by another user
            counts["real_1024"] += 1
        else:
            os.link(variants[i % BIG_VARIANTS], images / name)
            counts["synthetic_1024"] += 1
    small = [n for n in names if n not in boxed]
    jobs = [(images, small[i:i + CHUNK], small_px, i) for i in range(0, len(small), CHUNK)]
    with ProcessPoolExecutor(workers) as ex:
        counts["small"] = sum(ex.map(write_small, jobs))
    shutil.rmtree(pool)  # hard links keep the data
    return counts


# -------------------------------------------------------------------------------------------- measuring


class TreeSampler:
    """Peak RSS (and anonymous RSS) of a process tree, and of the subtree whose command line holds `marker`,
    sampled every `interval` seconds; also when the marked process was first and last seen."""

    def __init__(self, proc: psutil.Process, marker: str, interval: float = 0.1) -> None:
        self.proc, self.marker, self.interval = proc, marker, interval
        self.peak = self.peak_anon = self.stage_peak = self.stage_anon = 0
        self.first: float | None = None
        self.last: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cmdlines: dict[tuple[int, float], str] = {}
        while not self._done.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                procs = []
            total = anon = 0
            marked: dict[int, tuple[int, int]] = {}
            for p in procs:
                try:
                    mem = p.memory_info()
                    key = (p.pid, p.create_time())
                    if key not in cmdlines:
                        cmdlines[key] = " ".join(p.cmdline())
                    if self.marker in cmdlines[key]:
                        for q in [p, *p.children(recursive=True)]:
                            m = q.memory_info()
                            marked[q.pid] = (m.rss, m.rss - m.shared)
                except psutil.Error:
                    continue
                total, anon = total + mem.rss, anon + mem.rss - mem.shared
            now = time.perf_counter()
            self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            if marked:
                self.first = self.first if self.first is not None else now
                self.last = now
                self.stage_peak = max(self.stage_peak, sum(r for r, _ in marked.values()))
                self.stage_anon = max(self.stage_anon, sum(a for _, a in marked.values()))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def env() -> dict[str, str]:
    """The venv's python and dvc first on PATH (DVC runs `python -m stages.<name>`); no progress bars."""
    out = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**out, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{out['PATH']}", "DVC_NO_ANALYTICS": "1",
            "CI": "1"}


def run(cmd: list[str], cwd: Path, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (rc {result.returncode}):\n{result.stderr[-3000:]}")
    return result


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def measure_stage(project: Path, stage: str, log: Path) -> dict[str, float]:
    """`dvc repro -s <stage>` under the sampler: seconds and peak MiB, whole tree and the stage command."""
    with open(log, "a") as out:
        out.write(f"$ dvc repro -s {stage}\n")
        out.flush()
        start = time.perf_counter()
        proc = psutil.Popen(dvc("repro", "-s", stage), cwd=project, env=env(), stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc, f"stages.{stage}")
        rc = proc.wait()
        seconds = time.perf_counter() - start
        sampler.stop()
    if rc != 0:
        raise SystemExit(f"dvc repro -s {stage} failed (rc {rc}); see {log}:\n{log.read_text()[-3000:]}")
    mib = 2.0 ** 20
    cmd = (sampler.last - sampler.first + sampler.interval) if sampler.first is not None else float("nan")
    return {"seconds": round(seconds, 2), "command_seconds": round(cmd, 2),
            "peak_rss_mib": round(sampler.peak / mib, 1), "peak_anon_mib": round(sampler.peak_anon / mib, 1),
            "command_peak_rss_mib": round(sampler.stage_peak / mib, 1),
            "command_peak_anon_mib": round(sampler.stage_anon / mib, 1),
            "load_average": round(os.getloadavg()[0], 1)}  # other work on the machine slows torch's threads


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def snapshot(code: Path) -> Path:
    """The pipeline's code, dvc.yaml and params.yaml as they are now: every size runs the same code, even if
    the checkout changes during a long run."""
    shutil.rmtree(code, ignore_errors=True)
    code.mkdir(parents=True)
    for name in ("cxr14", "stages"):
        shutil.copytree(ROOT / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", "params.yaml"):
        shutil.copy(ROOT / name, code / name)
    return code


def make_project(project: Path, code: Path, data_root: Path, overrides: dict[str, dict[str, Any]], log: Path
                 ) -> None:
    """The snapshot's code and dvc.yaml, and its params.yaml with `overrides`, as a fresh git + DVC project."""
    shutil.copytree(code, project, ignore=shutil.ignore_patterns("params.yaml"))
    params = yaml.safe_load((code / "params.yaml").read_text())
    overrides = merge(overrides, {"data": {"root": str(data_root), "missing": "error"}})
    (project / "params.yaml").write_text(yaml.safe_dump(merge(params, overrides), sort_keys=False))
    run(["git", "init", "-q"], project, log)
    run(dvc("init", "-q"), project, log)
    run(dvc("config", "core.analytics", "false"), project, log)
    run(["git", "add", "-A"], project, log)
    run([*GIT, "commit", "-qm", "code"], project, log)


def bench_size(size: int, meta: tuple, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the root for one size, run every stage, time `dvc status`; the results as one dict."""
    header, lines, table, test, boxed = meta
    mask = choose_subset(table, test, boxed, size, args.seed)
    names = table["Image Index"].to_numpy()[mask]
    n_test = int(np.isin(names, list(test)).sum())
    print(f"\n== {size:,}: {mask.sum():,} images ({n_test:,} in test_list, "
          f"{int(table['Patient ID'][mask].nunique()):,} patients)", flush=True)
    here = work / f"n{size}"
    root, project, log = here / "nih", here / "project", here / "log.txt"
    if here.exists():
        raise SystemExit(f"{here} exists (an earlier --keep run?); remove it or pass another --work")
    here.mkdir(parents=True)
    start = time.perf_counter()
    counts = build_root(root, args.nih, meta, mask, args.small_px, args.workers)
    build = time.perf_counter() - start
    print(f"   root built in {build:.1f} s: {counts['real_1024']} real + {counts['synthetic_1024']} synthetic "
          f"{BOX_SIZE} px, {counts['small']:,} x {args.small_px} px -> {root}", flush=True)
    make_project(project, work / "code", root, args.overrides, log)
    stages: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        stages[stage] = measure_stage(project, stage, log)
        s = stages[stage]
        print(f"   {stage:9s} {s['seconds']:8.1f} s (command {s['command_seconds']:7.1f} s)  peak "
              f"{s['peak_rss_mib']:7.0f} MiB (command {s['command_peak_rss_mib']:6.0f}, anon "
              f"{s['command_peak_anon_mib']:6.0f})", flush=True)
    status_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = run(dvc("status"), project, log).stdout
        status_times.append(time.perf_counter() - t0)
    if "up to date" not in out:
        raise SystemExit(f"dvc status after repro is not clean in {project}:\n{out[-2000:]}")
    print(f"   dvc status (no-op, median of 3): {statistics.median(status_times):.1f} s", flush=True)
    split = json.loads((project / "metrics/split.json").read_text())
    explain = json.loads((project / "metrics/explain.json").read_text())
    train = json.loads((project / "metrics/train.json").read_text())
    evaluate = json.loads((project / "metrics/evaluate.json").read_text())
    result = {"size": size, "images": int(mask.sum()), "patients": int(table["Patient ID"][mask].nunique()),
              "splits": {s: {"images": split[s]["images"], "patients": split[s]["patients"]}
                         for s in ("train", "val", "test")},
              "root": counts, "root_build_seconds": round(build, 1), "stages": stages,
              "dvc_status_seconds": round(statistics.median(status_times), 2),
              "explain_boxes": explain["overall"]["boxes"], "explain_layer": explain["layer"],
              "expected_boxes": meta_boxes(args.nih, set(names) & test),
              "train_images_per_second": train["images_per_second"], "test_mean_auc": evaluate["mean_auc"]}
    print("   splits: " + ", ".join(f"{s} {v['images']:,}" for s, v in result["splits"].items())
          + f"; train {result['train_images_per_second']} images/s; explain scored {result['explain_boxes']} of "
          f"{result['expected_boxes']} boxes", flush=True)
    if not args.keep:
        shutil.rmtree(here)
    return result


# -------------------------------------------------------------------------------------------- reporting


def table_lines(results: list[dict[str, Any]]) -> list[str]:
    """Markdown: per stage, seconds and peak RSS (whole `dvc repro -s` tree) at each size, and the growth."""
    sizes = [r["images"] for r in results]
    head = ["stage", *[f"s @ {n:,}" for n in sizes], *[f"peak MiB @ {n:,}" for n in sizes]]
    if len(results) > 1:
        head += [f"growth {sizes[0]:,} -> {sizes[-1]:,}: s / MiB (images x{sizes[-1] / sizes[0]:.1f})"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for stage in STAGES:
        row = [stage, *[f"{r['stages'][stage]['seconds']:.1f}" for r in results],
               *[f"{r['stages'][stage]['peak_rss_mib']:,.0f}" for r in results]]
        if len(results) > 1:
            a, b = results[0]["stages"][stage], results[-1]["stages"][stage]
            row.append(f"x{b['seconds'] / a['seconds']:.1f} / x{b['peak_rss_mib'] / a['peak_rss_mib']:.1f}")
        out.append("| " + " | ".join(row) + " |")
    row = ["`dvc status` (no-op)", *[f"{r['dvc_status_seconds']:.1f}" for r in results], *["" for _ in results]]
    if len(results) > 1:
        row.append(f"x{results[-1]['dvc_status_seconds'] / results[0]['dvc_status_seconds']:.1f}")
    out.append("| " + " | ".join(row) + " |")
    return out


def growth_lines(results: list[dict[str, Any]]) -> list[str]:
    """Between consecutive sizes: ratio of seconds and of peak memory per stage against the ratio of images."""
    out = []
    for a, b in zip(results, results[1:], strict=False):
        ratio = b["images"] / a["images"]
        out.append(f"{a['images']:,} -> {b['images']:,} images (x{ratio:.1f}):")
        for stage in STAGES:
            sa, sb = a["stages"][stage], b["stages"][stage]
            secs, cmd = sb["seconds"] / sa["seconds"], sb["command_seconds"] / sa["command_seconds"]
            mem, cmem = sb["peak_rss_mib"] / sa["peak_rss_mib"], sb["command_peak_rss_mib"] / sa["command_peak_rss_mib"]
            flag = "  <- faster than the data" if max(secs, cmd, mem, cmem) > ratio else ""
            out.append(f"   {stage:9s} seconds x{secs:5.2f} (command x{cmd:5.2f}), peak memory x{mem:5.2f} "
                       f"(command x{cmem:5.2f}){flag}")
        out.append(f"   dvc status x{b['dvc_status_seconds'] / a['dvc_status_seconds']:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 112120],
                        help="dataset sizes in images (112120 = all of NIH)")
    parser.add_argument("--nih", type=Path, default=NIH, help="NIH metadata: label table, split lists, box list")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new one in the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep each size's root and project")
    parser.add_argument("--image-size", type=int, default=64, help="prepare.image_size")
    parser.add_argument("--small-px", type=int, default=64, help="side of the synthetic images without boxes")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient subsets")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param in the scratch project (YAML value), e.g. train.epochs=2; repeatable")
    args = parser.parse_args()
    args.overrides = merge(OVERRIDES, {"prepare": {"image_size": args.image_size}})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item}: expected section.key=value")
        *sections, last = key.split(".")
        update: dict[str, Any] = {last: yaml.safe_load(value)}
        for section in reversed(sections):
            update = {section: update}
        args.overrides = merge(args.overrides, update)
    if not (args.nih / "BBox_List_2017.csv").is_file():
        raise SystemExit(f"{args.nih}: no BBox_List_2017.csv; pass --nih")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_scale: sizes {args.sizes}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"scratch {work}", flush=True)
    meta = read_metadata(args.nih)
    snapshot(work / "code")
    info = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30), "load_average_at_start":
            round(os.getloadavg()[0], 1), "overrides": args.overrides, "small_px": args.small_px, "results": []}
    results = info["results"]
    try:
        for size in args.sizes:
            results.append(bench_size(size, meta, args, work))
            if args.json:  # after every size: a long run that is stopped keeps what it measured
                args.json.write_text(json.dumps(info, indent=2) + "\n")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + "\n".join(table_lines(results)))
    for r in results:
        peak = max(s["peak_rss_mib"] for s in r["stages"].values())
        print(f"{r['images']:,} images: every stage ran; explain scored {r['explain_boxes']} of {r['expected_boxes']} "
              f"boxes; highest peak RSS of a stage (DVC included) {peak:,.0f} MiB")
    if len(results) > 1:
        print("\n" + "\n".join(growth_lines(results)))
    if args.json:
        print(f"\nwrote {args.json}")


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()

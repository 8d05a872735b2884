"""A deterministic phantom of ChestX-ray14 in NIH's exact file layout (the `demo` stage's dataset).

A fresh clone must run the whole pipeline in minutes with no download, against known truth.
Labels follow the real table's statistics (`cxr14/data/demo_stats.json`, made by
tools/derive_demo_stats.py), rare classes raised to `class_floor`; each finding is planted as
its own localised pattern whose box is recorded; noisy labels mimic report mining and the clean
ones are written too, so the best achievable AUC under the noise is known.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr14.data.boxes import BBOX_LIST, BOX_LABELS
from cxr14.data.nih import CLASSES, EXPERT_FILES, FINDINGS, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST, parse_findings
from cxr14.data.phantom import render
from cxr14.params import Demo
from cxr14.runtime.devices import cpu_count
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import replace_dir
from cxr14.runtime.processes import exit_with, process_context
from cxr14.runtime.progress import progress
from cxr14.runtime.signals import raise_pending, signals_deferred

STATS_FILE = Path(__file__).with_name("demo_stats.json")
KEEP_LABELS = 0.5  # chance a follow-up shows its predecessor's findings; a stationary chain keeps the marginals
DATA_ENTRY_HEADER = (  # NIH's original header, trailing comma (an empty 12th column) included
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
EXPERT_COLUMNS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")  # Google's order
EXPERT_HEADER = DATA_ENTRY_HEADER + ",".join(EXPERT_COLUMNS) + ",Set Id"
# Google's file covers 7.7% of NIH's test list and 2.8% of train_val; the demo's test split is 70 times
# smaller, so it covers more of it, enough for a few dozen positives of each finding.
EXPERT_FRACTION = {"test": 0.6, "val": 0.05}
BOX_LABEL = {v: k for k, v in BOX_LABELS.items()}  # NIH's spelling in BBox_List_2017.csv
def load_stats(path: Path = STATS_FILE) -> tuple[np.ndarray, np.ndarray, dict]:
    """Label sets as a 0/1 matrix in CLASSES order, their real counts, and the whole stats file."""
    try:
        stats = json.loads(path.read_text())
        counts = stats["combinations"]["counts"]
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc}); regenerate it with tools/derive_demo_stats.py") from None
    combos = np.stack([parse_findings(text, f"{path}: combination") for text in counts])
    return combos, np.array(list(counts.values()), dtype=np.float64), stats


def floor_weights(combos: np.ndarray, counts: np.ndarray, floor: float) -> np.ndarray:
    """Set probabilities with every class's marginal >= floor; whole sets are reweighted so co-occurrence stays real."""
    weights = counts / counts.sum()
    for _ in range(1000):
        marginal = weights @ combos
        if (marginal >= floor).all():
            return weights
        factor = np.where(marginal < floor, floor * 1.001 / np.maximum(marginal, 1e-12), 1.0)
        weights = weights * np.exp(combos @ np.log(factor))
        weights /= weights.sum()
    raise PipelineError(f"demo.class_floor: {floor}; expected less: the real label sets cannot raise every class "
                        "to this frequency")


def images_per_patient(hist: list[int], patients: int, images: int, rng: np.random.Generator) -> np.ndarray:
    """Real follow-up counts, rescaled so the totals are exact and every patient has an image."""
    extra = rng.choice(len(hist), size=patients, p=np.array(hist) / sum(hist)).astype(np.float64)
    if extra.sum() == 0:
        extra[:] = 1.0
    share = extra * (images - patients) / extra.sum()
    count = np.floor(share).astype(np.int64)
    count[np.argsort(count - share, kind="stable")[: images - patients - count.sum()]] += 1
    return count + 1


def draw_labels(probs: np.ndarray, combos: np.ndarray, followup: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Real label sets; a follow-up often repeats its predecessor's, as chronic findings do."""
    pick = rng.choice(len(probs), size=len(followup), p=probs)
    for i in np.flatnonzero((followup > 0) & (rng.random(len(followup)) < KEEP_LABELS)):
        pick[i] = pick[i - 1]
    return combos[pick]


def raise_to_floor(labels: np.ndarray, groups: list[np.ndarray], probs: np.ndarray, combos: np.ndarray,
                   floor: float, rng: np.random.Generator) -> np.ndarray:
    """Make the floor hold in each split, not only in expectation: a small test set needs positives of every class."""
    labels = labels.copy()
    for group in groups:
        need = math.ceil(floor * len(group) - 1e-9)
        for k in range(len(CLASSES)):
            while (short := need - int(labels[group, k].sum())) > 0:
                empty = group[labels[group].sum(axis=1) == 0]
                if len(empty):  # a normal image gets a real label set that contains k
                    has_k = np.flatnonzero(combos[:, k])
                    pick = rng.choice(empty, min(short, len(empty)), replace=False)
                    labels[pick] = combos[rng.choice(has_k, len(pick), p=probs[has_k] / probs[has_k].sum())]
                else:
                    labels[rng.choice(group[labels[group, k] == 0], short, replace=False), k] = 1
    return labels


def add_noise(clean: np.ndarray, prevalence: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """As report mining errs: a finding is missed with probability rate, an absent one named with rate x prevalence."""
    draw = rng.random(clean.shape)
    return np.where(clean == 1, draw >= rate, draw < rate * prevalence).astype(np.uint8)


def label_text(row: np.ndarray) -> str:
    return "|".join(c for c, on in zip(CLASSES, row, strict=True) if on) or NO_FINDING


def render_file(job: tuple[str, int, int, tuple[int, ...]], size: int, seed: int, folder: str) -> list[tuple]:
    name, pid, followup, labels = job
    pixels, boxes = render(size, seed, pid, followup, np.array(labels, dtype=np.uint8))
    Image.fromarray(pixels).save(os.path.join(folder, name), compress_level=1)  # fast to write, a little larger than 6
    return boxes


# ---- the dataset ----

def sample_table(cfg: Demo, combos: np.ndarray, counts: np.ndarray, stats: dict) -> dict[str, np.ndarray]:
    """Everything but the pixels, one row per image in NIH order; one RNG, cheap, so done before the workers start."""
    n_pat, n_img, floor = cfg.patients, cfg.images, cfg.class_floor
    rng = np.random.default_rng([cfg.seed, 0])
    per_patient = images_per_patient(stats["images_per_patient"]["counts"], n_pat, n_img, rng)
    if per_patient.max() > 1000:
        raise PipelineError(f"demo.images: {n_img}; expected at most 1000 per patient (image names have 3-digit "
                            "follow-up numbers): raise demo.patients")
    patient = np.repeat(np.arange(1, n_pat + 1), per_patient)
    first = np.repeat(np.cumsum(per_patient) - per_patient, per_patient)
    followup = np.arange(n_img) - first
    test = np.zeros(n_pat + 1, dtype=bool)  # by patient ID, so the lists are patient-disjoint
    test[1 + rng.choice(n_pat, min(max(round(cfg.test_fraction * n_pat), 1), n_pat - 1), replace=False)] = True
    probs = floor_weights(combos, counts, floor)
    clean = draw_labels(probs, combos, followup, rng)
    splits = [np.flatnonzero(~test[patient]), np.flatnonzero(test[patient])]
    clean = raise_to_floor(clean, splits, probs, combos, floor, rng)
    noisy = add_noise(clean, probs @ combos, cfg.label_noise, rng)
    sex, age, view = stats["gender"], stats["age"], stats["view_position"]
    male = rng.random(n_pat + 1) < sex["M"] / (sex["M"] + sex["F"])
    hist = np.array(age["counts"]) / sum(age["counts"])
    age0 = ((rng.choice(len(hist), n_pat + 1, p=hist) + rng.random(n_pat + 1)) * age["bin_years"]).astype(int)
    older = np.cumsum((rng.random(n_img) < 0.3) & (followup > 0))  # some follow-ups come a year later
    views = sorted(view)
    pick = np.random.default_rng([cfg.seed, 1]).random(n_img)  # its own stream: the draws above stay as they were
    in_test = test[patient]
    expert = np.where(in_test, np.where(pick < EXPERT_FRACTION["test"], "test", ""),
                      np.where(pick < EXPERT_FRACTION["val"], "val", ""))
    return {"name": np.array([f"{p:08d}_{f:03d}.png" for p, f in zip(patient, followup, strict=True)]),
            "patient": patient, "followup": followup, "test": in_test, "clean": clean, "noisy": noisy,
            "age": np.minimum(age0[patient] + older - older[first], 95), "sex": np.where(male[patient], "M", "F"),
            "view": rng.choice(views, n_img, p=np.array([view[v] for v in views]) / sum(view.values())),
            "expert": expert}


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def write_tables(folder: Path, t: dict[str, np.ndarray], size: int) -> None:
    spacing = round(0.143 * 1024 / size, 6)  # NIH's 0.143 mm per pixel at 1024 px
    rows = zip(t["name"], t["noisy"], t["followup"], t["patient"], t["age"], t["sex"], t["view"], strict=True)
    write_lines(folder / "Data_Entry_2017.csv", [DATA_ENTRY_HEADER] + [
        f"{n},{label_text(y)},{f},{p},{a},{s},{v},{size},{size},{spacing},{spacing}," for n, y, f, p, a, s, v in rows])
    write_lines(folder / "clean_labels.csv", ["Image Index,Finding Labels"] + [
        f"{n},{label_text(y)}" for n, y in zip(t["name"], t["clean"], strict=True)])
    write_expert_labels(folder / EXPERT_FILES[0], t, size, spacing)
    write_lines(folder / TRAIN_VAL_LIST, list(t["name"][~t["test"]]))
    write_lines(folder / TEST_LIST, list(t["name"][t["test"]]))


def write_expert_labels(path: Path, t: dict[str, np.ndarray], size: int, spacing: float) -> None:
    """Google's expert-label file (cxr14.evaluation.expert), its columns and YES/NO values, from the clean labels.

    The phantom has no fractures: Fracture is NO throughout (evaluate does not score it in any case).
    """
    yes = {finding: t["clean"][:, [CLASSES.index(c) for c in classes]].any(axis=1)
           for finding, classes in FINDINGS.items()}
    lines = [EXPERT_HEADER]
    for i in np.flatnonzero(t["expert"] != ""):
        cells = ["YES" if yes[f][i] else "NO" for f in EXPERT_COLUMNS]
        lines.append(f"{t['name'][i]},{label_text(t['noisy'][i])},{t['followup'][i]},{t['patient'][i]},{t['age'][i]},"
                     f"{t['sex'][i]},{t['view'][i]},{size},{size},{spacing},{spacing},{','.join(cells)},{t['expert'][i]}")
    write_lines(path, lines)


def keep_freed_memory() -> None:
    """Stop glibc handing each freed 256 KB temporary back to the OS: taking it back costs a page fault per page."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


def worker_setup(stage_pid: int) -> None:
    """Each rendering worker: gone when the stage is (even killed), glibc kept from trimming."""
    exit_with(stage_pid)
    keep_freed_memory()


def render_all(folder: Path, t: dict[str, np.ndarray], size: int, seed: int, workers: int) -> list[list[tuple]]:
    """Films in parallel, in order; each depends only on its own row, so any worker count gives the same files."""
    jobs = [(n, int(p), int(f), tuple(map(int, y))) for n, p, f, y in
            zip(t["name"], t["patient"], t["followup"], t["clean"], strict=True)]
    draw = functools.partial(render_file, size=size, seed=seed, folder=str(folder))
    if workers == 1:
        keep_freed_memory()
        return list(progress(map(draw, jobs), total=len(jobs), desc="demo images", unit="img"))
    context = process_context(["cxr14.data.phantom"])
    # A kill (SIGTERM, Ctrl-C) is acted on between two results, never inside the pool's locks, and drops the
    # chunks not yet started.
    with signals_deferred(), ProcessPoolExecutor(workers, mp_context=context, initializer=worker_setup,
                                                 initargs=(os.getpid(),)) as pool:
        chunk = max(1, min(32, len(jobs) // (8 * workers)))
        out = []
        try:
            for result in progress(pool.map(draw, jobs, chunksize=chunk), total=len(jobs), desc="demo images",
                                   unit="img"):
                raise_pending()
                out.append(result)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return out


def generate(cfg: Demo, out: Path | str, workers: int | None = None) -> dict[str, Any]:
    """Build the dataset in a temp dir beside `out`, then swap it in (a killed run leaves no half dataset)."""
    t = sample_table(cfg, *load_stats())
    with replace_dir(out) as tmp:
        write_tables(tmp, t, cfg.image_size)
        (tmp / "images").mkdir()
        workers = max(1, min(workers or cpu_count(), cfg.images))
        boxes = render_all(tmp / "images", t, cfg.image_size, cfg.seed, workers)
        rows = [f"{n},{BOX_LABEL.get(CLASSES[k], CLASSES[k])},{x:.1f},{y:.1f},{w:.1f},{h:.1f}"
                for n, test, found in zip(t["name"], t["test"], boxes, strict=True) if test for k, x, y, w, h in found]
        write_lines(tmp / BBOX_LIST, [BBOX_HEADER, *rows])
    return {"images": cfg.images, "patients": cfg.patients, "test_images": int(t["test"].sum()),
            "test_patients": len(set(t["patient"][t["test"]])), "boxes": len(rows),
            "clean": dict(zip(CLASSES, t["clean"].sum(0).tolist(), strict=True)),
            "noisy": dict(zip(CLASSES, t["noisy"].sum(0).tolist(), strict=True))}

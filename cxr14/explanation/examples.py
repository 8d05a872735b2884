"""What the explain stage computes: the test images worth a look (by decision margin), their Grad-CAM
overlays, and localisation scores of every expert box (pointing game and T(IoBB), `localisation.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr14.data.images import open_image
from cxr14.data.loader import PreparedImages, to_model_input
from cxr14.data.nih import CLASSES
from cxr14.explanation.gradcam import GradCAM
from cxr14.explanation.heatmaps import overlay
from cxr14.explanation.localisation import score_box, summarise
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.progress import progress

KINDS = ("TP", "FP", "FN")


def choose_examples(labels: np.ndarray, cal: np.ndarray, thresholds: dict, per_class: int) -> list[tuple]:
    """(class index, kind, row, margin): per class the `per_class` largest margins of TP and FP, smallest of FN."""
    chosen = []
    for k, name in enumerate(CLASSES):
        if thresholds.get(name) is None:
            continue
        margin, y = cal[:, k] - thresholds[name], labels[:, k]
        for kind, mask, sign in (("TP", (y == 1) & (margin >= 0), -1), ("FP", (y == 0) & (margin >= 0), -1),
                                 ("FN", (y == 1) & (margin < 0), 1)):
            rows = np.flatnonzero(mask)
            for row in rows[np.argsort(sign * margin[rows], kind="stable")][:per_class]:
                chosen.append((k, kind, int(row), float(margin[row])))
    return chosen


def heatmaps(cam: GradCAM, data: PreparedImages, pairs: list[tuple[int, int]], mean: tuple[float, ...],
             std: tuple[float, ...], batch: int, device: torch.device | str = "cpu"
             ) -> dict[tuple[int, int], np.ndarray]:
    """Grad-CAM for each (row, class) pair, batched per class, on the model's `device`: {(row, class): (H, W)}."""
    out = {}
    by_class: dict[int, list[int]] = {}
    for row, k in pairs:
        by_class.setdefault(k, []).append(row)
    bar = progress(total=len(pairs), desc="grad-cam", unit="map")
    for k, rows in by_class.items():
        rows = sorted(set(rows))
        for i in range(0, len(rows), batch):
            part = rows[i:i + batch]
            _, maps = cam(to_model_input(data[np.array(part)][0].to(device), mean, std), [k])
            out.update({(row, k): maps[j, 0].cpu().numpy() for j, row in enumerate(part)})
            bar.update(len(part))
    bar.close()
    return out


def scaled_boxes(boxes: pd.DataFrame, table: pd.DataFrame, size: int, source: Path | str = "box list"
                 ) -> pd.DataFrame:
    """Boxes of test images, moved from original-image pixels to the model's size x size pixels.

    A box reaching outside its image is an error naming `source` and its line: scored, it would count as a
    miss of the heatmap and silently lower the pointing game."""
    rows = {name: i for i, name in enumerate(table["Image Index"])}
    boxes = boxes[boxes["Image Index"].isin(rows)].copy()
    boxes["row"] = boxes["Image Index"].map(rows)
    dims = {}
    for name in boxes["Image Index"].unique():
        with open_image(table["path"].iloc[rows[name]]) as image:  # reads the header only; prepare warned
            dims[name] = image.size
    width, height = boxes["Image Index"].map(lambda n: dims[n][0]), boxes["Image Index"].map(lambda n: dims[n][1])
    slack = 1.0  # pixels: rounding in the list; NIH's own 984 boxes all lie within their 1024 px images
    outside = (boxes.x < -slack) | (boxes.y < -slack) | (boxes.x + boxes.w > width + slack) | \
        (boxes.y + boxes.h > height + slack)
    if outside.any():
        b = boxes[outside].iloc[0]
        where = f"{source} line {b.line}" if "line" in b else str(source)
        raise PipelineError(f"{where}: box x={b.x:g} y={b.y:g} w={b.w:g} h={b.h:g} reaches outside {b['Image Index']} "
                            f"({dims[b['Image Index']][0]}x{dims[b['Image Index']][1]} px; {int(outside.sum())} such "
                            "box(es)); expected boxes in the original image's pixels")
    sx = boxes["Image Index"].map(lambda n: size / dims[n][0])
    sy = boxes["Image Index"].map(lambda n: size / dims[n][1])
    boxes["x"], boxes["w"], boxes["y"], boxes["h"] = boxes.x * sx, boxes.w * sx, boxes.y * sy, boxes.h * sy
    return boxes.reset_index(drop=True)


def localisation(maps: dict, boxes: pd.DataFrame, cam_threshold: float, iobb_thresholds: Sequence[float],
                 peaks: list[tuple[float, float]] | None = None) -> dict:
    """Pointing game and T(IoBB), overall and per class, each box scored with its class's heatmap."""
    scores = [score_box(maps[(b.row, CLASSES.index(b.Finding))], (b.x, b.y, b.w, b.h), cam_threshold, peaks)
              for b in boxes.itertuples()]
    per_class = {name: summarise([s for s, f in zip(scores, boxes["Finding"], strict=True) if f == name],
                                 iobb_thresholds) for name in CLASSES if (boxes["Finding"] == name).any()}
    return {"overall": summarise(scores, iobb_thresholds), "per_class": per_class}


def headline(report: dict) -> dict:
    """metrics/explain.json: the pointing game over all boxes and, with the sanity checks on, the randomisation
    score, picked from the report (reports/explain.json keeps the per-class, T(IoBB) and deletion figures)."""
    out = {"pointing": report["overall"]["pointing_game"]}
    if "sanity" in report:
        out["sanity_rho"] = report["sanity"]["overall"]["randomisation_spearman"]
    return out


def draw(examples: list[tuple], maps: dict, data: PreparedImages, table: pd.DataFrame, cal: np.ndarray,
         raw: np.ndarray, thresholds: dict, boxes: pd.DataFrame, out: Path) -> None:
    """One overlay per chosen example: out/<Class>/<image>.png, with the class's boxes on that image."""
    for k, kind, row, margin in examples:
        name, image = CLASSES[k], table["Image Index"].iloc[row]
        mine = boxes[(boxes["row"] == row) & (boxes["Finding"] == name)]
        title = (f"{kind} {name}: {image}\np={cal[row, k]:.3f} (raw {raw[row, k]:.3f}), t={thresholds[name]:.3f}, "
                 f"margin {margin:+.3f}")
        overlay(data[np.array([row])][0][0, 0].numpy(), maps[(row, k)], title, out / name / image,
                boxes=list(mine[["x", "y", "w", "h"]].itertuples(index=False, name=None)))

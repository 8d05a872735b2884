"""Scoring heatmaps against expert boxes: the pointing game and Wang et al. (2017)'s T(IoBB).

Pointing game (Zhang et al., 2018): a box is hit when the heatmap's maximum lies inside it.
T(IoBB): the heatmap, thresholded, splits into connected regions, each with its bounding box; a
ground-truth box is hit at T when some region's box lies inside it by more than T of its own area
(intersection over the detected box, as Wang et al. scored ChestX-ray8). The pointing game's ceiling is
the fraction of boxes that hold at least one place where the heatmap's maximum can fall at all.
Boxes are (x, y, w, h) in heatmap pixels: callers scale the box list's original-image pixels first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from cxr14.runtime.outputs import rounded

Box = tuple[float, float, float, float]


def peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the heatmap's maximum, at the centre of its pixel."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return col + 0.5, row + 0.5


def inside(point: tuple[float, float], box: Box) -> bool:
    x, y = point
    bx, by, bw, bh = box
    return bx <= x <= bx + bw and by <= y <= by + bh


def heat_boxes(heatmap: np.ndarray, threshold: float) -> list[Box]:
    """Bounding boxes of the connected regions where the heatmap is at least `threshold` of its maximum."""
    top = float(heatmap.max())
    if top <= 0:
        return []
    regions, _ = ndimage.label(heatmap >= threshold * top)
    return [(float(c.start), float(r.start), float(c.stop - c.start), float(r.stop - r.start))
            for r, c in ndimage.find_objects(regions)]


def iobb(detected: Box, truth: Box) -> float:
    """Area of the intersection over the area of the detected box."""
    dx, dy, dw, dh = detected
    tx, ty, tw, th = truth
    iw = max(0.0, min(dx + dw, tx + tw) - max(dx, tx))
    ih = max(0.0, min(dy + dh, ty + th) - max(dy, ty))
    return iw * ih / (dw * dh)


def score_box(heatmap: np.ndarray, truth: Box, cam_threshold: float,
              peaks: Sequence[tuple[float, float]] | None = None) -> dict[str, float]:
    """`pointing` (0/1) and `iobb`, the best IoBB over the heatmap's regions, for one ground-truth box;
    with `peaks`, the places the heatmap's maximum can fall at all, `reachable` (0/1): could it be hit."""
    best = max((iobb(d, truth) for d in heat_boxes(heatmap, cam_threshold)), default=0.0)
    score = {"pointing": float(inside(peak(heatmap), truth)), "iobb": best}
    if peaks is not None:
        score["reachable"] = float(any(inside(p, truth) for p in peaks))
    return score


def summarise(scores: Sequence[dict[str, float]], iobb_thresholds: Sequence[float]) -> dict[str, float | int | None]:
    """Hit fractions over a set of boxes: pointing game and T(IoBB) at each threshold (IoBB > T)."""
    out: dict[str, float | int | None] = {"boxes": len(scores)}
    point = [s["pointing"] for s in scores]
    out["pointing_game"] = rounded(float(np.mean(point))) if scores else None
    if scores and all("reachable" in s for s in scores):  # the best pointing game this map resolution allows
        out["pointing_game_ceiling"] = rounded(float(np.mean([s["reachable"] for s in scores])))
    for t in iobb_thresholds:
        hits = [s["iobb"] > t for s in scores]
        out[f"iobb_{t:g}"] = rounded(float(np.mean(hits))) if scores else None
    return out

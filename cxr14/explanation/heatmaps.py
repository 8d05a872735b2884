"""Heatmaps without PyTorch: cells resampled onto pixels, normalised, and drawn over the grey image.

What predict's ONNX engine needs to turn the exported model's `cam` output into the overlays the torch engine
draws, so it lives apart from `gradcam.py` (which imports torch): `resample` is the numpy twin of
`gradcam.resample` (same cell geometry, same bilinear weights, border held), `normalise` is `GradCAM`'s min-max,
and `overlay` is the one drawing code both engines and the explain stage use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr14.runtime.outputs import atomic_path


def resample(cells: np.ndarray, size: tuple[int, int], stride: Sequence[float], offset: Sequence[float]
             ) -> np.ndarray:
    """Bilinear map of (..., h, w) cells onto (..., *size) pixels, cell (i, j) at pixel stride*(i, j) + offset;
    beyond the outer cells' centres the values are held: `gradcam.resample` (grid_sample, align_corners, border)
    as two interpolation matrices, since the map is separable."""
    mats = []
    for n, length, s, o in zip(cells.shape[-2:], size, stride, offset, strict=True):
        u = np.clip((np.arange(length, dtype=np.float64) - o) / s, 0, n - 1)  # pixel -> cell coordinate
        lo = np.floor(u).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        frac = u - lo
        mat = np.zeros((length, n))
        np.add.at(mat, (np.arange(length), lo), 1 - frac)
        np.add.at(mat, (np.arange(length), hi), frac)
        mats.append(mat.astype(np.float32))
    return mats[0] @ cells.astype(np.float32) @ mats[1].T


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each (..., H, W) map scaled to [0, 1] by its own minimum and maximum, as `GradCAM` returns them (a flat map
    stays 0)."""
    low = maps.min(axis=(-2, -1), keepdims=True)
    high = maps.max(axis=(-2, -1), keepdims=True)
    return (maps - low) / np.maximum(high - low, 1e-12)


def jet(values: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map (blue -> cyan -> yellow -> red) as uint8 RGB, for values in [0, 1]."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (255 * rgb).astype(np.uint8)


def overlay(gray: np.ndarray, heatmap: np.ndarray, title: str, path: Path | str,
            boxes: Sequence[tuple[float, float, float, float]] = (), alpha: float = 0.4) -> None:
    """The heatmap over the original grayscale pixels (not the normalised tensor), the expert boxes (x, y, w, h
    in the image's pixels) in white, a title (class, probability, threshold) and a colour bar.

    Drawn with Pillow: matplotlib would add a second to every predict call just to import.
    """
    h, w = gray.shape
    scale = 320 / max(h, w)
    size = (round(w * scale), round(h * scale))
    base = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    mixed = (1 - alpha) * base[..., None] + alpha * jet(heat).astype(np.float32)
    picture = Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for x, y, bw, bh in boxes:
        draw.rectangle([x * scale, y * scale, (x + bw) * scale - 1, (y + bh) * scale - 1], outline="white", width=2)

    font = ImageFont.load_default(size=12)
    lines = title.splitlines()
    top, bar = 8 + 16 * len(lines), 64
    canvas = Image.new("RGB", (size[0] + bar, size[1] + top + 8), "white")
    canvas.paste(picture, (0, top))
    pen = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        pen.text((4, 4 + 16 * i), line, fill="black", font=font)
    ramp = jet(np.linspace(1, 0, size[1])[:, None].repeat(14, axis=1))
    canvas.paste(Image.fromarray(ramp), (size[0] + 8, top))
    for value in (1.0, 0.5, 0.0):
        y = top + round((1 - value) * (size[1] - 1))
        pen.text((size[0] + 26, min(max(y - 7, top), top + size[1] - 14)), f"{value:.1f}", fill="black", font=font)
    pen.text((size[0] + 4, top - 16), "CAM", fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.quantize(256, method=Image.Quantize.FASTOCTREE).save(tmp, format="png")  # a quarter of the bytes

"""Grad-CAM (Selvaraju et al., 2017) in pytorch-grad-cam's shape: forward hooks keep the target layer's
activations (and record the strided ops before it, for the cells' geometry); the gradient of a class's
logit with respect to those activations comes from `torch.autograd.grad`, so no backward hook is needed.
The hooks exist only inside `with` (`release()` removes them too).

The original recipe used the deprecated module backward hook, never removed it (hooks piled up per call) and
drew over the normalised tensor; here heatmaps are returned in [0, 1] at the input resolution and
drawn over the original grayscale pixels by `overlay`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from cxr14.runtime.outputs import atomic_path

STRIDED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[-1])


class GradCAM:
    """`with GradCAM(model, layer) as cam: probs, heatmaps = cam(x, [k1, k2])` -> (B, C), (B, K, H, W).

    Heatmaps are resampled to the input where each cell really looks: in a ResNet, cell j of a stride-32
    layer is centred on input pixel 32j, not 32j + 15.5 as a plain resize (cv2.resize, F.interpolate)
    assumes, which shifts every map half a cell down and right (docs/benchmarks.md has what it cost the
    pointing game). The cells' stride and offset are read from the
    strided convolutions and poolings that run before the layer, during the same forward pass.
    """

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.model, self.layer = model, layer
        self.activations: torch.Tensor | None = None
        self._handles: list = []
        self._ops: list[tuple[nn.Module, tuple[int, int], tuple[int, int]]] = []
        self._reached = False

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.activations = output
        self._reached = True

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._reached:
            self._ops.append((module, tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:])))

    def __enter__(self) -> GradCAM:
        self._handles = [m.register_forward_hook(self._record) for m in self.model.modules() if isinstance(m, STRIDED)]
        self._handles.append(self.layer.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Remove every hook this object registered; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.activations = None

    def geometry(self, size: tuple[int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
        """((stride_y, stride_x), (offset_y, offset_x)): cell (i, j) is centred on input pixel
        (stride_y * i + offset_y, stride_x * j + offset_x), from the last forward pass.

        Each resolution step a -> b is taken from the first op that made it (ResNet's downsample
        branch repeats its block's step with the same geometry); an op with kernel k, padding p and
        dilation d centres output j on input s*j + d*(k-1)/2 - p of its own input.
        """
        out = []
        for axis in (0, 1):
            stride_at, offset = {size[axis]: 1}, 0.0
            for module, before, after in self._ops:
                a, b = before[axis], after[axis]
                if a == b or b in stride_at or a not in stride_at:
                    continue
                k, s = pair(module.kernel_size)[axis], pair(module.stride)[axis]
                p, d = pair(module.padding)[axis], pair(getattr(module, "dilation", 1))[axis]
                offset += stride_at[a] * (d * (k - 1) / 2 - p)
                stride_at[b] = stride_at[a] * s
            n = self.activations.shape[-2 + axis]
            out.append((stride_at.get(n, size[axis] / n), offset))
        return (out[0][0], out[1][0]), (out[0][1], out[1][1])

    def peak_points(self, size: tuple[int, int]) -> list[tuple[float, float]]:
        """Every place a heatmap's maximum can fall, as (x, y) pixel centres, from the last forward pass.

        A bilinear value is a weighted mean of the four nearest cells, never above the largest, so the
        maximum sits where a cell is centred: an h x w map can point at h * w places only, and a box with
        none of them inside can never be hit (at 96 px, layer4's 3 x 3 cells reach few of the demo's boxes).
        """
        h, w = self.activations.shape[-2:]
        one_hot = torch.eye(h * w).reshape(h * w, 1, h, w)
        where = resample(one_hot, size, *self.geometry(size)).flatten(1).argmax(1).tolist()
        return sorted({(i % size[1] + 0.5, i // size[1] + 0.5) for i in where})

    def __call__(self, x: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self._ops, self._reached = [], False
        with torch.enable_grad():
            logits = self.model(x)
            maps = []
            for i, k in enumerate(classes):
                grads = torch.autograd.grad(logits[:, k].sum(), self.activations, retain_graph=i < len(classes) - 1)[0]
                weights = grads.mean(dim=(2, 3), keepdim=True)  # global-average-pooled gradients
                maps.append(F.relu((weights * self.activations).sum(dim=1)))
        cams = resample(torch.stack(maps, 1).detach(), tuple(x.shape[-2:]), *self.geometry(tuple(x.shape[-2:])))
        low = cams.amin(dim=(2, 3), keepdim=True)
        high = cams.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(logits.detach()), (cams - low) / (high - low).clamp_min(1e-12)


def resample(cams: torch.Tensor, size: tuple[int, int], stride: tuple[float, float],
             offset: tuple[float, float]) -> torch.Tensor:
    """Bilinear map of (B, K, h, w) cells onto (B, K, *size) pixels, cell (i, j) at pixel stride*(i, j) + offset;
    beyond the outer cells' centres the values are held (border)."""
    axes = []
    for n, length, s, o in zip(cams.shape[-2:], size, stride, offset, strict=True):
        u = (torch.arange(length, dtype=cams.dtype, device=cams.device) - o) / s  # pixel -> cell coordinate
        axes.append(2 * u / (n - 1) - 1 if n > 1 else torch.zeros_like(u))
    gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
    grid = torch.stack((gx, gy), dim=-1).expand(cams.shape[0], -1, -1, -1)
    return F.grid_sample(cams, grid, mode="bilinear", padding_mode="border", align_corners=True)


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

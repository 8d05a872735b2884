"""Grad-CAM (Selvaraju et al., 2017) in pytorch-grad-cam's shape: a forward hook keeps the target layer's
activations, a tensor hook on them keeps their gradient, and the hooks exist only inside `with`.

The seed used the deprecated module backward hook, never removed it (hooks piled up per call) and
drew over the normalised tensor; here heatmaps are returned in [0, 1] at the input resolution and
drawn over the original grayscale pixels by `overlay`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.common import atomic_path


class GradCAM:
    """`with GradCAM(model, layer) as cam: probs, heatmaps = cam(x, [k1, k2])` -> (B, C), (B, K, H, W)."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.model, self.layer = model, layer
        self.activations: torch.Tensor | None = None
        self.gradients: torch.Tensor | None = None
        self._handle = None

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.activations = output
        if output.requires_grad:
            output.register_hook(self._keep_gradient)  # tensor hooks die with the graph

    def _keep_gradient(self, grad: torch.Tensor) -> None:
        self.gradients = grad

    def __enter__(self) -> GradCAM:
        self._handle = self.layer.register_forward_hook(self._forward_hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self.activations = self.gradients = None

    def __call__(self, x: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            logits = self.model(x)
            maps = []
            for i, k in enumerate(classes):
                grads = torch.autograd.grad(logits[:, k].sum(), self.activations, retain_graph=i < len(classes) - 1)[0]
                weights = grads.mean(dim=(2, 3), keepdim=True)  # global-average-pooled gradients
                maps.append(F.relu((weights * self.activations).sum(dim=1)))
        cams = F.interpolate(torch.stack(maps, 1), size=x.shape[-2:], mode="bilinear", align_corners=False)
        low = cams.amin(dim=(2, 3), keepdim=True)
        high = cams.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(logits.detach()), ((cams - low) / (high - low).clamp_min(1e-12)).detach()


def overlay(gray: np.ndarray, heatmap: np.ndarray, title: str, path: Path | str) -> None:
    """The heatmap over the original grayscale image (not the normalised tensor), with a colour bar and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.6))
    ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
    shown = ax.imshow(heatmap, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="Grad-CAM")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

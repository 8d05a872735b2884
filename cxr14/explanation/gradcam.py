"""Grad-CAM (Selvaraju et al., 2017) in pytorch-grad-cam's shape: forward hooks keep the target layer's
activations (and record the strided ops before it, for the cells' geometry); the gradient of a class's
logit with respect to those activations comes from `torch.autograd.grad`, so no backward hook is needed.
The hooks exist only inside `with` (`release()` removes them too).

The original recipe used the deprecated module backward hook, never removed it (hooks piled up per call) and
drew over the normalised tensor; here heatmaps are returned in [0, 1] at the input resolution and
drawn over the original grayscale pixels by `heatmaps.overlay`. `last_block_maps` is the same Grad-CAM of the
last block in closed form, without autograd: what the exported ONNX graph computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cxr14.runtime.errors import PipelineError

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


def last_block_maps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (B, C), maps (B, C, h, w), features (B, K)): the forward pass, the head's input (the pooled
    penultimate features, which the out-of-distribution score reads) and, in closed form, Grad-CAM of the last block
    (`gradcam_layer`'s default) for every class at cell resolution, rectified, before resampling: what the export
    stage puts into the ONNX graph, where there is no autograd (`tests/test_export.py` checks it against `GradCAM`).

    Behind the last block every arch here has only per-channel ops, a global average pool and one Linear layer, so
    d logit_c / d A_k(i, j) is W_ck / (h w) times the per-channel ops' derivative at (k, i, j). In a ResNet (layer4
    -> avgpool -> fc) that derivative is 1, and Grad-CAM's weight of channel k is the class's linear weight W_ck /
    (h w): the map is CAM's. In densenet121 (denseblock4 -> norm5 -> ReLU -> pool -> classifier) it is norm5's
    scale where norm5's output is positive and 0 elsewhere, so the averaged weight is W_ck * scale_k * (the share of
    channel k's cells past the ReLU) / (h w), a weight that depends on the image. Eval mode only (norm5's running
    statistics).
    """
    if isinstance(model, torchvision.models.ResNet):
        m = model
        block = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        pooled = torch.flatten(m.avgpool(block), 1)
        logits = m.fc(pooled)
        weighted, linear = block, m.fc.weight
    elif isinstance(model, torchvision.models.DenseNet):
        norm5 = model.features.norm5
        block = model.features[:-1](x)  # through denseblock4
        normed = norm5(block)
        pooled = torch.flatten(F.adaptive_avg_pool2d(F.relu(normed), (1, 1)), 1)
        logits = model.classifier(pooled)
        scale = norm5.weight / torch.sqrt(norm5.running_var + norm5.eps)
        passed = (normed > 0).to(block.dtype).mean(dim=(2, 3))  # (B, K): the ReLU's derivative, averaged
        weighted, linear = block * (scale * passed)[:, :, None, None], model.classifier.weight
    else:
        raise PipelineError(f"Grad-CAM in closed form: {type(model).__name__} is no ResNet or DenseNet; expected a "
                            "model of cxr14.model.factory")
    cells = block.shape[-2] * block.shape[-1]
    maps = torch.einsum("ck,bkhw->bchw", linear / cells, weighted)
    return logits, F.relu(maps), pooled

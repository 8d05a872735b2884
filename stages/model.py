"""Model factory: backbone, new 14-logit head, freezing by module prefix, offline ImageNet weights.

The seed called `model.train()` on the whole network, so the BatchNorm statistics of its "frozen"
layers kept drifting; `set_train_mode` keeps frozen modules in eval mode. ImageNet weights load only
from torchvision's cache (TORCH_HOME): with no network a missing file must be an instant, clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from stages.common import PipelineError

ARCHS = {
    "resnet18": ("ResNet18_Weights", "fc", "layer4"),
    "resnet34": ("ResNet34_Weights", "fc", "layer4"),
    "resnet50": ("ResNet50_Weights", "fc", "layer4"),
    "densenet121": ("DenseNet121_Weights", "classifier", "features.denseblock4"),
}
WEIGHTS = ("imagenet", "none")
OUTPUT_STRIDES = {32: [], 16: [("layer4", 2)], 8: [("layer3", 2), ("layer4", 4)]}  # ResNet stages to dilate


def weights_file(arch: str) -> tuple[Path, str]:
    """Where torchvision's cache keeps `arch`'s ImageNet weights, and the URL they come from."""
    url = getattr(torchvision.models, ARCHS[arch][0]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def load_imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet weights from the local cache only; never a download (and never a hang offline)."""
    path, url = weights_file(arch)
    if not path.is_file():
        raise PipelineError(
            f"ImageNet weights for {arch} not found at {path}; download {url} and place it there "
            "(or set TORCH_HOME to the folder holding hub/checkpoints/), or set train.weights: none"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download fails in many ways inside torch.load
        raise PipelineError(f"{path}: cannot load ImageNet weights ({exc}); download {url} again") from None


def build_model(arch: str, weights: str = "none", num_classes: int = 14, output_stride: int = 32) -> nn.Module:
    """A torchvision backbone with a fresh `num_classes`-logit head."""
    if arch not in ARCHS:
        raise PipelineError(f"params.yaml train.arch: {arch!r}; expected one of {', '.join(ARCHS)}")
    if weights not in WEIGHTS:
        raise PipelineError(f"params.yaml train.weights: {weights!r}; expected one of {', '.join(WEIGHTS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    if weights == "imagenet":
        model.load_state_dict(load_imagenet_state(arch))
    head = ARCHS[arch][1]
    setattr(model, head, nn.Linear(getattr(model, head).in_features, num_classes))
    dilate(model, arch, output_stride)
    return model


def dilate(model: nn.Module, arch: str, output_stride: int) -> None:
    """Trade the last stages' striding for dilation (DeepLab's output stride): same weights, a last-layer map
    2x (16) or 4x (8) finer, so Grad-CAM can point at small boxes; layer4 then costs 4x (16) its compute.

    As torchvision's `replace_stride_with_dilation` (which refuses ResNet18/34's basic blocks): a dilated
    stage's first block keeps the previous stage's dilation, its other blocks take the new one.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise PipelineError(f"params.yaml train.output_stride: {output_stride!r}; expected one of 32, 16, 8")
    if output_stride != 32 and not arch.startswith("resnet"):
        raise PipelineError(f"params.yaml train.output_stride: {output_stride} needs a ResNet; {arch} supports 32 only")
    previous = 1
    for name, dilation in OUTPUT_STRIDES[output_stride]:
        for i, block in enumerate(model.get_submodule(name)):
            d = previous if i == 0 else dilation
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d):
                    conv.stride = (1, 1)
                    if conv.kernel_size == (3, 3):
                        conv.dilation, conv.padding = (d, d), (d, d)
        previous = dilation


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def freeze(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Stop gradients for modules under `prefixes`; returns the frozen module names."""
    names = [name for name, _ in model.named_modules() if name]
    for prefix in prefixes:
        if not any(_matches(n, prefix) for n in names):
            top = [n for n in names if "." not in n]
            raise PipelineError(
                f"params.yaml train.freeze: {prefix!r} matches no module; expected prefixes of {', '.join(top)}"
            )
    for name, param in model.named_parameters():
        if any(_matches(name, p) for p in prefixes):
            param.requires_grad_(False)
    return [n for n in names if any(_matches(n, p) for p in prefixes)]


def set_train_mode(model: nn.Module, frozen: list[str]) -> None:
    """Training mode for what learns; eval mode (fixed BatchNorm statistics) for frozen modules."""
    model.train()
    modules = dict(model.named_modules())
    for name in frozen:
        modules[name].eval()


def param_groups(model: nn.Module, arch: str, lr_head: float, lr_backbone: float) -> list[dict]:
    """Two learning rates as in the seed: the new head learns faster than the pretrained backbone."""
    head = ARCHS[arch][1]
    head_params = [p for n, p in model.named_parameters() if _matches(n, head) and p.requires_grad]
    body_params = [p for n, p in model.named_parameters() if not _matches(n, head) and p.requires_grad]
    groups = [{"params": head_params, "lr": lr_head, "name": "head"}]
    if body_params:
        groups.append({"params": body_params, "lr": lr_backbone, "name": "backbone"})
    return groups


def gradcam_layer(model: nn.Module, arch: str, name: str = "auto") -> tuple[str, nn.Module]:
    """The layer whose activations Grad-CAM weighs: by default the last convolutional block; an earlier
    one (e.g. layer3) gives a finer map where the last one is only a few cells across (small inputs)."""
    name = ARCHS[arch][2] if name == "auto" else name
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        raise PipelineError(f"Grad-CAM layer {name!r} is no module of {arch}; expected 'auto' or a name such as "
                            f"layer3 or features.denseblock4") from None


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The trained model (eval mode) and its metadata from a train-stage checkpoint, tensors only."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no checkpoint; run the train stage (dvc repro train)") from None
    except Exception as exc:  # truncated or foreign files fail in many ways inside torch.load
        raise PipelineError(f"{path}: not a readable checkpoint ({exc})") from None
    missing = [k for k in ("state_dict", "arch", "classes", "image_size", "mean", "std") if k not in ckpt]
    if missing:
        raise PipelineError(f"{path}: checkpoint lacks {', '.join(missing)}; expected one written by stages.train")
    model = build_model(ckpt["arch"], "none", len(ckpt["classes"]), int(ckpt.get("output_stride", 32)))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt

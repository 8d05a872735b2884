"""The model factory: architecture by name, ImageNet weights through torchvision, freezing, Grad-CAM layer.

Frozen layers stay in eval mode (`set_train_mode`), so their BatchNorm statistics do not drift.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cxr14.runtime.errors import PipelineError

if TYPE_CHECKING:
    import torchvision

HASH = re.compile(r"-([a-f0-9]*)\.")  # torchvision's file names end in -<sha256 prefix>.pth

ARCHS = {
    "resnet10": (None, "fc", "layer4"),  # ResNet18 with one block per stage: no ImageNet weights (the demo's)
    "resnet18": ("ResNet18_Weights", "fc", "layer4"),
    "resnet34": ("ResNet34_Weights", "fc", "layer4"),
    "resnet50": ("ResNet50_Weights", "fc", "layer4"),
    "densenet121": ("DenseNet121_Weights", "classifier", "features.denseblock4"),
}

WEIGHTS = ("none", "imagenet", "IMAGENET1K_V1", "IMAGENET1K_V2")  # imagenet: torchvision's best for the arch

OUTPUT_STRIDES = {32: [], 16: [("layer4", 2)], 8: [("layer3", 2), ("layer4", 4)]}  # ResNet stages to dilate

DOWNLOAD_TIMEOUT = 5.0  # seconds without an answer before an offline download gives up

def imagenet_weights(arch: str, name: str) -> torchvision.models.WeightsEnum:
    """torchvision's weights enum member for `name`: `imagenet` is its DEFAULT (ResNet50: IMAGENET1K_V2, 80.9%
    top-1, what the original ChestX-ray14 recipe fine-tuned; ResNet18/34 and DenseNet121 have V1 only; resnet10
    has none)."""
    import torchvision  # here: see `build_model`

    if ARCHS[arch][0] is None:
        raise PipelineError(f"train.weights: {name}; {arch} has no ImageNet weights, expected none")
    enum = getattr(torchvision.models, ARCHS[arch][0])
    if name == "imagenet":
        return enum.DEFAULT
    if name not in enum.__members__:
        raise PipelineError(f"train.weights: {name} does not exist for {arch}; expected imagenet or one of "
                            f"{', '.join(enum.__members__)}")
    return enum[name]

def weights_file(arch: str, name: str = "imagenet") -> tuple[Path, str]:
    """Where torchvision's cache keeps `arch`'s ImageNet weights `name`, and the URL they come from."""
    url = imagenet_weights(arch, name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url

def load_imagenet_state(arch: str, name: str = "imagenet") -> dict[str, torch.Tensor]:
    """ImageNet weights from torchvision's cache, downloaded (with a progress bar, hash checked) when absent."""
    path, url = weights_file(arch, name)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # offline, urllib would otherwise wait for the OS (minutes)
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=HASH.search(path.name).group(1), progress=True)
        except (OSError, RuntimeError) as exc:  # URLError, timeouts and hash mismatches
            raise PipelineError(
                f"ImageNet weights for {arch} not found at {path} and the download failed ({exc}); on a machine "
                f"without network download {url} elsewhere and place it there (or set TORCH_HOME to the folder "
                "holding hub/checkpoints/), or set train.weights: none"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download fails in many ways inside torch.load
        raise PipelineError(f"{path}: cannot load ImageNet weights ({exc}); delete it and run again") from None

def build_model(arch: str, weights: str = "none", num_classes: int = 14, output_stride: int = 32) -> nn.Module:
    """A torchvision backbone with a fresh `num_classes`-logit head; `weights` none, imagenet or a version.

    torchvision is imported here, not with this module: importing it takes 1.6 s (1.4 of them torch._dynamo,
    which torchvision.ops imports), and the train stage's DDP launcher, which builds no model, imports this module.
    """
    import torchvision

    if arch not in ARCHS:
        raise PipelineError(f"train.arch: {arch!r}; expected one of {', '.join(ARCHS)}")
    if weights not in WEIGHTS:
        raise PipelineError(f"train.weights: {weights!r}; expected one of {', '.join(WEIGHTS)}")
    if output_stride not in OUTPUT_STRIDES:
        raise PipelineError(f"train.output_stride: {output_stride!r}; expected one of 32, 16, 8")
    if output_stride != 32 and not arch.startswith("resnet"):
        raise PipelineError(f"train.output_stride: {output_stride} needs a ResNet; {arch} supports 32 only")
    if arch == "resnet10":
        model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    else:
        model = getattr(torchvision.models, arch)(weights=None)
    if weights != "none":
        model.load_state_dict(load_imagenet_state(arch, weights))
    head = ARCHS[arch][1]
    setattr(model, head, nn.Linear(getattr(model, head).in_features, num_classes))
    dilate(model, output_stride)
    return model

def dilate(model: nn.Module, output_stride: int) -> None:
    """Trade the last stages' striding for dilation (DeepLab's output stride): same weights, a last-layer map
    2x (16) or 4x (8) finer, so Grad-CAM can point at small boxes; layer4 then costs 4x (16) its compute.

    As torchvision's `replace_stride_with_dilation` (which refuses ResNet18/34's basic blocks): a dilated
    stage's first block keeps the previous stage's dilation, its other blocks take the new one.
    """
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
                f"train.freeze: {prefix!r} matches no module; expected prefixes of {', '.join(top)}"
            )
    heads = [h for h in {spec[1] for spec in ARCHS.values()} if h in names and any(_matches(h, p) for p in prefixes)]
    if heads:
        raise PipelineError(f"train.freeze: {prefixes!r} freezes the new head '{heads[0]}', which must learn; "
                            "expected backbone modules only")
    for name, param in model.named_parameters():
        if any(_matches(name, p) for p in prefixes):
            param.requires_grad_(False)
    return [n for n in names if any(_matches(n, p) for p in prefixes)]

def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel and torch.compile wrappers: its names and state_dict keys are
    the checkpoint's (no `module.` or `_orig_mod.` prefix)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model

def set_train_mode(model: nn.Module, frozen: list[str]) -> None:
    """Training mode for what learns; eval mode (fixed BatchNorm statistics) for frozen modules."""
    model.train()
    modules = dict(unwrap(model).named_modules())
    for name in frozen:
        modules[name].eval()

def param_groups(model: nn.Module, arch: str, lr_head: float, lr_backbone: float) -> list[dict]:
    """Two learning rates as in the original recipe: the new head learns faster than the pretrained backbone."""
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

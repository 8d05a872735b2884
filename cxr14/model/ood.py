"""Out-of-distribution score: how far an image's features lie from the training images', in the model's own terms.

Method: the Mahalanobis distance (Lee et al., NeurIPS 2018) of the model's pooled penultimate features (the
classifier's input) to one Gaussian fitted on the train split. One Gaussian, not one per class as in Lee et al.:
the labels are multi-label (an image is in several classes or none), so class-conditional Gaussians do not
partition the images. Before the fit each feature goes through a square root (Tukey's power transform with
beta 0.5, as Hu et al. 2021 use on ReLU features): pooled ReLU activations are non-negative and right-skewed, and
the root makes them closer to Gaussian (measured on the demo: test images flagged at the val threshold 7.7% raw,
5.7% rooted; every out-of-distribution set at AUROC 1.0 both ways). The covariance is Ledoit-Wolf shrunk
(512 features from ~1,500 images: the sample covariance is ill-conditioned). The score is the squared distance
divided by the number of features (the mean squared standardised deviation, about 1 for a training image), so
it stays in a range where float32 engines agree to 1e-4 relative.

The threshold is the split-conformal quantile of the val scores (Vovk et al. 2005; Angelopoulos & Bates 2021):
the ceil((n + 1) * coverage)-th smallest of n val scores, which keeps at least `coverage` of exchangeable
in-distribution images, where the plain 95th percentile keeps 95% only on average over val draws (fewer val
images than 1 / (1 - coverage) - 1: the largest val score).

The fit is stored as tensors and plain numbers (`fit_ood`'s dict, the checkpoint's `ood`), so a checkpoint holding
it loads with weights_only=True, and `OodScore` computes the score from it in PyTorch and inside the ONNX graph.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr14.data.loader import to_model_input
from cxr14.model.factory import ARCHS
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.progress import progress

COVERAGE = 0.95  # in-distribution share the threshold keeps
METHOD = "mahalanobis"
FEATURES = "penultimate"  # the classifier's input: pooled features of the last block
TRANSFORM = "sqrt"


class OodScore(nn.Module):
    """Penultimate features (B, D) -> out-of-distribution scores (B,): ||(sqrt(f) - mean) L||^2 / D, with the
    precision matrix P = L L^T (so the product is the squared Mahalanobis distance)."""

    def __init__(self, ood: dict[str, Any]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(ood["mean"], dtype=torch.float32).clone())
        self.register_buffer("factor", torch.as_tensor(ood["factor"], dtype=torch.float32).clone())
        self.scale = 1.0 / self.mean.numel()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (torch.sqrt(torch.clamp(features.float(), min=0.0)) - self.mean) @ self.factor
        return (z * z).sum(dim=1) * self.scale


def head_of(model: nn.Module, arch: str) -> nn.Module:
    """The classifier module (the head `build_model` put on the backbone)."""
    return model.get_submodule(ARCHS[arch][1])


@contextlib.contextmanager
def captured_features(model: nn.Module, arch: str) -> Iterator[list[torch.Tensor]]:
    """Each forward pass's penultimate features (the head's input, float32) appended to the yielded list: the
    probabilities and the score from one pass. The hook is removed on leaving."""
    found: list[torch.Tensor] = []
    handle = head_of(model, arch).register_forward_pre_hook(lambda _m, inputs: found.append(inputs[0].float()))
    try:
        yield found
    finally:
        handle.remove()


@torch.no_grad()
def features(model: nn.Module, arch: str, images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
             batch_size: int = 128, desc: str = "features") -> np.ndarray:
    """Penultimate features (N, D) float64 of uint8 images (N, S, S), in eval mode, without augmentation."""
    from cxr14.model.inference import forward

    model.eval()
    device = next(model.parameters()).device
    out = []
    with captured_features(model, arch) as found:
        for start in progress(range(0, len(images), batch_size), desc=desc, unit="batch"):
            x = torch.from_numpy(np.array(images[start:start + batch_size]))[:, None].to(device)
            forward(model, to_model_input(x.float(), tuple(mean), tuple(std)))
            out.append(found.pop().cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


def conformal_threshold(val_scores: np.ndarray, coverage: float = COVERAGE) -> float:
    """The ceil((n + 1) * coverage)-th smallest val score (the largest when n is too small for that)."""
    n = len(val_scores)
    k = min(math.ceil((n + 1) * coverage), n)
    return float(np.sort(val_scores)[k - 1])


def fit_gaussian(train_features: np.ndarray, val_features: np.ndarray, coverage: float = COVERAGE,
                 where: str = "train") -> dict[str, Any]:
    """The fit from features (rows: images), as `fit_ood` stores it."""
    from sklearn.covariance import LedoitWolf

    if len(train_features) < 2 or len(val_features) < 1:
        raise PipelineError(f"{where}: out-of-distribution fit needs at least 2 train and 1 val images; got "
                            f"{len(train_features)} and {len(val_features)}")
    if not (np.isfinite(train_features).all() and np.isfinite(val_features).all()):
        raise PipelineError(f"{where}: out-of-distribution fit: the model's features are not finite (NaN or inf); "
                            "expected a trained model")
    x = np.sqrt(np.maximum(train_features, 0.0))
    estimate = LedoitWolf().fit(x)
    precision = (estimate.precision_ + estimate.precision_.T) / 2
    try:
        factor = np.linalg.cholesky(precision)
    except np.linalg.LinAlgError:
        raise PipelineError(f"{where}: out-of-distribution fit: the shrunk covariance of {len(x)} train images is "
                            "singular; expected features that vary across images") from None
    fit = {"method": METHOD, "features": FEATURES, "transform": TRANSFORM,
           "mean": torch.from_numpy(x.mean(0).astype(np.float32)),
           "factor": torch.from_numpy(factor.astype(np.float32)),
           "shrinkage": float(estimate.shrinkage_), "coverage": coverage, "train_images": len(train_features),
           "val_images": len(val_features)}
    val = score_features(fit, val_features)
    fit["threshold"] = conformal_threshold(val, coverage)
    fit["val_flagged"] = float((val > fit["threshold"]).mean())
    return fit


def score_features(ood: dict[str, Any], feats: np.ndarray) -> np.ndarray:
    """Scores (N,) of features (N, D), float32 arithmetic as the engines compute them."""
    with torch.no_grad():
        return OodScore(ood)(torch.from_numpy(np.asarray(feats, dtype=np.float32))).numpy().astype(np.float64)


def fit_ood(model: nn.Module, train_images: np.ndarray, val_images: np.ndarray, arch: str,
            mean: tuple[float, ...], std: tuple[float, ...], batch_size: int = 128,
            coverage: float = COVERAGE) -> dict[str, Any]:
    """The out-of-distribution fit of a trained model (eval mode, no augmentation): the Gaussian on its train
    images' features, the threshold on its val images' scores. The checkpoint's `ood` entry."""
    train = features(model, arch, train_images, mean, std, batch_size, "ood: train features")
    val = features(model, arch, val_images, mean, std, batch_size, "ood: val features")
    return fit_gaussian(train, val, coverage)


def check_ood(ood: Any, where: str) -> dict[str, Any]:
    """A checkpoint's `ood` entry, refused in one line unless it is `fit_ood`'s."""
    keys = ("method", "mean", "factor", "threshold")
    if not isinstance(ood, dict) or any(k not in ood for k in keys) or ood["method"] != METHOD:
        raise PipelineError(f"{where}: ood: expected the train stage's fit ({', '.join(keys)}; method {METHOD})")
    d = len(ood["mean"])
    if tuple(torch.as_tensor(ood["factor"]).shape) != (d, d):
        raise PipelineError(f"{where}: ood: factor is {tuple(torch.as_tensor(ood['factor']).shape)}; expected "
                            f"({d}, {d}) for {d} features")
    t = ood["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise PipelineError(f"{where}: ood: threshold {t!r}; expected a finite number >= 0")
    return ood


def scores_of(model: nn.Module, ckpt: dict[str, Any], images: np.ndarray, batch_size: int = 128,
              desc: str = "ood: scores") -> np.ndarray:
    """The checkpoint's out-of-distribution scores of uint8 images (N, S, S)."""
    ood = check_ood(ckpt.get("ood"), "checkpoint")
    feats = features(model, ckpt["arch"], images, tuple(ckpt["mean"]), tuple(ckpt["std"]), batch_size, desc)
    return score_features(ood, feats)

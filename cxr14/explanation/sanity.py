"""Sanity checks for the Grad-CAM heatmaps: do they depend on what the model learned, and on what it looks at?

A heatmap can look plausible and explain nothing: Adebayo et al. (2018, "Sanity Checks for Saliency Maps")
found methods whose maps barely change when the model's weights are replaced by random ones (they mostly
draw the image's edges). Two checks, on each class's most confident positive test images:

- model randomisation (Adebayo et al.'s cascading test, its first two steps): the maps of the trained model
  against those of the same model with its head and last block re-initialised, as a Spearman rank
  correlation per image. A map that reads the learned weights changes: LOW correlation is the good result.
- deletion (Petsiuk et al., 2018, RISE's deletion metric, on a grid of cells): the class probability as the
  cells the map ranks highest are blanked first, against blanking them in a random order; the area under
  the probability-vs-fraction-deleted curve is LOWER than random's when the map points at what the
  model uses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from cxr14.data.loader import PreparedImages, to_model_input
from cxr14.data.nih import CLASSES
from cxr14.explanation.examples import heatmaps
from cxr14.explanation.gradcam import GradCAM
from cxr14.model.factory import gradcam_layer
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import rounded
from cxr14.runtime.progress import progress

# What the randomisation test re-initialises: the head and the last block (its final norm too, for DenseNet).
RANDOMISED: dict[str, tuple[str, ...]] = {
    "resnet10": ("fc", "layer4"),
    "resnet18": ("fc", "layer4"),
    "resnet34": ("fc", "layer4"),
    "resnet50": ("fc", "layer4"),
    "densenet121": ("classifier", "features.denseblock4", "features.norm5"),
}


def randomised_copy(model: nn.Module, arch: str, seed: int) -> tuple[nn.Module, list[str]]:
    """A deep copy of `model` with RANDOMISED[arch] re-initialised, and the names (state_dict keys) of the
    parameters and buffers that were: each module's own `reset_parameters()` (a BatchNorm's also resets its
    running statistics), drawn on the CPU from `seed` so the copy is the same on every device. Everything else
    is the original's, bit for bit; the original and the global random state are untouched.

    Call it outside any `with GradCAM(model, ...)`: a deep copy would copy the hooks registered on `model`.
    """
    if arch not in RANDOMISED:
        raise PipelineError(f"randomisation test: arch {arch!r}; expected one of {', '.join(RANDOMISED)}")
    device = next(model.parameters()).device
    twin = copy.deepcopy(model).cpu()
    names = []
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: the caller's draws go on as before
        torch.default_generator.manual_seed(seed)
        for prefix in RANDOMISED[arch]:
            for name, module in twin.get_submodule(prefix).named_modules(prefix=prefix):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                    names += [f"{name}.{key}" for key, _ in module.named_parameters(recurse=False)]
                    names += [f"{name}.{key}" for key, _ in module.named_buffers(recurse=False)]
    return twin.to(device), names


def most_confident_positives(labels: np.ndarray, probs: np.ndarray, n: int) -> dict[int, list[int]]:
    """Per class index, up to `n` rows labelled positive with the highest probability (ties: the earlier row).

    Not limited to rows above the class's threshold: a class that no image reaches would go untested."""
    out = {}
    for k in range(labels.shape[1]):
        rows = np.flatnonzero(labels[:, k] == 1)
        out[k] = [int(r) for r in rows[np.argsort(-probs[rows, k], kind="stable")][:n]]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps, pixel by pixel (ties take their average rank); NaN when
    either map is constant, since a map without an order correlates with nothing."""
    a, b = np.ravel(a), np.ravel(b)
    if a.shape != b.shape:
        raise PipelineError(f"spearman: maps of {a.size} and {b.size} values; expected maps of one size")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    r = np.corrcoef(rankdata(a), rankdata(b))[0, 1]
    return float(np.clip(r, -1.0, 1.0))


def randomisation_score(trained: np.ndarray, randomised: np.ndarray) -> float:
    """Spearman of a trained map with its randomised twin's. A constant randomised map (Grad-CAM's ReLU zeroes a
    randomised model's map often) has lost every trace of the trained map's order: 0, a pass, not a gap. A
    constant trained map has no order to lose: NaN, left out (and counted: the trained model shows nothing)."""
    if np.ptp(trained) == 0:
        return float("nan")
    if np.ptp(randomised) == 0:
        return 0.0
    return spearman(trained, randomised)


def cell_index(size: tuple[int, int], grid: int) -> np.ndarray:
    """(H, W): the cell, row-major in a grid x grid split, of each pixel; cell sides differ by a pixel at most."""
    if not 1 <= grid <= min(size):
        raise PipelineError(f"deletion grid: {grid} cells across a {size[0]}x{size[1]} image; expected 1 to "
                            f"{min(size)} (one pixel per cell at least)")
    rows, cols = ((np.arange(n) * grid) // n for n in size)
    return rows[:, None] * grid + cols[None, :]


def deleted_counts(cells: int, steps: int) -> np.ndarray:
    """Cells blanked after each of `steps` steps, 0 first and `cells` last, as evenly as whole cells allow."""
    if not 1 <= steps <= cells:
        raise PipelineError(f"deletion steps: {steps}; expected 1 to {cells} (the grid's cells)")
    return (np.arange(steps + 1) * cells + steps // 2) // steps


def cell_order(heatmap: np.ndarray, cells_of: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cell indices from the most to the least salient (the heatmap's mean over the cell's pixels).

    Ties go in a random order from `rng`, not by index: a Grad-CAM map holds its outer cells' values to the
    border, so many cells tie exactly, and a constant map (no preference at all) should score as random
    order does, not as a fixed top-left-first sweep."""
    n = int(cells_of.max()) + 1
    if np.ptp(heatmap) == 0:  # no preference: cell means would differ by rounding with cell size, not by the map
        return rng.permutation(n)
    score = np.bincount(cells_of.ravel(), weights=heatmap.ravel(), minlength=n) / np.bincount(cells_of.ravel(),
                                                                                              minlength=n)
    return np.lexsort((rng.permutation(n), -score))


def blanked(image: np.ndarray, cells_of: np.ndarray, order: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """(len(counts), H, W) uint8: `image` with its first counts[i] cells of `order` set to its own mean grey.

    The mean grey rather than black: the blank carries no finding and keeps the image's overall brightness,
    so the probability falls for what was removed rather than for a dark image the model never saw."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    blank = np.uint8(np.floor(image.mean() + 0.5))
    return np.where(rank[cells_of][None] < np.asarray(counts)[:, None, None], blank, image[None])


def chunks(stacks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Images from a stream of stacks, regrouped into batches of `size` (the last one smaller)."""
    buffer: list[np.ndarray] = []
    held = 0
    for stack in stacks:
        buffer.append(stack)
        held += len(stack)
        while held >= size:
            whole = np.concatenate(buffer)
            yield whole[:size]
            buffer, held = [whole[size:]], held - size
    if held:
        yield np.concatenate(buffer)


def deletion_curves(model: nn.Module, images: np.ndarray, classes: Sequence[int], orders: np.ndarray, grid: int,
                    steps: int, mean: tuple[float, ...], std: tuple[float, ...], batch: int,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """(P, O, steps + 1): the probability of class classes[p] for image p (uint8, (P, H, W)) as its cells are
    blanked in each of its O orders (orders (P, O, grid * grid)), from the image itself to all cells blank.

    Forwards in batches of `batch` images; the untouched and the all-blank image are shared by the orders."""
    n_pairs, n_orders = orders.shape[:2]
    cells_of = cell_index(images.shape[1:], grid)
    counts = deleted_counts(grid * grid, steps)
    middle = steps - 1  # images per order between the untouched and the all-blank one
    per_pair = 2 + n_orders * middle

    bar = progress(total=n_pairs, desc="deletion", unit="map")

    def stacks() -> Iterator[np.ndarray]:
        for p in range(n_pairs):
            yield np.concatenate([blanked(images[p], cells_of, orders[p, 0], counts[:1]),
                                  *(blanked(images[p], cells_of, o, counts[1:-1]) for o in orders[p]),
                                  blanked(images[p], cells_of, orders[p, 0], counts[-1:])])
            bar.update(1)

    wanted = np.repeat(np.asarray(classes, dtype=np.int64), per_pair)
    flat = np.empty(n_pairs * per_pair)
    done = 0
    with torch.no_grad():
        for part in chunks(stacks(), batch):
            x = to_model_input(torch.from_numpy(part)[:, None].to(device), mean, std)
            probs = torch.sigmoid(model(x)).cpu().numpy()
            flat[done:done + len(part)] = probs[np.arange(len(part)), wanted[done:done + len(part)]]
            done += len(part)
    bar.close()
    per = flat.reshape(n_pairs, per_pair)
    out = np.empty((n_pairs, n_orders, steps + 1))
    out[:, :, 0], out[:, :, -1] = per[:, :1], per[:, -1:]
    out[:, :, 1:-1] = per[:, 1:-1].reshape(n_pairs, n_orders, middle)
    return out


def deletion_areas(curves: np.ndarray, grid: int, steps: int) -> np.ndarray:
    """Area under each probability curve (last axis) over the fraction of cells deleted, 0 to 1 (trapezoids)."""
    return np.trapezoid(curves, deleted_counts(grid * grid, steps) / (grid * grid), axis=-1)


def randomisation_maps(model: nn.Module, arch: str, layer: str, data: PreparedImages, pairs: list[tuple[int, int]],
                       mean: tuple[float, ...], std: tuple[float, ...], batch: int, seed: int,
                       device: torch.device | str = "cpu") -> tuple[dict[tuple[int, int], np.ndarray], list[str]]:
    """Grad-CAM at `layer` of `model`'s randomised copy for each (row, class) pair, and the names of the tensors
    it re-initialised. The copy's hooks go when the `with` block ends, and the copy with them."""
    twin, reset = randomised_copy(model, arch, seed)
    _, twin_layer = gradcam_layer(twin, arch, layer)
    with GradCAM(twin, twin_layer) as cam:
        maps = heatmaps(cam, data, pairs, mean, std, batch, device)
    return maps, reset


def sanity_checks(model: nn.Module, arch: str, layer: str, data: PreparedImages, rows: dict[int, list[int]],
                  maps: dict[tuple[int, int], np.ndarray], mean: tuple[float, ...], std: tuple[float, ...], *,
                  steps: int, grid: int, seed: int, batch: int, device: torch.device | str = "cpu") -> dict:
    """Both checks on rows[k] for each class k, with the trained model's Grad-CAM `maps` at `layer` (which
    must hold every (row, k) pair): explain.json's `sanity` section, per class and overall.

    The maps are compared at the resolution GradCAM returns them, the input's pixels: that is what the
    overlays show and the pointing game, T(IoBB) and the deletion order read, Adebayo et al. compared
    upsampled Grad-CAM maps the same way, and the resampling is the same fixed interpolation for both models
    (same architecture, same geometry), so it favours neither. Ranks, unlike the maps' values, are untouched
    by GradCAM's per-map scaling to [0, 1]. Constant maps (every cell zero after Grad-CAM's ReLU, or a 1 x 1
    map) are counted apart, by which model drew them (`randomisation_score`): a constant randomised map
    scores 0, a constant trained map is left out of the mean.
    """
    pairs = [(row, k) for k in sorted(rows) for row in rows[k]]
    random_maps, reset = randomisation_maps(model, arch, layer, data, pairs, mean, std, batch, seed, device)
    rho = np.array([randomisation_score(maps[p], random_maps[p]) for p in pairs])
    flat_random = np.array([np.ptp(random_maps[p]) == 0 and np.ptp(maps[p]) > 0 for p in pairs])

    images = data[np.array([row for row, _ in pairs], dtype=np.int64)][0][:, 0].numpy()
    cells_of = cell_index(images.shape[1:], grid)
    orders = np.empty((len(pairs), 2, grid * grid), dtype=np.int64)
    for i, (row, k) in enumerate(pairs):
        rng = np.random.default_rng([seed, row, k])  # the same orders whatever other pairs are checked
        orders[i, 1] = rng.permutation(grid * grid)
        orders[i, 0] = cell_order(maps[(row, k)], cells_of, rng)
    curves = deletion_curves(model, images, [k for _, k in pairs], orders, grid, steps, mean, std, batch, device)
    areas = deletion_areas(curves, grid, steps)

    def mean_of(values: np.ndarray) -> float:
        values = values[np.isfinite(values)]
        return float(values.mean()) if len(values) else float("nan")

    per_class = {}
    for k, name in enumerate(CLASSES):
        mine = np.array([i for i, (_, kk) in enumerate(pairs) if kk == k], dtype=np.int64)
        per_class[name] = {"images": len(mine), "constant_trained_maps": int(np.isnan(rho[mine]).sum()),
                           "constant_randomised_maps": int(flat_random[mine].sum()),
                           "randomisation_spearman": mean_of(rho[mine]),
                           "deletion_area_gradcam": mean_of(areas[mine, 0]),
                           "deletion_area_random": mean_of(areas[mine, 1])}
    checked = [c for c in per_class.values() if c["images"]]
    overall = {
        "classes": len(checked), "images": len(pairs), "constant_trained_maps": int(np.isnan(rho).sum()),
        "constant_randomised_maps": int(flat_random.sum()),
        "randomisation_spearman": mean_of(np.array([c["randomisation_spearman"] for c in checked])),
        "deletion_area_gradcam": mean_of(np.array([c["deletion_area_gradcam"] for c in checked])),
        "deletion_area_random": mean_of(np.array([c["deletion_area_random"] for c in checked])),
        "classes_gradcam_below_random": sum(c["deletion_area_gradcam"] < c["deletion_area_random"] for c in checked),
    }
    settings = {"deletion_steps": steps, "deletion_grid": grid, "seed": seed, "randomised": list(RANDOMISED[arch]),
                "randomised_tensors": len(reset), "map_size": list(images.shape[1:]), "blank": "image mean grey"}
    return rounded({"overall": overall, "per_class": per_class, "settings": settings})

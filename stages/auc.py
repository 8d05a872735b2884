"""ROC-AUC with patient-bootstrap intervals, and ROC/PR curves on fixed grids for DVC plots.

Images of one patient are correlated (follow-ups), so intervals resample patients, not images.
A thousand resamples of 25,596 test images x 14 classes through sklearn would take minutes; the
weighted Mann-Whitney form below sorts each class once and scores all resamples together.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC (ties count one half) for each row of `weights` (B, N); nan where a class side is empty."""
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order].astype(bool), weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    pos = np.add.reduceat(np.where(y, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(y, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def patient_bootstrap_weights(patients: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(B, N) image weights: each resample draws patients with replacement; an image counts as often as its patient."""
    ids, index = np.unique(patients, return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=resamples).astype(np.float32)
    return counts[:, index]


def auc_with_interval(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, level: float = 0.95
) -> tuple[float | None, float | None, float | None]:
    """Point AUC and the bootstrap percentile interval; Nones when the class lacks positives or negatives."""
    point = weighted_auc(scores, labels, np.ones((1, len(scores))))[0]
    if np.isnan(point):
        return None, None, None
    boot = np.concatenate([weighted_auc(scores, labels, chunk) for chunk in np.array_split(weights, 8)])
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(boot, [tail, 100 - tail])
    return float(point), float(low), float(high)


def roc_on_grid(scores: np.ndarray, labels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Best TPR reachable at each FPR of `grid` (the ROC step curve, sampled for a compact plot file)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return np.array([tpr[fpr <= x].max() for x in grid])


def pr_on_grid(scores: np.ndarray, labels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Interpolated precision (best precision at recall >= r) at each recall of `grid`."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    return np.array([precision[recall >= r].max() if (recall >= r).any() else 0.0 for r in grid])

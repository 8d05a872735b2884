"""Ranking metrics, defined once: ROC-AUC (one implementation, for training, evaluation and intervals),
patient-bootstrap intervals, macro means over the classes where a metric exists, curves for DVC plots.

Images of one patient are correlated (follow-ups), so intervals resample patients, not images.
A label may be unknown (NaN: a finding an own-data table lacks, docs/datasets.md): every per-class figure here
is over the images whose label is known, and a class with none known has no value.
A thousand resamples of 25,596 test images x 14 classes through sklearn would take minutes; the
weighted Mann-Whitney form below sorts each class once and scores a block of resamples at a time, from
the patients' draw counts (PatientBootstrap), so memory stays flat however large the test split is.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


def known(y: np.ndarray) -> np.ndarray:
    """Boolean mask of the labels that are known (not NaN); all True for integer labels."""
    y = np.asarray(y)
    return ~np.isnan(y) if y.dtype.kind == "f" else np.ones(y.shape, dtype=bool)


def drop_unknown(y: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """`y` and `arrays` (the same rows) without the rows whose label is unknown; as they are when all are known."""
    y = np.asarray(y)
    mask = known(y)
    if mask.all():
        return (y, *arrays)
    return (y[mask], *(np.asarray(a)[mask] for a in arrays))


def has_both(y: np.ndarray) -> bool:
    """AUC, a threshold or a calibrator exist for a class only if its known labels hold both outcomes."""
    y = np.asarray(y)
    mask = known(y)
    if not mask.all():
        y = y[mask]
    return 0 < int(np.count_nonzero(y)) < len(y)


def mean_defined(values: Sequence[float | None]) -> float | None:
    """Macro average over the classes where the value exists (None where it exists for none)."""
    defined = [float(v) for v in values if v is not None and v == v]
    return float(np.mean(defined)) if defined else None


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC-AUC of one class over its known labels (ties count one half); None unless they hold both outcomes."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    mask = known(labels)
    if not mask.all():
        scores, labels = scores[mask], labels[mask]
    if len(labels) == 0:
        return None
    value = weighted_auc(np.asarray(scores), np.asarray(labels), np.ones((1, len(scores))))[0]
    return None if np.isnan(value) else float(value)


def mean_auc(labels: np.ndarray, probs: np.ndarray) -> tuple[float | None, list[float | None]]:
    """Macro ROC-AUC over the classes where it is defined, and the per-class values (None where undefined).

    Non-finite scores (a diverged model) are an error, not an AUC: sorting NaNs would give a number.
    """
    if not np.isfinite(probs).all():
        raise ValueError("scores are not all finite")
    per_class = [auc(probs[:, k], labels[:, k]) for k in range(labels.shape[1])]
    return mean_defined(per_class), per_class


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC (ties count one half) for each row of `weights` (B, N); nan where a class side is empty."""
    order = np.argsort(scores, kind="stable")
    return sorted_auc(scores[order], labels[order], weights[:, order])


def sorted_auc(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`weighted_auc` of scores already in ascending (stable) order, with labels and weight columns in that order."""
    y = y.astype(bool)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    pos = np.add.reduceat(np.where(y, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(y, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


class PatientBootstrap:
    """Patient resamples kept as what was drawn, (B, patients) counts, not as (B, images) weights.

    On NIH's test split (25,596 images, 2,797 patients) a thousand resamples as image weights are 102 MB,
    held for all 14 classes and copied again per class to sort them; the counts are 11 MB, and each class
    gathers its image weights, already in score order, for a block of resamples at a time.
    """

    BLOCK = 1 << 22  # image weights gathered at once (16 MB of float32): memory stays flat with the test size

    def __init__(self, patients: np.ndarray, resamples: int, seed: int) -> None:
        ids, self.index = np.unique(patients, return_inverse=True)
        rng = np.random.default_rng(seed)
        self.counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=resamples).astype(np.float32)

    def weights(self, rows: np.ndarray | slice = slice(None), order: np.ndarray | None = None) -> np.ndarray:
        """(rows, N) image weights: each image counts as often as its patient was drawn; columns in `order`."""
        return self.counts[rows][:, self.index if order is None else self.index[order]]

    def blocks(self) -> list[np.ndarray]:
        """Row blocks of at most BLOCK image weights each (and at least 8 blocks, as the dense path splits)."""
        n_rows = len(self.counts)
        per_block = max(1, self.BLOCK // max(1, len(self.index)))
        return np.array_split(np.arange(n_rows), max(8, -(-n_rows // per_block)))


def patient_bootstrap_weights(patients: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(B, N) image weights: each resample draws patients with replacement; an image counts as often as its patient."""
    return PatientBootstrap(patients, resamples, seed).weights()


def bootstrap_aucs(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | PatientBootstrap) -> np.ndarray:
    """(B,) AUC under each resample (nan where a resample drew no positive or no negative).

    `weights`: (B, N) image weights, or a PatientBootstrap, whose weights are made a block at a time.
    One PatientBootstrap given to two models' scores pairs them: the same patients in each resample.
    Images whose label is unknown weigh 0 in every resample: the patients drawn stay the same as for the other
    classes (the macro mean's resamples pair up), and those images count for nothing.
    """
    mask = known(labels)
    if not mask.all():
        labels = np.where(mask, labels, 0.0)
    if isinstance(weights, PatientBootstrap):
        order = np.argsort(scores, kind="stable")
        s, y = scores[order], labels[order]
        if mask.all():
            return np.concatenate([sorted_auc(s, y, weights.weights(rows, order)) for rows in weights.blocks()])
        m = mask[order]
        return np.concatenate([sorted_auc(s, y, weights.weights(rows, order) * m) for rows in weights.blocks()])
    if not mask.all():
        weights = weights * mask
    return np.concatenate([weighted_auc(scores, labels, chunk) for chunk in np.array_split(weights, 8)])


def percentile_interval(boot: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The bootstrap percentile interval, ignoring resamples where the value was undefined."""
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(boot, [tail, 100 - tail])
    return float(low), float(high)


def auc_with_interval(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | PatientBootstrap, level: float = 0.95
) -> tuple[float | None, float | None, float | None]:
    """Point AUC and the bootstrap percentile interval; Nones when the class lacks positives or negatives."""
    point = auc(scores, labels)
    if point is None:
        return None, None, None
    return (float(point), *percentile_interval(bootstrap_aucs(scores, labels, weights), level))


def macro_bootstrap(labels: np.ndarray, probs: np.ndarray, weights: PatientBootstrap
                    ) -> tuple[float | None, np.ndarray | None]:
    """Macro mean AUC over the classes defined on these images, and its (B,) value under each resample.

    A resample that draws no positive of a class averages over the other classes (nanmean): on small
    subgroups that happens; on NIH's test split it does not.
    """
    defined = [k for k in range(labels.shape[1]) if has_both(labels[:, k])]
    if not defined:
        return None, None
    point = float(np.mean([auc(probs[:, k], labels[:, k]) for k in defined]))
    boot = np.stack([bootstrap_aucs(probs[:, k], labels[:, k], weights) for k in defined])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-nan column: that resample is ignored
        return point, np.nanmean(boot, axis=0)


def roc_on_grid(scores: np.ndarray, labels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Best TPR reachable at each FPR of `grid` (the ROC step curve, sampled for a compact plot file)."""
    from sklearn.metrics import roc_curve  # here, not at the top: predict imports this module, not the curves

    mask = known(labels)
    scores, labels = np.asarray(scores)[mask], np.asarray(labels)[mask]
    fpr, tpr, _ = roc_curve(labels, scores)
    return np.array([tpr[fpr <= x].max() for x in grid])


def pr_on_grid(scores: np.ndarray, labels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Interpolated precision (best precision at recall >= r) at each recall of `grid`."""
    from sklearn.metrics import precision_recall_curve

    mask = known(labels)
    scores, labels = np.asarray(scores)[mask], np.asarray(labels)[mask]
    precision, recall, _ = precision_recall_curve(labels, scores)
    return np.array([precision[recall >= r].max() if (recall >= r).any() else 0.0 for r in grid])

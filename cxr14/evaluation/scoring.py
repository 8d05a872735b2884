"""Test-set evaluation: predictions per split, AUC with patient-bootstrap intervals, oracle, curves, score plot.

The original ChestX-ray14 recipe reported validation numbers only. Here the test split (NIH's official list)
gets mean and per-class ROC-AUC with patient-bootstrap 95% intervals, average precision and prevalence; on the
demo the clean labels give the oracle AUC (the best any model can score against the noisy labels).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score

from cxr14 import paths
from cxr14.data.loader import PreparedImages, make_loader
from cxr14.data.nih import CLASSES, META_COLUMNS, parse_findings
from cxr14.data.splits import read_split_table
from cxr14.evaluation.metrics import (
    PatientBootstrap,
    auc_with_interval,
    drop_unknown,
    has_both,
    macro_bootstrap,
    mean_defined,
    percentile_interval,
    pr_on_grid,
    roc_on_grid,
)
from cxr14.evaluation.metrics import auc as auc_of
from cxr14.evaluation.predictions import PROB_PREFIX
from cxr14.model.inference import Batches, evaluate
from cxr14.model.ood import captured_features, check_ood, score_features
from cxr14.runtime.errors import warn
from cxr14.runtime.outputs import atomic_path, rounded

GRID = np.linspace(0, 1, 101)
TRIM_EVERY = 4  # batches between two malloc_trim calls: resident memory stays flat, the calls stay rare
T = TypeVar("T")
OOD_COLUMN = "ood_score"  # data/predictions: each image's out-of-distribution score


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):
        return None


def heap_trimmed(batches: Iterable[T], every: int = TRIM_EVERY) -> Iterator[T]:
    """`batches`, handing the memory the previous batches freed back to the system every `every` of them.

    On a CPU, glibc keeps the activations it has freed in its heaps (its mmap threshold grows to their size),
    and the small arrays the loop keeps per batch (probabilities, labels) stop it from returning them: the
    evaluate stage's resident memory grew with the number of batches, +700 MiB over NIH's val and test at
    64 px and about 12 MiB a batch at 224 px. Trimming keeps it flat; the numbers are untouched.
    """
    trim = malloc_trim()
    for i, batch in enumerate(batches):
        if trim is not None and i % every == 0:
            trim(0)
        yield batch


def predict_split(model: torch.nn.Module, ckpt: dict, split: str, device: torch.device,
                  batch_size: int) -> pd.DataFrame:
    """Labels and probabilities of one split, in split-table order (the predictions contract)."""
    table = read_split_table(paths.SPLIT / f"{split}.csv")  # read once: its labels and its ids
    data = PreparedImages(paths.PREPARED / f"{split}.npy", table[list(CLASSES)].to_numpy(dtype=np.float32))
    data.require_size(ckpt["image_size"])
    with captured_features(model, ckpt["arch"]) as found:  # the out-of-distribution score from the same pass
        result = evaluate(model, heap_trimmed(keep_features(make_loader(data, batch_size, shuffle=False), found)),
                          torch.nn.BCEWithLogitsLoss(), Batches(device, reuse=True))
    probs = pd.DataFrame(result["probs"], columns=[PROB_PREFIX + c for c in CLASSES])
    meta = [c for c in META_COLUMNS if c in table.columns]  # for subgroup metrics, here and in calibrate
    frame = pd.concat([table[["Image Index", "Patient ID", *meta, *CLASSES]], probs], axis=1)
    if ckpt.get("ood") is not None:  # a checkpoint from before the out-of-distribution fit has none
        frame[OOD_COLUMN] = score_features(check_ood(ckpt["ood"], "checkpoint"), np.concatenate(found))
    return frame


def keep_features(batches: Iterable[T], found: list) -> Iterator[T]:
    """The batches, with each one's captured features moved to the CPU once the next is asked for (the hook
    appends them on the device)."""
    for batch in batches:
        yield batch
        if found and found[-1].device.type != "cpu":
            found[-1] = found[-1].cpu()
    found[:] = [f.cpu().numpy() for f in found]


def ood_summary(preds: dict[str, pd.DataFrame], ckpt: dict) -> dict | None:
    """reports/evaluate.json's `ood`: the share of each scored split flagged at the checkpoint's threshold (val
    keeps about the threshold's coverage by construction; test says whether that holds on unseen images)."""
    if ckpt.get("ood") is None:
        return None
    threshold = float(ckpt["ood"]["threshold"])
    out = {"threshold": rounded(threshold), "coverage": ckpt["ood"].get("coverage")}
    for split, frame in preds.items():
        scores = frame[OOD_COLUMN].to_numpy()
        out[split] = {"images": len(scores), "flagged": rounded(float((scores > threshold).mean())),
                      "median_score": rounded(float(np.median(scores)))}
    return out


def clean_labels(root: Path, names: pd.Series) -> np.ndarray | None:
    """The demo's clean labels for `names` (None on real data, which has none)."""
    path = root / "clean_labels.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path).set_index("Image Index")["Finding Labels"]
    return np.stack([parse_findings(table[n], f"{path} ({n})") for n in names])


def score_test(pred: pd.DataFrame, clean: np.ndarray | None, resamples: int, seed: int) -> dict:
    """reports/evaluate.json's test figures: macro and per-class AUC with intervals, AP, prevalence, oracle."""
    weights = PatientBootstrap(pred["Patient ID"].to_numpy(), resamples, seed)  # the draws, not (B, N) weights
    per_class, aucs = {}, []
    for k, name in enumerate(CLASSES):
        y, p = pred[name].to_numpy(), pred[PROB_PREFIX + name].to_numpy()
        yk, pk = drop_unknown(y, p)  # an own-data table's unknown labels (NaN) are left out, not negatives
        if len(yk) == 0:
            per_class[name] = {"auc": None, "auc_ci_low": None, "auc_ci_high": None, "average_precision": None,
                               "prevalence": None, "positives": None,
                               "note": "no known labels in test (the dataset's table lacks this finding)"}
            aucs.append(None)
            continue
        auc, low, high = auc_with_interval(p, y, weights)
        if auc is None:
            warn(f"{name} has no positives (or no negatives) in test; its metrics are null")
        entry = {"auc": auc, "auc_ci_low": low, "auc_ci_high": high,
                 "average_precision": float(average_precision_score(yk, pk)) if yk.any() else None,
                 "prevalence": float(yk.mean()), "positives": int(yk.sum())}
        if len(yk) < len(y):
            entry["known"] = len(yk)
        if clean is not None:
            entry["oracle_auc"] = auc_of(clean[:, k].astype(float), y)
        per_class[name] = rounded(entry)
        aucs.append(auc)
    out = {"mean_auc": rounded(mean_defined(aucs)), "images": len(pred),
           "patients": int(pred["Patient ID"].nunique()), "bootstrap_resamples": resamples}
    labels, probs = pred[list(CLASSES)].to_numpy(), pred[[PROB_PREFIX + n for n in CLASSES]].to_numpy()
    _, boot = macro_bootstrap(labels, probs, weights)  # the same resamples as the classes' intervals
    if boot is not None:
        out["mean_auc_ci_low"], out["mean_auc_ci_high"] = rounded(percentile_interval(boot))
    if clean is not None:
        out["oracle_mean_auc"] = rounded(mean_defined([v["oracle_auc"] for v in per_class.values()]))
        defined = out["mean_auc"] is not None and out["oracle_mean_auc"] is not None
        out["gap_to_oracle"] = rounded(out["oracle_mean_auc"] - out["mean_auc"]) if defined else None
    out["per_class"] = per_class
    return out


def headline(report: dict) -> dict:
    """metrics/evaluate.json: the test figures experiments are compared on, picked from the report (the
    breakdowns stay in reports/evaluate.json, so `dvc exp show` stays one legible row). The expert-label
    mean is over the findings with an AUC, as reported, beside the number of test images scored against expert
    labels (where the data root has them); the subgroup gap is the largest attribute's."""
    # short keys, and no gap to the oracle (the oracle less the AUC), so that a retrained experiment's row of
    # `dvc exp show --only-changed` fits 200 columns with its changed param
    names = {"mean_auc": "auc", "mean_auc_ci_low": "auc_low", "mean_auc_ci_high": "auc_high",
             "oracle_mean_auc": "oracle"}
    out = {short: report[key] for key, short in names.items() if key in report}
    expert = [f["auc"] for f in report.get("expert", {}).get("findings", {}).values() if f.get("auc") is not None]
    if expert:
        out["expert"] = rounded(float(np.mean(expert)))
    if "images" in report.get("expert", {}):  # how many test images that mean rests on: 0 says the file matched none
        out["expert_images"] = report["expert"]["images"]
    gaps = [a["gap"] for a in report.get("subgroups", {}).values() if isinstance(a, dict) and a["gap"] is not None]
    if gaps:
        out["group_gap"] = max(gaps)
    if report.get("ood"):  # test images the out-of-distribution score flags at the val threshold (~5% expected)
        out["ood_flagged"] = report["ood"]["test"]["flagged"]
    return out


def forest_rows(metrics: dict) -> pd.DataFrame:
    """plots/evaluate/forest.csv, the forest plot's rows in reading order: the macro mean, each class, then each
    expert-labelled finding; AUC with its patient-bootstrap 95% interval and, on the demo, the oracle's AUC.
    `order` fixes the rows' order on the page whatever the values, so revisions line up in `dvc plots diff`."""
    scored = sum(c["auc"] is not None for c in metrics["per_class"].values())
    rows = [{"row": f"mean of {scored} classes", "kind": "mean", "auc": metrics["mean_auc"],
             "ci_low": metrics.get("mean_auc_ci_low"), "ci_high": metrics.get("mean_auc_ci_high"),
             "oracle_auc": metrics.get("oracle_mean_auc")}]
    for name, c in metrics["per_class"].items():
        rows.append({"row": name, "kind": "class", "auc": c["auc"], "ci_low": c["auc_ci_low"],
                     "ci_high": c["auc_ci_high"], "oracle_auc": c.get("oracle_auc")})
    for name, f in metrics.get("expert", {}).get("findings", {}).items():
        if f.get("auc") is not None:
            rows.append({"row": f"{name} (expert labels)", "kind": "expert labels", "auc": f["auc"],
                         "ci_low": f["auc_ci_low"], "ci_high": f["auc_ci_high"], "oracle_auc": None})
    frame = pd.DataFrame(rows, columns=["row", "kind", "auc", "ci_low", "ci_high", "oracle_auc"])
    frame.insert(0, "order", range(len(frame)))
    return frame


def headline_rows(metrics: dict) -> pd.DataFrame:
    """plots/evaluate/headline.csv: evaluate's lines of the page's headline table (calibrate adds its own)."""
    def f(v: float | None, digits: int = 4) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    rows = [("test mean ROC-AUC [95% CI]", f"{f(metrics['mean_auc'])} [{f(metrics.get('mean_auc_ci_low'))}, "
                                            f"{f(metrics.get('mean_auc_ci_high'))}]"),
            ("test images / patients", f"{metrics['images']:,} / {metrics['patients']:,}")]
    if "oracle_mean_auc" in metrics:
        rows.append(("oracle mean ROC-AUC (demo: its clean labels) / gap", f"{f(metrics['oracle_mean_auc'])} / "
                                                                           f"{f(metrics['gap_to_oracle'])}"))
    expert = {n: v["auc"] for n, v in metrics.get("expert", {}).get("findings", {}).items() if v.get("auc")}
    if expert:
        rows.append((f"ROC-AUC vs expert labels: {' / '.join(expert)}", " / ".join(f(v, 3) for v in expert.values())))
    return pd.DataFrame([(i, m, t) for i, (m, t) in enumerate(rows)], columns=["order", "metric", "text"])


def curves(pred: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ROC (TPR at fixed FPR) and PR (precision at fixed recall), one column per class with positives."""
    roc, pr = pd.DataFrame({"fpr": GRID}), pd.DataFrame({"recall": GRID})
    for name in CLASSES:
        y, p = pred[name].to_numpy(), pred[PROB_PREFIX + name].to_numpy()
        if has_both(y):
            roc[name], pr[name] = roc_on_grid(p, y, GRID).round(5), pr_on_grid(p, y, GRID).round(5)
    return roc, pr


def score_plot(pred: pd.DataFrame, path: Path) -> None:
    """Box + violin of test probabilities, negatives vs positives per class, on a logit axis (as the original
    recipe drew)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(16, 6))
    eps = 1e-4
    for k, name in enumerate(CLASSES):
        for offset, label, color in ((-0.2, 0, "tab:blue"), (0.2, 1, "tab:red")):
            values = pred.loc[pred[name] == label, PROB_PREFIX + name].clip(eps, 1 - eps).to_numpy()
            if len(values) > 1:
                parts = ax.violinplot(values, [k + offset], widths=0.35, showextrema=False)
                for body in parts["bodies"]:
                    body.set_facecolor(color), body.set_alpha(0.35)
                ax.boxplot(values, positions=[k + offset], widths=0.12, showfliers=False)
    ax.set_yscale("logit")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=35, ha="right")
    ax.set_ylabel("predicted probability (logit scale)")
    ax.set_title("Test scores: negatives (blue) vs positives (red)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)

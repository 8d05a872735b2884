"""Evaluate stage: one inference pass over val and test; honest test metrics with uncertainty.

The seed reported validation numbers only. Here the test split (NIH's official list) gets mean and
per-class ROC-AUC with patient-bootstrap 95% intervals, average precision and prevalence; on the demo
the clean labels give the oracle AUC (the best any model can score against the noisy labels).
Predictions are saved so calibrate re-runs in seconds without the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score

from stages.auc import auc_with_interval, patient_bootstrap_weights, pr_on_grid, roc_on_grid, weighted_auc
from stages.common import PipelineError, atomic_path, cpu_count, load_params, run_main, write_json
from stages.data import PreparedImages, make_loader, read_labels
from stages.engine import Batches, evaluate, pick_device
from stages.model import load_checkpoint
from stages.nih import CLASSES, parse_findings

PREPARED, SPLIT = Path("data/prepared"), Path("data/split")
OUT, PLOTS = Path("data/predictions"), Path("plots/evaluate")
GRID = np.linspace(0, 1, 101)


def predict_split(model, ckpt: dict, split: str, device: torch.device, batch_size: int) -> pd.DataFrame:
    """Labels and probabilities of one split, in split-table order (the predictions contract)."""
    table = pd.read_csv(SPLIT / f"{split}.csv")
    data = PreparedImages(PREPARED / f"{split}.npy", read_labels(SPLIT / f"{split}.csv"))
    if data[[0]][0].shape[-1] != ckpt["image_size"]:
        raise PipelineError(f"{PREPARED / split}.npy: images are not {ckpt['image_size']} px as the model was trained")
    result = evaluate(model, make_loader(data, batch_size, shuffle=False), torch.nn.BCEWithLogitsLoss(),
                      Batches(device))
    probs = pd.DataFrame(result["probs"], columns=[f"prob_{c}" for c in CLASSES])
    return pd.concat([table[["Image Index", "Patient ID", *CLASSES]], probs], axis=1)


def clean_labels(root: Path, names: pd.Series) -> np.ndarray | None:
    """The demo's clean labels for `names` (None on real data, which has none)."""
    path = root / "clean_labels.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path).set_index("Image Index")["Finding Labels"]
    return np.stack([parse_findings(table[n], f"{path} ({n})") for n in names])


def score_test(pred: pd.DataFrame, clean: np.ndarray | None, resamples: int, seed: int) -> dict:
    """metrics/evaluate.json: macro and per-class AUC with intervals, AP, prevalence, oracle."""
    weights = patient_bootstrap_weights(pred["Patient ID"].to_numpy(), resamples, seed)
    per_class, boot_aucs = {}, []
    for k, name in enumerate(CLASSES):
        y, p = pred[name].to_numpy(), pred[f"prob_{name}"].to_numpy()
        auc, low, high = auc_with_interval(p, y, weights)
        if auc is None:
            print(f"warning: {name} has no positives (or no negatives) in test; its metrics are null", file=sys.stderr)
        entry = {"auc": auc, "auc_ci_low": low, "auc_ci_high": high,
                 "average_precision": float(average_precision_score(y, p)) if y.any() else None,
                 "prevalence": float(y.mean()), "positives": int(y.sum())}
        if clean is not None:
            oracle = weighted_auc(clean[:, k].astype(float), y, np.ones((1, len(y))))[0]
            entry["oracle_auc"] = None if np.isnan(oracle) else float(oracle)
        per_class[name] = {key: round(v, 6) if isinstance(v, float) else v for key, v in entry.items()}
        boot_aucs.append(auc)
    defined = [a for a in boot_aucs if a is not None]
    out = {"mean_auc": round(float(np.mean(defined)), 6) if defined else None, "images": len(pred),
           "patients": int(pred["Patient ID"].nunique()), "bootstrap_resamples": resamples}
    if clean is not None:
        oracle = [v["oracle_auc"] for v in per_class.values() if v["oracle_auc"] is not None]
        out["oracle_mean_auc"] = round(float(np.mean(oracle)), 6)
        out["gap_to_oracle"] = round(out["oracle_mean_auc"] - out["mean_auc"], 6)
    out["per_class"] = per_class
    return out


def curves(pred: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ROC (TPR at fixed FPR) and PR (precision at fixed recall), one column per class with positives."""
    roc, pr = pd.DataFrame({"fpr": GRID}), pd.DataFrame({"recall": GRID})
    for name in CLASSES:
        y, p = pred[name].to_numpy(), pred[f"prob_{name}"].to_numpy()
        if 0 < y.sum() < len(y):
            roc[name], pr[name] = roc_on_grid(p, y, GRID).round(5), pr_on_grid(p, y, GRID).round(5)
    return roc, pr


def score_plot(pred: pd.DataFrame, path: Path) -> None:
    """Box + violin of test probabilities, negatives vs positives per class, on a logit axis (as the seed drew)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(16, 6))
    eps = 1e-4
    for k, name in enumerate(CLASSES):
        for offset, label, color in ((-0.2, 0, "tab:blue"), (0.2, 1, "tab:red")):
            values = pred.loc[pred[name] == label, f"prob_{name}"].clip(eps, 1 - eps).to_numpy()
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (sections data, evaluate)")
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"), help="train-stage checkpoint")
    args = parser.parse_args(argv)
    params = load_params(path=args.params)
    e = params.get("evaluate", {})
    resamples, seed, batch = e.get("bootstrap", 1000), e.get("seed", 0), e.get("batch_size", 128)
    if not isinstance(resamples, int) or resamples < 10:
        raise PipelineError(f"{args.params} evaluate.bootstrap: {resamples!r}; expected an integer >= 10")
    device = pick_device(params.get("train", {}).get("device", "auto"))
    torch.set_num_threads(cpu_count())
    model, ckpt = load_checkpoint(args.model, device)
    if list(ckpt["classes"]) != list(CLASSES):
        raise PipelineError(f"{args.model}: classes {ckpt['classes']} differ from this project's {list(CLASSES)}")
    preds = {split: predict_split(model, ckpt, split, device, batch) for split in ("val", "test")}
    for split, frame in preds.items():
        with atomic_path(OUT / f"{split}.csv") as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    test = preds["test"]
    metrics = score_test(test, clean_labels(Path(params["data"]["root"]), test["Image Index"]), resamples, seed)
    write_json("metrics/evaluate.json", metrics)
    roc, pr = curves(test)
    for name, frame in (("roc", roc), ("pr", pr)):
        with atomic_path(PLOTS / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
    score_plot(test, PLOTS / "scores.png")
    oracle = f" (oracle {metrics['oracle_mean_auc']:.4f})" if "oracle_mean_auc" in metrics else ""
    print(f"evaluate: test mean ROC-AUC {metrics['mean_auc']:.4f}{oracle} on {metrics['images']} images")


if __name__ == "__main__":
    run_main(main)

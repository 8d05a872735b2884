"""Evaluate stage: one inference pass over val and test; honest test metrics with uncertainty.

Writes data/predictions/{val,test}.csv (labels and prob_<Class> per image, so calibrate re-runs in
seconds without the model), metrics/evaluate.json (test AUC with patient-bootstrap intervals, AP,
prevalence, the demo's oracle) and plots/evaluate/ (ROC and PR curves, score distributions).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cxr14 import paths
from cxr14.common import cpu_count, cpu_kernels, run_main, write_csv, write_json
from cxr14.engine import pick_device
from cxr14.evaluation import clean_labels, curves, predict_split, score_plot, score_test
from cxr14.model import load_checkpoint
from cxr14.nih import CLASSES
from cxr14.params import PARAMS_FILE, Data, Evaluate, Train, load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (sections evaluate, data, train)")
    parser.add_argument("--model", type=Path, default=paths.MODEL, help="train-stage checkpoint")
    args = parser.parse_args(argv)
    e, data = load_section(args.params, Evaluate), load_section(args.params, Data)
    t = load_section(args.params, Train)
    device = pick_device(t.device, f"{args.params} train.device")
    torch.set_num_threads(cpu_count())
    cpu_kernels(t.cpu_kernels)  # the same kernels as training: predictions reproduce to the bit too
    model, ckpt = load_checkpoint(args.model, device, CLASSES)
    preds = {split: predict_split(model, ckpt, split, device, e.batch_size) for split in ("val", "test")}
    test = preds["test"]
    # Everything is computed before anything is written: a failure in scoring leaves the old outputs as they were.
    metrics = score_test(test, clean_labels(Path(data.root), test["Image Index"]), e.bootstrap, e.seed)
    plots = paths.PLOTS / "evaluate"
    roc, pr = curves(test)
    for split, frame in preds.items():
        write_csv(paths.PREDICTIONS / f"{split}.csv", frame, float_format="%.6g")
    write_json(paths.METRICS / "evaluate.json", metrics)
    write_csv(plots / "roc.csv", roc)
    write_csv(plots / "pr.csv", pr)
    score_plot(test, plots / "scores.png")
    oracle = f" (oracle {metrics['oracle_mean_auc']})" if "oracle_mean_auc" in metrics else ""
    print(f"evaluate: test mean ROC-AUC {metrics['mean_auc']}{oracle} on {metrics['images']} images")


if __name__ == "__main__":
    run_main(main)

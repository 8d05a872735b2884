"""Evaluate stage: one inference pass over val and test; honest test metrics with uncertainty.

Writes data/predictions/{val,test}.csv (labels, prob_<Class>, sex, age and view per image, and on test the
expert labels where adjudicated, so calibrate re-runs in seconds without the model), metrics/evaluate.json
(test AUC with patient-bootstrap intervals, AP, prevalence, the demo's oracle; against Google's expert labels
when the data root has them; per subgroup) and plots/evaluate/ (ROC and PR curves, score distributions,
AUC per subgroup).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from cxr14 import paths
from cxr14.data.nih import CLASSES
from cxr14.evaluation.expert import (
    EXPERT_FILES,
    expert_columns,
    expert_section,
    find_expert_file,
    read_expert_labels,
)
from cxr14.evaluation.predictions import PROB_PREFIX
from cxr14.evaluation.scoring import (
    clean_labels,
    curves,
    forest_rows,
    headline_rows,
    predict_split,
    score_plot,
    score_test,
)
from cxr14.evaluation.subgroups import auc_by_subgroup, plot_rows, summary
from cxr14.model.checkpoint import load_checkpoint
from cxr14.params import PARAMS_FILE, Data, Evaluate, Train, load_section
from cxr14.runtime.devices import cpu_count, cpu_kernels, pick_device
from cxr14.runtime.outputs import write_csv, write_json
from cxr14.runtime.signals import run_main


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
    root = Path(data.root)
    expert_file = find_expert_file(root)
    if expert_file is not None:
        test = preds["test"] = pd.concat([preds["test"], expert_columns(preds["test"]["Image Index"],
                                                                        read_expert_labels(expert_file))], axis=1)
    test = preds["test"]
    # Everything is computed before anything is written: a failure in scoring leaves the old outputs as they were.
    metrics = score_test(test, clean_labels(root, test["Image Index"]), e.bootstrap, e.seed)
    metrics["expert"] = expert_section(test, str(expert_file), e.bootstrap, e.seed) if expert_file else {
        "source": None, "note": f"no expert labels in {root}: expected {EXPERT_FILES[0]} (see README)"}
    labels = test[list(CLASSES)].to_numpy()
    probs = test[[PROB_PREFIX + c for c in CLASSES]].to_numpy()
    metrics["subgroups"] = auc_by_subgroup(test, labels, probs, e.bootstrap, e.seed, e.subgroup_min_images)
    plots = paths.PLOTS / "evaluate"
    roc, pr = curves(test)
    for split, frame in preds.items():
        write_csv(paths.PREDICTIONS / f"{split}.csv", frame, float_format="%.6g")
    write_json(paths.METRICS / "evaluate.json", metrics)
    write_csv(plots / "forest.csv", forest_rows(metrics))
    write_csv(plots / "headline.csv", headline_rows(metrics))
    write_csv(plots / "roc.csv", roc)
    write_csv(plots / "pr.csv", pr)
    write_csv(plots / "subgroups.csv", plot_rows(metrics["subgroups"], "mean_auc", "ci_low", "ci_high"))
    score_plot(test, plots / "scores.png")
    oracle = f" (oracle {metrics['oracle_mean_auc']})" if "oracle_mean_auc" in metrics else ""
    print(f"evaluate: test mean ROC-AUC {metrics['mean_auc']}{oracle} on {metrics['images']} images")
    if expert_file is not None:
        scored = {f: v["auc"] for f, v in metrics["expert"]["findings"].items() if "auc" in v}
        print(f"evaluate: against expert labels on {metrics['expert']['images']} test images: "
              + ", ".join(f"{f} AUC {v}" for f, v in scored.items()))
    print(f"evaluate: mean ROC-AUC per subgroup, worst-to-best gap: {summary(metrics['subgroups'])}")


if __name__ == "__main__":
    run_main(main)

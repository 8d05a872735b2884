"""Evaluate stage: one inference pass over val and test; honest test metrics with uncertainty.

Writes data/predictions/{val,test}.csv (labels, prob_<Class>, sex, age and view per image, and on test the
expert labels where adjudicated, so calibrate re-runs in seconds without the model), reports/evaluate.json
(test AUC with patient-bootstrap intervals, AP, prevalence, the demo's oracle, per class; against Google's
expert labels when the data root has them; per subgroup), metrics/evaluate.json (the headline figures of that
report, what `dvc exp show` compares) and plots/evaluate/ (ROC and PR curves, score distributions, AUC per
subgroup). metrics/evaluate.json also names the model scored (`model`: the first 8 hex digits of models/model.pt's
MD5) and the data it was scored on (`data`: the val and test split tables and arrays). Google's expert labels and
the demo's clean labels are NIH-layout files: an own-data table (`data.format: table`) has neither. With the
checkpoint's out-of-distribution fit, each image's score goes into the predictions (`ood_score`) and the share of
val and test flagged at its threshold into the report (`ood`), test's into the headline (`ood_flagged`).
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
    check_coverage,
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
    headline,
    headline_rows,
    ood_summary,
    predict_split,
    score_plot,
    score_test,
)
from cxr14.evaluation.subgroups import auc_by_subgroup, plot_rows, summary
from cxr14.model.checkpoint import load_checkpoint
from cxr14.params import PARAMS_FILE, Evaluate, load_params
from cxr14.runtime.devices import cpu_count, cpu_kernels, pick_device
from cxr14.runtime.outputs import file_digest, short_id, write_csv, write_json
from cxr14.runtime.signals import run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (sections evaluate, data, train)")
    parser.add_argument("--model", type=Path, default=paths.MODEL, help="train-stage checkpoint")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    evaluate, data, train = params.evaluate, params.data, params.train
    root = Path(data.root)
    expert_file = find_expert_file(root) if data.format == "nih" else None
    experts = read_expert_labels(expert_file) if expert_file is not None else None  # a bad file stops before inference
    device = pick_device(train.device, f"{args.params} train.device")
    torch.set_num_threads(cpu_count())
    cpu_kernels(train.cpu_kernels)  # the same kernels as training: predictions reproduce to the bit too
    model, ckpt = load_checkpoint(args.model, device, CLASSES)
    preds = {split: predict_split(model, ckpt, split, device, evaluate.batch_size) for split in ("val", "test")}
    if experts is not None:
        check_coverage(expert_file, preds["test"]["Image Index"], experts)
        preds["test"] = pd.concat([preds["test"], expert_columns(preds["test"]["Image Index"], experts)], axis=1)
    test = preds["test"]
    # Everything is computed before anything is written: a failure in scoring leaves the old outputs as they were.
    report = score(test, root, expert_file, evaluate, data.format)
    ood = ood_summary(preds, ckpt)
    if ood is not None:
        report["ood"] = ood
    roc, pr = curves(test)
    ids = {"model": short_id([file_digest(args.model)]),
           "data": short_id([file_digest(paths.PREPARED / f"{s}.npy") for s in ("val", "test")]
                            + [file_digest(paths.SPLIT / f"{s}.csv") for s in ("val", "test")])}
    report.update(ids)
    for split, frame in preds.items():
        write_csv(paths.PREDICTIONS / f"{split}.csv", frame, float_format="%.6g")
    write_json(paths.REPORTS / "evaluate.json", report)
    write_json(paths.METRICS / "evaluate.json", {**headline(report), **ids})
    plots = paths.PLOTS / "evaluate"
    write_csv(plots / "forest.csv", forest_rows(report))
    write_csv(plots / "headline.csv", headline_rows(report))
    write_csv(plots / "roc.csv", roc)
    write_csv(plots / "pr.csv", pr)
    write_csv(plots / "subgroups.csv", plot_rows(report["subgroups"], "mean_auc", "ci_low", "ci_high"))
    score_plot(test, plots / "scores.png")
    print_summary(report, expert_file is not None)


def score(test: pd.DataFrame, root: Path, expert_file: Path | None, evaluate: Evaluate, data_format: str = "nih"
          ) -> dict:
    """reports/evaluate.json: test AUC with intervals and the oracle, the expert-label section (or why there is
    none), and mean AUC per subgroup; the same patient resamples throughout (`evaluate.seed`)."""
    clean = clean_labels(root, test["Image Index"]) if data_format == "nih" else None
    report = score_test(test, clean, evaluate.bootstrap, evaluate.seed)
    note = (f"no expert labels in {root}: expected {EXPERT_FILES[0]} (see README)" if data_format == "nih"
            else "an own-data table (data.format: table): expert labels are NIH's")
    report["expert"] = (expert_section(test, str(expert_file), evaluate.bootstrap, evaluate.seed) if expert_file
                        else {"source": None, "note": note})
    labels = test[list(CLASSES)].to_numpy()
    probs = test[[PROB_PREFIX + c for c in CLASSES]].to_numpy()
    report["subgroups"] = auc_by_subgroup(test, labels, probs, evaluate.bootstrap, evaluate.seed,
                                          evaluate.subgroup_min_images)
    return report


def print_summary(report: dict, expert: bool) -> None:
    oracle = f" (oracle {report['oracle_mean_auc']})" if "oracle_mean_auc" in report else ""
    print(f"evaluate: test mean ROC-AUC {report['mean_auc']}{oracle} on {report['images']} images")
    if expert:
        scored = {f: v["auc"] for f, v in report["expert"]["findings"].items() if "auc" in v}
        print(f"evaluate: against expert labels on {report['expert']['images']} test images: "
              + ", ".join(f"{f} AUC {v}" for f, v in scored.items()))
    print(f"evaluate: mean ROC-AUC per subgroup, worst-to-best gap: {summary(report['subgroups'])}")
    if "ood" in report:
        o = report["ood"]
        print(f"evaluate: out of distribution at the val threshold {o['threshold']}: val {o['val']['flagged']:.1%}, "
              f"test {o['test']['flagged']:.1%} flagged")


if __name__ == "__main__":
    run_main(main)

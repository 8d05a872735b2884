"""Calibrate stage: per-class probability calibration and decision thresholds, fitted on val, measured on test.

Works only on the evaluate stage's saved predictions (no model, no torch), so a changed `calibrate`
parameter re-runs in seconds. Calibrators and thresholds are fitted on val; test only measures them,
which the original ChestX-ray14 ResNet50 recipe did not (it tuned and reported thresholds on the same val set).
Writes models/calibrator.json (for `predict`), models/thresholds.json (that recipe's schema),
reports/calibrate.json (ECE and Brier before/after, precision/recall/F1 at the val thresholds, per class and
macro; on test, per subgroup the underdiagnosis and false negative rates, and decisions against the expert
labels where evaluate had them), metrics/calibrate.json (test macro F1 and ECE before/after, the headline)
and reliability-diagram and subgroup data under plots/calibrate/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14 import paths
from cxr14.data.nih import CLASSES
from cxr14.evaluation.calibration import (
    apply_calibrator,
    check_classes,
    choose_threshold,
    fit_calibrator,
    headline,
    reliability_frame,
    split_metrics,
    thresholds_file,
)
from cxr14.evaluation.expert import decisions_section
from cxr14.evaluation.predictions import EXPERT_PREFIX, read_prediction_table
from cxr14.evaluation.subgroups import decisions_by_subgroup, plot_rows, summary
from cxr14.params import PARAMS_FILE, load_params
from cxr14.runtime.outputs import rounded, write_csv, write_json
from cxr14.runtime.signals import run_main

SPLITS = ("val", "test")
METRICS = paths.METRICS / "calibrate.json"


def headline_rows(report: dict) -> pd.DataFrame:
    """plots/calibrate/headline.csv: calibrate's lines of the page's headline table, after evaluate's."""
    macro = report["test"]["macro"]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    gaps = {a: report["subgroups"][a]["underdiagnosis_gap"]["gap"] for a in ("sex", "age", "view")}
    rows = [("macro F1 / precision / recall at the val thresholds (test)",
             f"{f(macro['f1'])} / {f(macro['precision'])} / {f(macro['recall'])}"),
            ("macro ECE before -> after calibration (test)", f"{f(macro['ece_before'])} -> {f(macro['ece_after'])}"),
            ("underdiagnosis gap by sex / age / view (test)", " / ".join(f(v) for v in gaps.values()))]
    return pd.DataFrame([(10 + i, m, x) for i, (m, x) in enumerate(rows)], columns=["order", "metric", "text"])



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (sections calibrate, evaluate)")
    parser.add_argument("--predictions", type=Path, default=paths.PREDICTIONS,
                        help="folder with the evaluate stage's val.csv and test.csv")
    parser.add_argument("--out-models", type=Path, default=paths.MODELS,
                        help="folder for thresholds.json and calibrator.json")
    parser.add_argument("--metrics", type=Path, default=METRICS, help="headline metrics file")
    parser.add_argument("--report", type=Path, help="report file, every figure (default: reports/calibrate.json, or "
                        "<metrics>.report.json beside a --metrics given elsewhere)")
    parser.add_argument("--plots", type=Path, default=paths.PLOTS / "calibrate", help="folder for reliability CSVs")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    calibrate, evaluate = params.calibrate, params.evaluate
    tables = {s: read_prediction_table(args.predictions / f"{s}.csv") for s in SPLITS}
    data = {s: (labels, probs) for s, (_, labels, probs) in tables.items()}
    table = tables["test"][0]  # with its subgroup and expert columns

    labels, raw = data["val"]
    check_classes(calibrate.method, labels, raw, data["test"][0])
    spec = fit_calibrator(calibrate.method, labels, raw)
    cal = {s: apply_calibrator(spec, data[s][1]) for s in SPLITS}
    thresholds = {n: choose_threshold(calibrate.policy, labels[:, j], cal["val"][:, j], calibrate.target_recall)
                  for j, n in enumerate(CLASSES)}

    write_json(args.out_models / "calibrator.json", spec)
    write_json(args.out_models / "thresholds.json",
               thresholds_file(thresholds, calibrate.policy, calibrate.method, data, cal))
    report = rounded({s: split_metrics(*data[s], cal[s], thresholds, calibrate.ece_bins) for s in SPLITS})
    called = np.stack([cal["test"][:, j] >= thresholds[n] if thresholds[n] is not None
                       else np.zeros(len(table), dtype=bool) for j, n in enumerate(CLASSES)], axis=1)
    report["subgroups"] = {"split": "test", **decisions_by_subgroup(table, data["test"][0], called,
                                                                    evaluate.subgroup_min_images)}
    if any(col.startswith(EXPERT_PREFIX) for col in table.columns):
        report["expert"] = {"split": "test", "findings": decisions_section(table, called)}
    write_json(paths.report_for(args.metrics, args.report), report)
    write_json(args.metrics, headline(report))
    write_csv(args.plots / "subgroups.csv", plot_rows(report["subgroups"], "underdiagnosis_rate"))
    write_csv(args.plots / "headline.csv", headline_rows(report))
    write_reliability(data, cal, calibrate.ece_bins, args.plots)
    test = report["test"]["macro"]
    print(f"calibrate: {calibrate.method} + {calibrate.policy}: test macro ECE {test['ece_before']} -> "
          f"{test['ece_after']}, F1 {test['f1']}, precision {test['precision']}, recall {test['recall']}")
    print(f"calibrate: underdiagnosis rate, worst-to-best gap: {summary(report['subgroups'], 'underdiagnosis_gap')}")


def write_reliability(data: dict, cal: dict, bins: int, plots: Path) -> None:
    """reliability_<split>.csv (every curve) and one file per pooled curve: DVC colours series by file."""
    for s in SPLITS:
        frame = reliability_frame(data[s][0], data[s][1], cal[s], bins)
        write_csv(plots / f"reliability_{s}.csv", frame, float_format="%.6f")
        for stage in ("before", "after"):
            pooled = frame[(frame["curve"] == "pooled") & (frame["stage"] == stage)]
            write_csv(plots / f"reliability_{s}_{stage}.csv", pooled.drop(columns=["curve", "stage"]),
                      float_format="%.6f")


if __name__ == "__main__":
    run_main(main)

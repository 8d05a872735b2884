"""Where the pipeline keeps its outputs, relative to the project root: named once, as `dvc.yaml` names them."""

from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "val", "test")
DEMO = Path("data/demo")
SPLIT = Path("data/split")  # <split>.csv: Image Index, Patient ID, path, one 0/1 column per class
PREPARED = Path("data/prepared")  # <split>.npy: uint8 (N, S, S)
PREDICTIONS = Path("data/predictions")  # val.csv, test.csv: labels and prob_<Class> per image
MODELS = Path("models")
MODEL = MODELS / "model.pt"  # best epoch
RESUME_POINT = MODELS / "resume" / "last.pt"  # train's latest epoch; not a DVC output: nothing restores it
ONNX = MODELS / "model.onnx"  # the export stage's: graph, calibrator and thresholds in one file
ONNX_INT8 = MODELS / "model.int8.onnx"  # the same, quantized to 8 bits: predict's default on a CPU
THRESHOLDS = MODELS / "thresholds.json"
CALIBRATOR = MODELS / "calibrator.json"
METRICS = Path("metrics")  # <stage>.json: the headline figures, what `dvc exp show` compares
REPORTS = Path("reports")  # <stage>.json: every figure behind them (per class, per subgroup, ...)
PLOTS = Path("plots")
DVCLIVE = Path("dvclive")


def report_for(metrics: Path, report: Path | None = None) -> Path:
    """Where a stage writes the breakdowns behind `metrics`: `report` if given; reports/<name> for the project's
    metrics/<name>; beside a metrics file given elsewhere (as <name>.report.json), so that a run writing its
    metrics outside the project never replaces the project's report."""
    if report is not None:
        return report
    return REPORTS / metrics.name if metrics == METRICS / metrics.name else metrics.with_suffix(".report.json")

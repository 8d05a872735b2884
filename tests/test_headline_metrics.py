"""The files dvc.yaml declares as metrics hold the headline figures only; every other figure is in reports/.

`dvc exp show` gives every number of the metrics files a column (beside every param and dep) and `dvc metrics
diff` a row, so per-class and per-subgroup tables there make experiments impossible to compare at a glance.
The breakdowns live in each stage's report, reports/<stage>.json (committed, not a metric), and the pages'
tables are generated from both by tools/update_readme.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxr14.data.nih import CLASSES
from cxr14.deployment.export import headline as export_headline
from cxr14.evaluation.calibration import headline as calibrate_headline
from cxr14.evaluation.scoring import headline as evaluate_headline
from cxr14.explanation.examples import headline as explain_headline
from stages import ood as ood_stage
from stages import split as split_stage

ROOT = Path(__file__).resolve().parents[1]
MAX_NUMBERS = 50  # over all metrics files: about 20 keep `dvc exp show --only-changed` within 200 columns


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def entries(stage: dict, kind: str) -> dict[str, dict]:
    """A stage's `outs` or `metrics` as {path: options}."""
    out = {}
    for item in stage.get(kind, []):
        path, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        out[path] = options
    return out


def metrics_files() -> dict[str, Path]:
    return {name: ROOT / path for name, stage in stages().items() for path in entries(stage, "metrics")}


def leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in leaves(v)]
    return [value]


def report(stage: str) -> dict:
    return json.loads((ROOT / "reports" / f"{stage}.json").read_text())


def metrics(stage: str) -> dict:
    return json.loads((ROOT / "metrics" / f"{stage}.json").read_text())


def test_metrics_files_hold_a_few_flat_numbers() -> None:
    """What `dvc metrics show` lists: at most MAX_NUMBERS numbers in all, each under a flat key (one column each)."""
    counts = {}
    for name, path in metrics_files().items():
        values = json.loads(path.read_text())
        nested = [k for k, v in values.items() if isinstance(v, (dict, list))]
        assert not nested, f"{path.relative_to(ROOT)}: nested keys {nested}; expected flat headline figures"
        counts[name] = sum(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values())
    assert set(counts) == {"split", "train", "evaluate", "calibrate", "export", "explain", "ood"}
    assert sum(counts.values()) <= MAX_NUMBERS, counts


def test_each_metrics_file_has_a_report_output_beside_it() -> None:
    """reports/<stage>.json: committed with the code (cache: false), kept when a stage stops (persist), and not a
    metric, so its hundreds of numbers stay out of `dvc exp show`."""
    for name, stage in stages().items():
        declared = entries(stage, "metrics")
        if not declared:
            continue
        assert list(declared) == [f"metrics/{name}.json"]
        options = entries(stage, "outs").get(f"reports/{name}.json")
        assert options is not None, f"dvc.yaml stage {name}: no reports/{name}.json under outs"
        assert options.get("cache") is False and options.get("persist") is True
    assert not [p for p in metrics_files().values() if p.parent.name == "reports"]


def test_committed_headlines_are_picked_from_the_committed_reports() -> None:
    ids = ("model", "data")  # which model was scored, on what data: in the report and the headline alike
    evaluate = report("evaluate")
    assert metrics("evaluate") == evaluate_headline(evaluate) | {k: evaluate[k] for k in ids}
    assert metrics("calibrate") == calibrate_headline(report("calibrate"))
    assert metrics("explain") == explain_headline(report("explain"))
    assert metrics("export") == export_headline(report("export"))
    assert metrics("split") == split_stage.headline(report("split"))
    assert metrics("ood") == ood_stage.headline(report("ood"))
    train = report("train")
    assert metrics("train") == {"val_auc": train["best_val_mean_auc"], "best_epoch": train["best_epoch"],
                                "epochs_run": train["epochs_run"], **{k: train[k] for k in ids}}


def test_reports_hold_the_breakdowns() -> None:
    evaluate = report("evaluate")
    assert list(evaluate["per_class"]) == list(CLASSES)
    assert {"auc", "auc_ci_low", "auc_ci_high", "average_precision"} <= set(evaluate["per_class"]["Hernia"])
    assert {a: set(evaluate["subgroups"][a]["groups"]) for a in ("sex", "age", "view")} == {
        "sex": {"F", "M"}, "age": {"0-20", "20-40", "40-60", "60-80", "80+"}, "view": {"PA", "AP"}}
    assert "Pneumothorax" in evaluate["expert"]["findings"]
    calibrate = report("calibrate")
    for split in ("val", "test"):
        assert list(calibrate[split]) == ["macro", *CLASSES]
    assert set(calibrate["subgroups"]["sex"]["groups"]["F"]["false_negative_rate"]) == set(CLASSES)
    assert "against_expert" in calibrate["expert"]["findings"]["Pneumothorax"]
    explain = report("explain")
    assert set(explain["per_class"]) <= set(CLASSES) and explain["per_class"]
    assert list(explain["sanity"]["per_class"]) and "deletion_area_gradcam" in explain["sanity"]["overall"]
    split = report("split")
    assert all(set(split[s]["positives"]) == set(CLASSES) for s in ("train", "val", "test"))
    export = report("export")
    assert {"val", "test"} <= set(export["int8"]) and "largest_class_auc_drop" in export["int8"]["test"]
    assert {"seconds", "images_per_second"} <= set(report("train"))  # timings: in the report, not a metric


def test_evaluate_headline_leaves_out_what_a_run_has_not() -> None:
    """Real data has no oracle; without expert labels, or with a subgroup too small to measure, those go too."""
    base = {"mean_auc": 0.8, "mean_auc_ci_low": 0.7, "mean_auc_ci_high": 0.9, "images": 10, "per_class": {}}
    assert evaluate_headline({**base, "expert": {"source": None}, "subgroups": {"min_images": 50}}) == {
        "auc": 0.8, "auc_low": 0.7, "auc_high": 0.9}
    findings = {"A": {"auc": 0.9}, "B": {"auc": 0.7}, "C": {"auc": None}, "D": {"note": "no NIH class"}}
    subgroups = {"min_images": 50, "sex": {"gap": 0.01}, "age": {"gap": None}, "view": {"gap": 0.03}}
    picked = evaluate_headline({**base, "expert": {"findings": findings}, "subgroups": subgroups})
    assert picked["expert"] == 0.8 and picked["group_gap"] == 0.03


def test_export_headline_drop_is_float32_minus_int8_on_val() -> None:
    def run(mean_auc: float | None, float32: float | None) -> dict:
        return export_headline({"max_abs_difference": 1e-6, "int8": {"val": {"mean_auc": mean_auc,
                                                                             "mean_auc_float32": float32}}})

    assert run(0.95, 0.96) == {"int8_drop": 0.01}
    assert run(None, None)["int8_drop"] is None


# ---------------------------------------------------------------- tools/update_readme.py on README and docs pages


def update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "tools" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with the committed metrics and reports, a README and one docs page with markers."""
    for folder in ("metrics", "reports"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n<!-- results:headline -->\n| old |\n\ntext\n")
    (tmp_path / "docs" / "results.md").write_text("<!-- results:subgroups -->\n<!-- results:expert -->\n| stale |\n")
    return tmp_path


def run_tool(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "update_readme.py"), "--root", str(root), *args],
                          capture_output=True, text=True)


def test_update_readme_fills_markers_on_every_page(project: Path) -> None:
    assert run_tool(project, "--check").returncode == 1
    assert run_tool(project).returncode == 0
    assert run_tool(project, "--check").returncode == 0
    readme, page = (project / "README.md").read_text(), (project / "docs" / "results.md").read_text()
    headline = metrics("evaluate")
    assert f"| mean ROC-AUC [95% CI] | {headline['auc']:.4f} [{headline['auc_low']:.4f}, " in readme
    assert f"{metrics('calibrate')['ece_before']:.3f} -> {metrics('calibrate')['ece_after']:.3f}" in readme
    assert readme.endswith("|\n\ntext\n") and "| old |" not in readme
    assert "| sex: F | 184 |" in page and "| Pneumothorax | Pneumothorax |" in page and "| stale |" not in page
    assert page.index("results:subgroups") < page.index("sex: F") < page.index("results:expert")
    (project / "reports" / "evaluate.json").write_text(json.dumps(report("evaluate") | {
        "subgroups": {**report("evaluate")["subgroups"], "sex": {**report("evaluate")["subgroups"]["sex"],
                                                                "gap": 0.5}}}))
    result = run_tool(project, "--check")  # a report changed under a docs page's table
    assert result.returncode == 1 and str(project / "docs" / "results.md") in result.stdout


def test_update_readme_refuses_a_marker_it_has_no_table_for(project: Path) -> None:
    (project / "docs" / "results.md").write_text("<!-- results:nonsense -->\n")
    result = run_tool(project)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"{project / 'docs' / 'results.md'}: marker '<!-- results:nonsense -->' names no "
                                      f"table; expected one of {', '.join(update_readme().TABLES)}")

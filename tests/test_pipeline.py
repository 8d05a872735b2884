"""End to end: the whole DAG through `dvc repro` on a tiny configuration, in a scratch copy of the repo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY_DVC, breakdown, copy_project, dvc, metrics, run

from cxr14.data.nih import CLASSES

# xdist: every module on the reproduced project is in this group, so one worker builds it once for all of them
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc_project")]


@pytest.fixture(scope="module")
def project(reproduced_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's reproduced tiny project (conftest.TINY_DVC), copied: this module's later tests change it."""
    return copy_project(reproduced_project, tmp_path_factory.mktemp("pipeline") / "project")


def test_repro_builds_every_output(project: Path) -> None:
    split = breakdown(project, "split")
    total = sum(split[s]["images"] for s in ("train", "val", "test"))
    assert total == TINY_DVC["demo"]["images"]
    assert split["missing_images"] == 0
    for name in ("train", "val", "test"):
        table = pd.read_csv(project / f"data/split/{name}.csv")
        array = np.load(project / f"data/prepared/{name}.npy", mmap_mode="r")
        size = TINY_DVC["prepare"]["image_size"]
        assert array.shape == (len(table), size, size) and array.dtype == np.uint8
        assert len(table) == split[name]["images"] > 0
        assert array.std() > 0  # real pixels, not an empty buffer
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"demo", "split", "prepare", "train", "evaluate", "calibrate", "explain", "export",
                                   "ood"}
    ood = breakdown(project, "ood")  # every generated variant at TINY_DVC's size, scored against the test images
    assert ood["variants"]["noise"]["images"] == TINY_DVC["ood"]["images"] == ood["sets"]["photographs"]["images"]
    assert ood["test"]["images"] == split["test"]["images"] and set(metrics(project, "ood")) >= {"test_flagged"}
    evaluate = evaluated = breakdown(project, "evaluate")
    assert metrics(project, "evaluate")["auc"] == evaluate["mean_auc"]  # the headline, picked from the report
    assert evaluate["images"] == split["test"]["images"] and "oracle_mean_auc" in evaluate
    experts = evaluated["expert"]["findings"]  # the demo's expert-label file, found in the data root
    assert 0 < experts["Pneumothorax"]["images"] == evaluated["expert"]["images"] < evaluate["images"]
    assert set(evaluated["subgroups"]) == {"min_images", "sex", "age", "view"}
    calibrated = breakdown(project, "calibrate")
    assert set(calibrated["expert"]["findings"]) == set(experts) and set(calibrated["subgroups"]) >= {"sex", "age"}
    thresholds = json.loads((project / "models/thresholds.json").read_text())
    assert set(thresholds) >= {"metadata", "thresholds", "metrics", "test_metrics"}
    assert thresholds["metadata"]["num_classes"] == 14
    train = metrics(project, "train")
    assert train["epochs_run"] == TINY_DVC["train"]["epochs"] and 0 <= train["val_auc"] <= 1
    assert (project / "models/model.pt").is_file() and (project / "dvclive/plots/metrics/val/mean_auc.tsv").is_file()
    explain = explained = breakdown(project, "explain")
    boxes = pd.read_csv(project / "data/demo/BBox_List_2017.csv")
    assert explain["overall"]["boxes"] == len(boxes) > 0  # every planted finding of the test images is scored
    assert 0 <= explain["overall"]["pointing_game"] <= 1 and explain["layer"] == "layer4"
    for scores in [explain["overall"], *explained["per_class"].values()]:  # no heatmap beats its own ceiling
        assert scores["pointing_game"] <= scores["pointing_game_ceiling"] <= 1
    overlays = sorted((project / "plots/gradcam").glob("*/*.png"))
    assert len(overlays) == sum(explained["examples"].values()) > 0
    assert all(p.parent.name in CLASSES for p in overlays)
    export = breakdown(project, "export")
    assert export["images"] == split["test"]["images"] and 0 <= export["max_abs_difference"] <= 1e-4
    assert export["file_bytes"] == (project / "models/model.onnx").stat().st_size > 1_000_000
    assert export["int8"]["file_bytes"] == (project / "models/model.int8.onnx").stat().st_size
    assert export["int8"]["test"]["decisions"] > 0 and export["int8"]["test"]["max_abs_difference_to_float32"] < 0.2
    assert export["int8"]["val"]["images"] == split["val"]["images"]


def test_predict_with_the_exported_model_agrees_with_evaluate(project: Path) -> None:
    """The ONNX engine (no torch) in float32 on the demo's test PNGs gives evaluate's probabilities (both on the
    CPU, decoded the same way) and the calibrated decisions calibrate's thresholds make; the int8 model comes
    close, and is the default unless export found it lossy."""
    table = pd.read_csv(project / "data/split/test.csv").head(12)
    files = [str(Path(p) if Path(p).is_absolute() else project / p) for p in table["path"]]
    out = project / "predict.csv"
    from cxr14.deployment.predict import int8_is_fast

    within = breakdown(project, "export")["int8"]["within_limit"]
    result = run([sys.executable, "-m", "stages.predict", *files, "--csv", str(out)], project)
    # one epoch on tiny data may lose AUC in int8 (then float32), and a CPU without VNNI runs float32
    default = "models/model.int8.onnx" if within is not False and int8_is_fast() else "models/model.onnx"
    assert f"predict (onnx, {default}): 12 image(s) x 14 classes" in result.stderr
    assert ("note: models/model.int8.onnx scored more" in result.stderr) == (within is False and int8_is_fast())
    run([sys.executable, "-m", "stages.predict", *files, "--csv", str(out), "--precision", "int8"], project)
    int8 = pd.read_csv(out, keep_default_na=False, na_values=[""])
    result = run([sys.executable, "-m", "stages.predict", *files, "--csv", str(out), "--precision", "fp32"], project)
    assert "predict (onnx, models/model.onnx): 12 image(s) x 14 classes" in result.stderr
    rows = pd.read_csv(out, keep_default_na=False, na_values=[""])  # "n/a" decisions stay strings
    assert 0 < (int8["probability"] - rows["probability"]).abs().max() < 0.2
    assert len(rows) == 12 * len(CLASSES) and list(rows["class"][:14]) == list(CLASSES)
    expected = pd.read_csv(project / "data/predictions/test.csv").set_index("Image Index")
    got = rows.pivot(index="image", columns="class", values="probability")
    calibrated = rows.pivot(index="image", columns="class", values="calibrated")
    from cxr14.evaluation.calibration import apply_calibrator, load_calibrator

    spec = load_calibrator(project / "models/calibrator.json")  # calibrate's own file, not the embedded copy
    for f, name in zip(files, table["Image Index"], strict=True):
        raw = np.array([expected.loc[name, f"prob_{c}"] for c in CLASSES])
        cal = apply_calibrator(spec, raw)
        for k, c in enumerate(CLASSES):
            assert abs(got.loc[f, c] - raw[k]) < 1e-4, (name, c)
            assert abs(calibrated.loc[f, c] - cal[k]) < 1e-3, (name, c)  # Platt's slope amplifies rounding a little
    thresholds = json.loads((project / "models/thresholds.json").read_text())["thresholds"]
    for _, r in rows.iterrows():
        t = thresholds[r["class"]]
        assert r["decision"] == ("n/a" if t is None else "POS" if r["calibrated"] >= t else "NEG")


def test_plots_page_renders_the_custom_templates(project: Path) -> None:
    """`dvc plots show` through plots/templates/: the forest plot has a row per class and the mean in a fixed
    order with their intervals, the curves are coloured by class and dashed by revision, and the 14 per-class
    val AUC files make one chart."""
    out = dvc("plots", "show", "--json", cwd=project).stdout
    data = json.loads(out)["data"]
    specs = {title: entries[0]["content"] for title, entries in data.items()
             if entries and entries[0]["type"] == "vega"}
    empty = [t for t, entries in data.items() if not entries and not t.startswith("plots/")]
    assert all("subgroup" in t for t in empty), empty  # the tiny demo's subgroups are all too small to plot
    titles = list(specs)
    assert titles[0].startswith("Headline figures") and titles[1].startswith("Test ROC-AUC per class and their mean")
    assert titles[2].startswith("Test ROC curves") and titles[-1].startswith("Training, loss")
    headline = [r["metric"] for r in sorted(specs[titles[0]]["data"]["values"], key=lambda r: int(r["order"]))]
    assert headline[0] == "test mean ROC-AUC [95% CI]" and headline[-1].startswith("underdiagnosis gap")  # both files
    forest = specs[titles[1]]
    rows = forest["data"]["values"]
    evaluate = breakdown(project, "evaluate")
    assert [r["row"] for r in rows][:15] == ["mean of 14 classes", *CLASSES]
    assert float(rows[0]["auc"]) == evaluate["mean_auc"]
    assert float(rows[0]["ci_low"]) <= evaluate["mean_auc"] <= float(rows[0]["ci_high"])
    per_class = breakdown(project, "evaluate")["per_class"]
    for r, name in zip(rows[1:15], CLASSES, strict=True):
        assert float(r["auc"]) == per_class[name]["auc"] and float(r["oracle_auc"]) > 0
    assert forest["encoding"]["yOffset"]["field"] == "rev" and forest["encoding"]["color"]["field"] == "rev"
    roc = specs["Test ROC curves, one colour per class (TPR at each FPR)"]
    assert roc["encoding"]["color"]["field"] == "field" and roc["encoding"]["strokeDash"]["field"] == "rev"
    assert {r["field"] for r in roc["data"]["values"]} == {c for c in CLASSES if c in pd.read_csv(
        project / "plots/evaluate/roc.csv").columns}
    val = specs["Training, val ROC-AUC per class per epoch"]
    logged = {p.stem for p in (project / "dvclive/plots/metrics/val/auc").glob("*.tsv")}  # classes val defines
    assert {r["field"] for r in val["data"]["values"]} == logged and len(logged) > 5  # one chart, every class
    assert not [t for t in titles if t.startswith("dvclive/plots/metrics/val/auc/")]  # no longer 14 charts


def test_compare_the_baseline_and_an_experiment_that_differ_only_in_train_seed(project: Path) -> None:
    """Before the params change below: HEAD is the reproduced baseline (train.seed 0), and one experiment (one
    more training) differs from it in the seed alone."""
    # compare reads evaluate's test predictions: the stages after it add nothing
    dvc("exp", "run", "-q", "-S", "train.seed=1", "-n", "seed-1", "evaluate", cwd=project)
    out = json.loads(run([sys.executable, "-m", "stages.compare", "HEAD", "seed-1", "--json", "--bootstrap", "200"],
                         project).stdout)
    test = pd.read_csv(project / "data/predictions/test.csv")
    # the workspace back to HEAD for the tests below (the experiment left calibrate, explain and export behind)
    run(["git", "checkout", "--", "."], project)
    dvc("checkout", "--force", cwd=project)
    assert out["images"] == len(test) and out["a"] == "HEAD" and out["b"] == "seed-1"
    assert out["difference"] != 0  # two trainings, two models
    assert out["ci_low"] < 0 < out["ci_high"]  # but nothing this test split can tell apart


def test_second_repro_runs_nothing(project: Path) -> None:
    out = dvc("repro", cwd=project).stdout
    assert "didn't change, skipping" in out
    assert "Running stage" not in out


def test_param_change_reruns_only_downstream(project: Path) -> None:
    """A param that is no stage's dependency runs nothing; evaluate.subgroup_min_images, read by evaluate and
    calibrate, runs those two and no stage before them; explain and export, which read evaluate's predictions
    (unchanged), are skipped. A train param re-running train and evaluate is shown above, by
    test_compare_the_baseline_and_an_experiment_that_differ_only_in_train_seed."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["workers"] = 1  # not a dependency: nothing to do
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage" not in dvc("repro", cwd=project).stdout
    params["evaluate"]["subgroup_min_images"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc("repro", cwd=project).stdout
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == ["calibrate", "evaluate"], out
    assert breakdown(project, "evaluate")["subgroups"]["min_images"] == 5

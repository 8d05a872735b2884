"""Bad artifacts and inputs: one line naming the file, the class or value, exit 1, no traceback, nothing lost.

Issue 11's catalogue, with the params-file cases of the design pass (tests/test_params.py has the schema's
own): thresholds, calibrators, prepared arrays, checkpoints, box lists, params files, unreadable inputs,
a real full disk (a tmpfs in a user namespace), a killed prepare. The faults that need a whole git + DVC
project (a killed `dvc exp run` resumed, random kills, two `dvc repro` at once, a resume on another
split) are in tests/test_faults_dvc.py; a kill before each write of the train stage is in tests/test_train.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    REPO,
    TinyNIH,
    child_env,
    launch,
    project_params,
    run,
    stage_main,
    stage_result,
    tiny_demo,
    write_params,
)
from PIL import Image

from cxr14 import cli
from cxr14.data.loader import PreparedImages
from cxr14.data.nih import CLASSES
from cxr14.model.checkpoint import save_checkpoint
from cxr14.model.factory import build_model
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.signals import run_main


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A tiny model, thresholds fitted on platt-calibrated probabilities, its calibrator, two images."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", {"state_dict": build_model("resnet18", "none").state_dict(),
                                            "arch": "resnet18", "classes": list(CLASSES), "image_size": 32,
                                            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    write_thresholds(tmp_path, dict.fromkeys(CLASSES, 0.5))
    platt = {"method": "platt", "split": "val", "params": {c: [1.0, 0.0] for c in CLASSES}}
    (tmp_path / "calibrator.json").write_text(json.dumps(platt))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((40, 40), 100 if folder == "a" else 200, np.uint8)).save(tmp_path / folder / "x.png")
    project_params(tmp_path / "params.yaml", {"train": {"device": "cpu"}})
    return tmp_path


def write_thresholds(folder: Path, thresholds: dict, calibration: str = "platt") -> None:
    (folder / "thresholds.json").write_text(json.dumps({"metadata": {"calibration": calibration},
                                                        "thresholds": thresholds}))


def run_predict(files: Path, capsys: pytest.CaptureFixture, *extra: str, images: tuple[str, ...] = ("a/x.png",)
                ) -> tuple[int, str]:
    args = [*(str(files / i) for i in images), "--model", str(files / "model.pt"),
            "--thresholds", str(files / "thresholds.json"), "--calibrator", str(files / "calibrator.json"),
            "--params", str(files / "params.yaml"), "--json", *extra]
    code = 0
    try:
        cli.predict_main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip()


@pytest.mark.parametrize(("change", "message"), [
    ({"Mass": float("nan")}, "class Mass: threshold nan; expected a number in [0, 1] or null"),
    ({"Mass": 7}, "class Mass: threshold 7; expected a number in [0, 1] or null"),
    ({"Mass": "0.5"}, "class Mass: threshold '0.5'; expected a number in [0, 1] or null"),
    ({"Mass": [0.5]}, "class Mass: threshold [0.5]; expected a number in [0, 1] or null"),
    ({"Mass": None, "Hernia": True}, "class Hernia: threshold True; expected a number in [0, 1] or null"),
])
def test_bad_thresholds_are_one_line_naming_file_and_class(files: Path, capsys, change: dict, message: str) -> None:
    write_thresholds(files, {**dict.fromkeys(CLASSES, 0.5), **change})
    code, err = run_predict(files, capsys)
    assert code == 1 and err == f"error: {files / 'thresholds.json'}: {message}"


def test_a_missing_class_threshold_is_named(files: Path, capsys) -> None:
    write_thresholds(files, {c: 0.5 for c in CLASSES if c != "Edema"})
    code, err = run_predict(files, capsys)
    assert code == 1 and err.startswith(f"error: {files / 'thresholds.json'}: no threshold for class Edema")


@pytest.mark.parametrize("params", [
    {"method": "platt", "params": {"Mass": [float("nan"), 0.0]}},
    {"method": "isotonic", "params": {"Mass": {"x": [0.0, "a"], "y": [0.0, 1.0]}}},
    {"method": "isotonic", "params": {"Mass": {"x": [0.0, 1.0], "y": [0.0, 7.0]}}},
    {"method": "isotonic", "params": {"Mass": {"x": [1.0, 0.0], "y": [0.0, 1.0]}}},
    {"method": "temperature", "params": {"Mass": float("inf")}},
])
def test_bad_calibrator_parameters_are_named(files: Path, capsys, params: dict) -> None:
    spec = {"method": params["method"], "split": "val",
            "params": {**dict.fromkeys(CLASSES), **params["params"]}}
    (files / "calibrator.json").write_text(json.dumps(spec))
    write_thresholds(files, dict.fromkeys(CLASSES, 0.5), calibration=params["method"])
    code, err = run_predict(files, capsys)
    assert code == 1 and err.startswith(f"error: {files / 'calibrator.json'}: class Mass: ")


def test_thresholds_for_calibrated_probabilities_need_their_calibrator(files: Path, capsys) -> None:
    """Without calibrator.json, raw probabilities would meet thresholds chosen on calibrated ones: refused."""
    (files / "calibrator.json").unlink()
    code, err = run_predict(files, capsys)
    assert code == 1
    assert err == (f"error: {files / 'thresholds.json'}: these thresholds apply to platt-calibrated probabilities, "
                   f"but {files / 'calibrator.json'} was not found; use the calibrate stage's calibrator.json from "
                   "the same run")
    write_thresholds(files, dict.fromkeys(CLASSES, 0.5), calibration="none")  # thresholds on raw probabilities
    assert run_predict(files, capsys)[0] == 0


def test_gradcam_into_a_file_is_refused_and_same_names_do_not_overwrite(files: Path, capsys) -> None:
    (files / "taken").write_text("mine")
    code, err = run_predict(files, capsys, "--gradcam", str(files / "taken"))
    assert code == 1 and err == f"error: --gradcam {files / 'taken'}: is a file; expected a folder for the heatmaps"
    assert (files / "taken").read_text() == "mine"
    out = files / "cam"
    code, _ = run_predict(files, capsys, "--gradcam", str(out), images=("a/x.png", "b/x.png"))
    assert code == 0
    made = sorted(p.name for p in out.iterdir())
    assert {n.split("_x_")[0] for n in made} == {"1", "2"}  # one set of overlays per input, none overwritten
    assert len([n for n in made if n.startswith("1_")]) == len([n for n in made if n.startswith("2_")])


def test_prepared_arrays_must_be_uint8_and_not_empty(tmp_path: Path) -> None:
    np.save(tmp_path / "float.npy", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(PipelineError, match=r"float.npy: float32 pixels; expected uint8 from the prepare stage"):
        PreparedImages(tmp_path / "float.npy")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(PipelineError, match=r"empty.npy: cannot open prepared array .*run the prepare stage"):
        PreparedImages(tmp_path / "empty.npy")


def test_os_errors_are_one_line_with_the_file(capsys) -> None:
    def full_disk(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "models/.last.pt.tmp")

    with pytest.raises(SystemExit) as exit_info:
        run_main(full_disk, [])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: models/.last.pt.tmp: No space left on device; free some space "
                                               "and re-run")


def test_explain_refuses_arrays_of_another_size_than_the_model(files: Path, tmp_path: Path, monkeypatch) -> None:
    """The localisation metrics would silently change with the map's size: one line instead."""
    from stages import explain

    monkeypatch.chdir(tmp_path)
    for folder in ("models", "data/split", "data/predictions", "data/prepared"):
        Path(folder).mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "thresholds.json", "calibrator.json"):
        (files / name).rename(Path("models") / name)
    names = ["00000001_000.png", "00000002_000.png"]
    pd.DataFrame({"Image Index": names, "Patient ID": [1, 2], "path": names,
                  **{c: [1, 0] for c in CLASSES}}).to_csv("data/split/test.csv", index=False)
    pd.DataFrame({"Image Index": names, "Patient ID": [1, 2], **{c: [1, 0] for c in CLASSES},
                  **{f"prob_{c}": [0.7, 0.2] for c in CLASSES}}).to_csv("data/predictions/test.csv", index=False)
    np.save("data/prepared/test.npy", np.zeros((2, 48, 48), np.uint8))  # the model was trained at 32 px
    before = sorted(str(p) for p in Path(".").rglob("*"))
    with pytest.raises(PipelineError, match=r"data/prepared/test.npy: images are 48 px, not 32 px as "
                                            r"models/model.pt was trained; run dvc repro"):
        explain.main(["--params", str(files / "params.yaml")])
    assert sorted(str(p) for p in Path(".").rglob("*")) == before  # nothing written


def test_leftovers_of_a_killed_write_are_removed_by_the_next(tmp_path: Path) -> None:
    from cxr14.runtime.outputs import replace_dir, write_json

    (tmp_path / ".m.json.k1l2.tmp").write_bytes(b"half a file")
    (tmp_path / ".plots.x9.tmp").mkdir()
    (tmp_path / ".plots.x9.tmp" / "a.png").write_bytes(b"half")
    (tmp_path / ".plots.y8.old").mkdir()
    (tmp_path / ".other.json.k1l2.tmp").write_bytes(b"someone else's")
    write_json(tmp_path / "m.json", {"a": 1})
    with replace_dir(tmp_path / "plots") as folder:
        (folder / "b.png").write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.k1l2.tmp", "m.json", "plots"]


WORKER_THAT_FAILS_TO_START = """
import sys
from cxr14.runtime.processes import process_context


def fail():
    raise {error}("what the worker was to use is gone")


class Breaks:
    def __reduce__(self):  # unpickled in the new worker, before any of its code runs
        return fail, ()


if __name__ == "__main__":
    worker = process_context([]).Process(target=print, args=(Breaks(),))
    worker.start()
    worker.join(60)
    sys.exit(0 if worker.exitcode != 0 else 3)
"""


@pytest.mark.parametrize(("error", "printed"), [("FileNotFoundError", ""),
                                                ("ValueError", "a worker process did not start: ValueError: what "
                                                               "the worker was to use is gone\n")])
def test_a_worker_that_cannot_start_says_so_in_one_line_or_not_at_all(tmp_path: Path, error: str,
                                                                      printed: str) -> None:
    """A fork-server worker whose start fails: its stage stopping on SIGTERM or Ctrl-C let go of its queues
    (an OSError: nothing to say, the stage says it stopped), else one line; never multiprocessing's traceback."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_THAT_FAILS_TO_START.format(error=error))
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stderr == printed


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_process_and_its_next_run_no_file(nih_sample_split) -> None:
    """SIGKILL the prepare stage while its workers decode: they end with it, and a re-run leaves no temporaries."""
    import signal
    import time

    import psutil

    assert nih_sample_split["result"].returncode == 0, nih_sample_split["result"].stderr
    out = nih_sample_split["work"] / "killed"
    cmd = [sys.executable, "-m", "stages.prepare", "--params", str(nih_sample_split["params"]),
           "--split-dir", str(nih_sample_split["out"]), "--out", str(out)]
    proc = launch(cmd, REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    deadline = time.monotonic() + 120
    while len(children) < 3 and proc.poll() is None and time.monotonic() < deadline:  # fork server + 2 workers
        children = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.05)
    assert proc.poll() is None and len(children) >= 3, "prepare ended before its workers could be seen"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"processes left after the kill: {alive}"
    run(cmd, REPO)
    assert sorted(p.name for p in out.iterdir()) == ["test.npy", "train.npy", "val.npy"]


@pytest.mark.parametrize(("stage", "write", "message"), [
    ("split", lambda p: project_params(p, {"data": {"root": 5}}), "data.root: 5; expected a folder in NIH layout"),
    ("split", lambda p: project_params(p, {"data": {"root": None}}), "data.root: None; expected a folder"),
    ("train", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary"), "params.yaml: "),
    ("prepare", lambda p: p.write_text("- a\n- list\n"), "params.yaml: expected a mapping of sections, got list"),
    ("evaluate", lambda p: p.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(
        (REPO / "params.yaml").read_text()).items() if k != "data"})), "params.yaml: missing section 'data'"),
    ("train", lambda p: project_params(p, {"train": {"pos_weight_cap": -1}}), "train.pos_weight_cap: -1; expected"),
    ("train", lambda p: project_params(p, {"train": {"augment": {"crop_scale": [1.5, 0.5]}}}),
     "train.augment.crop_scale: [1.5, 0.5]; expected"),
])
def test_bad_params_files_are_one_line_before_any_work(tmp_path: Path, stage: str, write, message: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Cases of issue 11's probe that were tracebacks or silently accepted: one line, exit 1, nothing written."""
    params = tmp_path / "params.yaml"
    write(params)
    before = sorted(tmp_path.iterdir())
    code, lines = stage_result(stage_main(stage), ["--params", params], capsys)
    assert code == 1 and len(lines) == 1 and message in lines[0], lines
    assert sorted(tmp_path.iterdir()) == before


# ---- explain on a tiny project: boxes outside their image, checkpoints of another model ----

def snapshot(root: Path, *names: str) -> dict[str, bytes]:
    """Bytes of every file at or under `root`/name: what a failed run must leave exactly as it was."""
    out = {}
    for name in names:
        path = root / name
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            if f.is_file():
                out[str(f.relative_to(root))] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def explain_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo project through split, prepare, train (1 epoch), evaluate, calibrate and explain, built once."""
    from stages import calibrate, evaluate, explain, prepare, split, train

    root = tmp_path_factory.mktemp("explain_project")
    tiny_demo(root, {"prepare": {"image_size": 32, "workers": 1},
                     "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "workers": 0},
                     "evaluate": {"bootstrap": 20}})
    cwd = os.getcwd()
    os.chdir(root)  # the stages read and write paths relative to the project, as under DVC
    try:
        for stage in (split, prepare, train, evaluate, calibrate, explain):
            stage.main([])
    finally:
        os.chdir(cwd)
    shutil.rmtree(root / "models/resume")  # 130 MB no test here needs
    return root


@pytest.fixture
def explained(explain_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the explained project, as the working directory (CI=1: stderr holds messages only)."""
    work = tmp_path / "project"
    shutil.copytree(explain_project, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("CI", "1")
    return work


def a_test_image(work: Path) -> tuple[str, int, int]:
    """The first test image of the project: its name, width and height in pixels."""
    table = pd.read_csv(work / "data/split/test.csv")
    with Image.open(work / table["path"][0]) as image:
        return table["Image Index"][0], *image.size


@pytest.mark.parametrize(("box", "shown"), [
    ("{name},Mass,1e300,10,5,5", "x=1e+300 y=10 w=5 h=5"),
    ("{name},Mass,{w_5},10,10,5", "x={w_5} y=10 w=10 h=5"),
    ("{name},Nodule,10,-4,5,5", "x=10 y=-4 w=5 h=5"),
], ids=["far-away", "past-the-right-edge", "above-the-top-edge"])
def test_explain_names_the_box_list_line_of_a_box_outside_its_image(explained: Path, capsys, box: str,
                                                                     shown: str) -> None:
    """Scored, such a box counts as a miss and silently lowers the pointing game: one line naming the box list's
    line instead, and the previous overlays and metrics stay as they were."""
    name, width, height = a_test_image(explained)
    box_list = Path("data/demo/BBox_List_2017.csv")
    lines = box_list.read_text().splitlines()
    fields = {"name": name, "w_5": width - 5}
    box_list.write_text("\n".join([*lines, box.format(**fields)]) + "\n")
    before = snapshot(explained, "plots/gradcam", "metrics/explain.json")
    assert any(k.startswith("plots/gradcam/") for k in before) and "metrics/explain.json" in before
    tree = sorted(Path(".").rglob("*"))
    from stages import explain

    code, err = stage_result(explain.main, [], capsys)
    assert code == 1
    assert err == [f"error: {box_list} line {len(lines) + 1}: box {shown.format(**fields)} reaches outside {name} "
                   f"({width}x{height} px; 1 such box(es)); expected boxes in the original image's pixels"]
    assert snapshot(explained, "plots/gradcam", "metrics/explain.json") == before
    assert sorted(Path(".").rglob("*")) == tree  # no temporary left anywhere


def test_explain_scores_boxes_that_touch_the_image_edges(explained: Path, capsys) -> None:
    """The check must not refuse good lists: boxes filling the whole image, or past its edge by less than a pixel
    (rounding in an exported list), are scored. The same run's sanity checks (at layer3: layer4 is 1 x 1 at 32 px,
    a constant map) give numbers for every class with positive test images; a deletion grid finer than the
    image's pixels is one line naming the param."""
    name, width, height = a_test_image(explained)
    box_list = Path("data/demo/BBox_List_2017.csv")
    tests = set(pd.read_csv("data/split/test.csv")["Image Index"])
    scored = sum(line.split(",")[0] in tests for line in box_list.read_text().splitlines()[1:])
    box_list.write_text(box_list.read_text() + f"{name},Mass,0,0,{width},{height}\n"
                        f"{name},Nodule,-0.5,{height - 5},5.5,5.4\n")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["explain"].update(layer="layer3", deletion_grid=33)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    from stages import explain

    code, err = stage_result(explain.main, [], capsys)
    assert code == 1 and err == ["error: params.yaml explain.deletion_grid: 33; expected at most the image size "
                                 "(32 px): a cell is one pixel or more"]
    params["explain"]["deletion_grid"] = 8
    Path("params.yaml").write_text(yaml.safe_dump(params))
    code, err = stage_result(explain.main, [], capsys)
    assert code == 0 and err == []
    metrics = json.loads(Path("reports/explain.json").read_text())
    assert metrics["overall"]["boxes"] == scored + 2

    sanity, n = metrics["sanity"], params["explain"]["sanity_images"]
    positives = pd.read_csv("data/predictions/test.csv")[list(CLASSES)].sum()
    assert n > 0 and sanity["settings"]["images_per_class"] == n and sanity["settings"]["map_size"] == [32, 32]
    for cls in CLASSES:
        c = sanity["per_class"][cls]
        assert c["images"] == min(n, positives[cls]), cls
        if not c["images"]:
            assert c["randomisation_spearman"] is c["deletion_area_gradcam"] is c["deletion_area_random"] is None
            continue
        assert 0 <= c["deletion_area_gradcam"] <= 1 and 0 <= c["deletion_area_random"] <= 1, cls
        assert 0 <= c["constant_trained_maps"] + c["constant_randomised_maps"] <= c["images"]  # counted apart
        assert (c["randomisation_spearman"] is None) == (c["constant_trained_maps"] == c["images"]), cls
        assert c["randomisation_spearman"] is None or -1 <= c["randomisation_spearman"] <= 1
    o = sanity["overall"]
    assert o["classes"] == sum(positives > 0) > 0 and o["images"] == sum(positives.clip(upper=n))
    assert -1 <= o["randomisation_spearman"] <= 1 and 0 <= o["classes_gradcam_below_random"] <= o["classes"]
    assert 0 <= o["deletion_area_gradcam"] <= 1 and 0 <= o["deletion_area_random"] <= 1


def foreign_checkpoint(kind: str) -> dict:
    """A checkpoint that is not this project's model: the weights of another architecture under resnet18's name,
    13 class names over 14 logits (a class dropped from the metadata), or a whole 13-class model."""
    meta = {"arch": "resnet18", "classes": list(CLASSES), "image_size": 32, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225]}
    if kind == "resnet34 weights":
        return {**meta, "state_dict": build_model("resnet34", "none").state_dict()}
    if kind == "13 names, 14 logits":
        return {**meta, "state_dict": build_model("resnet18", "none").state_dict(), "classes": list(CLASSES[:13])}
    return {**meta, "state_dict": build_model("resnet18", "none", 13).state_dict(), "classes": list(CLASSES[:13])}


@pytest.mark.parametrize("kind", ["resnet34 weights", "13 names, 14 logits"])
def test_predict_refuses_a_checkpoint_of_another_model_naming_it(files: Path, capsys, kind: str) -> None:
    """A checkpoint whose weights do not fit its own description is a one-line refusal naming the file, not a
    traceback from inside torch."""
    save_checkpoint(files / "model.pt", foreign_checkpoint(kind))
    code, err = run_predict(files, capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {files / 'model.pt'}: checkpoint does not describe a model this project builds (")
    assert ("Unexpected key(s)" if kind == "resnet34 weights" else "size mismatch for fc.weight") in err


@pytest.mark.parametrize(("kind", "message"), [
    ("resnet34 weights", "checkpoint does not describe a model this project builds (Error(s) in loading state_dict "
                         "for ResNet: Unexpected key(s) in state_dict: "),
    ("13 names, 14 logits", f"classes {list(CLASSES[:13])} differ from this project's {list(CLASSES)}"),
    ("13-class model", f"classes {list(CLASSES[:13])} differ from this project's {list(CLASSES)}"),
], ids=["resnet34 weights", "13 names, 14 logits", "13-class model"])
def test_explain_refuses_a_checkpoint_of_another_model_and_keeps_its_outputs(files: Path, tmp_path: Path, capsys,
                                                                            monkeypatch, kind: str, message: str
                                                                            ) -> None:
    """explain's maps and metrics are per class of this project: a checkpoint of another architecture or class
    list is one line naming models/model.pt, and the previous overlays and metrics stay."""
    from stages import explain

    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    save_checkpoint("models/model.pt", foreign_checkpoint(kind))
    Path("plots/gradcam/Mass").mkdir(parents=True)
    Path("plots/gradcam/Mass/00000001_000.png").write_bytes(b"an earlier overlay")
    Path("metrics").mkdir()
    Path("metrics/explain.json").write_text('{"earlier": true}\n')
    tree = snapshot(work, "models", "plots", "metrics")
    code, err = stage_result(explain.main, ["--params", str(files / "params.yaml")], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: models/model.pt: {message}")
    assert snapshot(work, "models", "plots", "metrics") == tree and sorted(work.iterdir()) == [
        work / "metrics", work / "models", work / "plots"]


# ---- a full disk, for real: a small tmpfs in a user + mount namespace ----

@pytest.fixture(scope="module")
def small_disks(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless this machine lets an unprivileged user namespace mount a tmpfs (`unshare -Urm`)."""
    probe = tmp_path_factory.mktemp("tmpfs_probe")
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to mount a small tmpfs as a full disk")
    mount = f"mount -t tmpfs -o size=16k none {shlex.quote(str(probe))}"
    result = run(["unshare", "-Urm", "sh", "-c", mount], check=False, timeout=None)
    if result.returncode != 0:
        pytest.skip(f"user namespaces with a tmpfs are not available here (unshare -Urm: {result.stderr.strip()})")


def checkout_env() -> dict[str, str]:
    """The environment of run_module (CI=1: stderr holds messages only), with this checkout's code first on the
    path: these commands run outside the repo root, where `stages` would come from whatever the venv installed."""
    return child_env(pythonpath=REPO)


def on_small_disk(mount: Path, size_kb: int, command: list[str | Path], cwd: Path, *, before: Path | None = None,
                  after: Path) -> subprocess.CompletedProcess[str]:
    """Run `command` (`checkout_env`) with `mount` a fresh tmpfs of `size_kb` KB holding a copy
    of `before`; what the tmpfs holds afterwards is copied to `after` (the tmpfs goes with the namespace)."""
    mnt, q = shlex.quote(str(mount)), shlex.join(map(str, command))
    fill = f"cp -a {shlex.quote(str(before))}/. {mnt}/ || exit 98; " if before else ""
    script = (f"mount -t tmpfs -o size={size_kb}k none {mnt} || exit 99; {fill}{q}; rc=$?; "
              f"cp -a {mnt}/. {shlex.quote(str(after))}/ || exit 97; exit $rc")
    after.mkdir(parents=True, exist_ok=True)
    return run(["unshare", "-Urm", "sh", "-c", script], cwd, check=False, env=checkout_env(), timeout=300)


@pytest.fixture
def tiny_split(tmp_path: Path) -> dict[str, Path]:
    """The 17-image TinyNIH dataset split into tables (the prepare stage's inputs), with its params file."""
    from stages import split

    nih = TinyNIH(tmp_path / "nih")
    params = write_params(tmp_path / "params.yaml", nih.root, image_size=64, workers=1)
    split.main(["--params", str(params), "--out", str(tmp_path / "split"), "--metrics", str(tmp_path / "split.json")])
    return {"params": params, "split": tmp_path / "split", "nih": nih.root}


def previous_prepared(folder: Path) -> dict[str, bytes]:
    """A complete, small earlier output of prepare in `folder`: what a failed run must leave byte for byte."""
    folder.mkdir(parents=True)
    content = {f"prepared/{n}.npy": f"an earlier {n}.npy".encode() for n in ("train", "val", "test")}
    for name, data in content.items():
        (folder.parent / name).write_bytes(data)
    return content


def test_prepare_on_a_disk_without_room_stops_before_decoding(small_disks, tiny_split, tmp_path: Path) -> None:
    """Decoding all of NIH takes hours: with too little space for the arrays (old and new side by side) the stage
    stops first, saying how much it needs and how much is free, and the previous arrays stay."""
    before, after, disk = tmp_path / "before", tmp_path / "after", tmp_path / "disk"
    old = previous_prepared(before / "prepared")
    disk.mkdir()
    result = on_small_disk(disk, 32, [sys.executable, "-m", "stages.prepare", "--params", tiny_split["params"],
                                      "--split-dir", tiny_split["split"], "--out", disk / "prepared"],
                           REPO, before=before, after=after)
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    needed = sum(len(pd.read_csv(tiny_split["split"] / f"{n}.csv")) * 64 * 64 + 128 for n in ("train", "val", "test"))
    assert re.fullmatch(rf"error: {re.escape(str(disk / 'prepared'))}: needs about {needed / 1000:.1f} KB of disk "
                        r"space, [\d.]+ (bytes|KB) is free there; free some space and re-run\n", result.stderr)
    assert snapshot(after, "prepared") == old and sorted(p.name for p in after.iterdir()) == ["prepared"]


def test_prepare_when_the_disk_fills_up_while_writing_names_the_output_and_keeps_the_old(
        small_disks, tiny_split, tmp_path: Path) -> None:
    """The free-space check can be wrong (another writer, a quota): a disk that fills up half way through still
    ends in one line naming the output folder, the previous arrays whole, and no temporary left behind."""
    before, after, disk = tmp_path / "before", tmp_path / "after", tmp_path / "disk"
    old = previous_prepared(before / "prepared")
    disk.mkdir()
    script = ("import sys\nimport stages.prepare as stage\nfrom cxr14.runtime.signals import run_main\n"
              "stage.ensure_space = lambda path, needed: None  # the check passes, the writes fail\n"
              "run_main(stage.main, sys.argv[1:])\n")
    result = on_small_disk(disk, 48, [sys.executable, "-c", script, "--params", tiny_split["params"],
                                      "--split-dir", tiny_split["split"], "--out", disk / "prepared"],
                           REPO, before=before, after=after)
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert re.fullmatch(rf"error: {re.escape(str(disk / 'prepared'))}: the disk filled up while writing it "
                        r"\([\d.]+ (bytes|KB) free now; the previous version is untouched\); free some space and "
                        r"re-run\n", result.stderr)
    assert snapshot(after, "prepared") == old and sorted(p.name for p in after.iterdir()) == ["prepared"]


def test_train_on_a_disk_without_room_for_the_resume_point_stops_before_the_first_epoch(
        small_disks, explain_project: Path, tmp_path: Path) -> None:
    """An epoch can take hours, and its end writes the resume point (latest and best weights, AdamW's moments):
    without room for it the stage stops first, naming models/resume/last.pt and the space it needs, and the
    previous model.pt, train.json and log stay as they were."""
    work, before, after = tmp_path / "project", tmp_path / "before", tmp_path / "after"
    for folder in ("data/split", "data/prepared"):
        shutil.copytree(explain_project / folder, work / folder)
    shutil.copy(explain_project / "params.yaml", work / "params.yaml")
    (work / "models").mkdir()
    (work / "metrics").mkdir()
    (work / "metrics/train.json").write_text('{"earlier": true}\n')
    (work / "dvclive").mkdir()
    (work / "dvclive/metrics.json").write_text('{"step": 0}\n')
    before.mkdir()
    (before / "model.pt").write_bytes(b"an earlier model.pt")
    outside = snapshot(work, "metrics", "dvclive", "data")
    result = on_small_disk(work / "models", 1024, [sys.executable, "-m", "stages.train"], work, before=before,
                           after=after)
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    match = re.fullmatch(r"error: models/resume/last.pt: needs about ([\d.]+) MB of disk space, [\d.]+ (KB|MB) is free "
                         r"there; free some space and re-run\n", result.stderr)
    assert match, result.stderr
    weights = sum(t.numel() * t.element_size() for t in build_model("resnet18", "none").state_dict().values())
    assert float(match.group(1)) * 1e6 >= 3 * weights  # latest + best weights, the old point beside the new
    assert snapshot(after, ".") == {"model.pt": b"an earlier model.pt"}  # no resume/ folder, no temporary
    assert snapshot(work, "metrics", "dvclive", "data") == outside and sorted(p.name for p in work.iterdir()) == [
        "data", "dvclive", "metrics", "models", "params.yaml"]


# ---- unreadable inputs: run as a user that file permissions apply to ----

NOBODY = 65534
PROBE = ("import os, sys\nimport stages.prepare, stages.split\nopen(sys.argv[2]).read()  # reads what is readable\n"
         "try:\n    os.listdir(sys.argv[1])\nexcept PermissionError:\n    sys.exit(0)  # and not what is not\n"
         "sys.exit(3)\n")


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture
def unprivileged() -> Iterator[dict]:
    """A scratch folder, and how to run a command there so that mode 000 denies reading: as is when not root;
    as root, as uid 65534 (the folder chowned to it) if that user can run the venv's Python, else in a user
    namespace without a uid mapping, where root keeps its uid but not its override of file permissions."""
    work = Path(tempfile.mkdtemp(prefix="cxr14-unreadable-"))  # not under pytest's 0700 folder: uid 65534 must enter
    locked, readable = work / "locked", work / "readable"
    locked.mkdir(mode=0)
    readable.write_text("readable")
    env = checkout_env() | {"HOME": str(work)}
    runner: dict | None = None
    if os.geteuid() != 0:
        runner = {"prefix": [], "preexec_fn": None}
    else:
        tried = []
        for candidate in ({"prefix": [], "preexec_fn": as_nobody}, {"prefix": ["unshare", "-U"], "preexec_fn": None}):
            owner = NOBODY if candidate["preexec_fn"] else 0
            for path in (work, locked, readable):
                os.chown(path, owner, owner)
            try:
                probe = run([*candidate["prefix"], sys.executable, "-c", PROBE, locked, readable], work, check=False,
                            env=env, timeout=None, preexec_fn=candidate["preexec_fn"])
                tried.append(f"exit {probe.returncode}: {probe.stderr.strip()[-200:]}")
            except OSError as exc:
                tried.append(str(exc))
                continue
            if probe.returncode == 0:
                runner = candidate
                break
    if runner is None:
        shutil.rmtree(work)
        pytest.skip("running as root, and neither uid 65534 (which cannot run this venv's Python) nor root in a user "
                    f"namespace without a uid mapping is denied by mode 000: {'; '.join(tried)}")

    def python(*args: str | Path) -> subprocess.CompletedProcess[str]:
        if runner["preexec_fn"] is not None:  # uid 65534 writes its outputs into the folder it owns
            for path in [work, *work.rglob("*")]:
                os.lchown(path, NOBODY, NOBODY)
        return run([*runner["prefix"], sys.executable, *args], work, check=False, env=env, timeout=300,
                   preexec_fn=runner["preexec_fn"])

    yield {"work": work, "run": python}
    for path in [work, *work.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(work)


def test_split_names_an_images_folder_it_may_not_read(unprivileged: dict) -> None:
    """A dataset copied with the wrong owner or mode must say which folder it cannot read, not look like a
    dataset without images (or a traceback)."""
    work = unprivileged["work"]
    nih = TinyNIH(work / "nih")
    params = write_params(work / "params.yaml", nih.root)
    (nih.root / "images").chmod(0)
    result = unprivileged["run"]("-m", "stages.split", "--params", params, "--out", work / "split",
                                 "--metrics", work / "metrics/split.json")
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"error: {nih.root / 'images'}: Permission denied"]
    assert not (work / "split").exists() and not (work / "metrics").exists()
    assert sorted(p.name for p in work.iterdir()) == ["locked", "nih", "params.yaml", "readable"]


@pytest.mark.parametrize("unreadable", ["images folder", "split table"])
def test_prepare_names_an_input_it_may_not_read_and_keeps_the_old_arrays(unprivileged: dict, unreadable: str
                                                                         ) -> None:
    """Images or split tables the stage may not read are named in one line (the table's line for an image), and
    the previous arrays stay."""
    from stages import split

    work = unprivileged["work"]
    nih = TinyNIH(work / "nih")
    params = write_params(work / "params.yaml", nih.root, image_size=32, workers=1)
    split.main(["--params", str(params), "--out", str(work / "split"), "--metrics", str(work / "split.json")])
    old = previous_prepared(work / "prepared")
    table = work / "split/train.csv"
    if unreadable == "images folder":
        (nih.root / "images").chmod(0)
        first = pd.read_csv(table)["path"][0]
        expected = f"error: {first} ({table} line 2): cannot decode image ([Errno 13] Permission denied: '{first}'); "
        expected += "expected a readable PNG or JPEG"
    else:
        table.chmod(0)
        expected = f"error: {table}: permission denied; the split table must be readable by this user"
    result = unprivileged["run"]("-m", "stages.prepare", "--params", params, "--split-dir", work / "split",
                                 "--out", work / "prepared")
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [expected]
    assert snapshot(work, "prepared") == old
    assert sorted(p.name for p in work.iterdir()) == ["locked", "nih", "params.yaml", "prepared", "readable", "split",
                                                          "split.json", "split.report.json"]


def test_a_signal_handled_by_run_main_is_not_raised_again_later(capsys, tmp_path: Path) -> None:
    """A Ctrl-C that ended one stage run in-process must not resurface in the next write (tests, notebooks)."""
    import signal
    import time

    from cxr14.runtime.outputs import write_json

    def interrupted(argv):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises before this ends

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `nohup ... &`

    with pytest.raises(SystemExit) as exit_info:
        run_main(interrupted, [])
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
    write_json(tmp_path / "after.json", {"a": 1})  # a progress step or a rename: a safe point for a held signal
    assert signal.getsignal(signal.SIGINT) is before  # run_main gave the handler back


def test_a_stage_process_does_not_die_with_the_thread_that_started_it() -> None:
    """The parent-death signal is for the fork server and its workers only: set in a stage, a stage started by
    a thread of another program would be SIGKILLed when that thread ends."""
    code = ("import ctypes, cxr14.runtime.processes, cxr14.data.arrays, cxr14.data.demo, stages.prepare; "
            "v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); print(v.value)")
    result = run([sys.executable, "-c", code], REPO)
    assert result.stdout.strip() == "0"


def test_a_signal_inside_a_finalizer_is_held_and_raised_at_the_next_safe_point(monkeypatch) -> None:
    """SIGTERM landing in a `__del__` (a DataLoader joining its workers) must not print "Exception ignored"
    with a traceback: it is held and raised where the stage can act on it (seen under load in the kill test)."""
    import signal

    from cxr14.runtime import signals as common

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(common, "_pending", None)

    class Worker:
        def __del__(self) -> None:
            common._on_signal(signal.SIGTERM, sys._getframe())

    worker = Worker()
    del worker
    assert unraisable == [] and isinstance(common._pending, common.Terminated)
    with pytest.raises(common.Terminated):
        common.raise_pending()
    with pytest.raises(common.Terminated):  # outside a finalizer it raises at once, as before
        common._on_signal(signal.SIGTERM, sys._getframe())
    monkeypatch.setattr(common, "_pending", None)

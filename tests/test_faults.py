"""Bad artifacts and inputs: one line naming the file, the class or value, exit 1, no traceback, nothing lost.

The start of issue 11's catalogue: what predict and explain read besides images (thresholds, calibrators,
prepared arrays, checkpoints) and where their outputs go.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, project_params
from PIL import Image

from cxr14 import predict
from cxr14.common import PipelineError, run_main
from cxr14.data import PreparedImages
from cxr14.model import build_model, save_checkpoint
from cxr14.nih import CLASSES


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
        predict.main(args)
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
    from cxr14.common import replace_dir, write_json

    (tmp_path / ".m.json.k1l2.tmp").write_bytes(b"half a file")
    (tmp_path / ".plots.x9.tmp").mkdir()
    (tmp_path / ".plots.x9.tmp" / "a.png").write_bytes(b"half")
    (tmp_path / ".plots.y8.old").mkdir()
    (tmp_path / ".other.json.k1l2.tmp").write_bytes(b"someone else's")
    write_json(tmp_path / "m.json", {"a": 1})
    with replace_dir(tmp_path / "plots") as folder:
        (folder / "b.png").write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.k1l2.tmp", "m.json", "plots"]


def test_a_killed_prepare_leaves_no_process_and_its_next_run_no_file(nih_sample_split) -> None:
    """SIGKILL the prepare stage while its workers decode: they end with it, and a re-run leaves no temporaries."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    from conftest import REPO

    assert nih_sample_split["result"].returncode == 0, nih_sample_split["result"].stderr
    out = nih_sample_split["work"] / "killed"
    cmd = [sys.executable, "-m", "stages.prepare", "--params", str(nih_sample_split["params"]),
           "--split-dir", str(nih_sample_split["out"]), "--out", str(out)]
    env = {**os.environ, "CI": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
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
def test_bad_params_files_are_one_line_before_any_work(tmp_path: Path, stage: str, write, message: str) -> None:
    """Cases of issue 11's probe that were tracebacks or silently accepted: one line, exit 1, nothing written."""
    from conftest import run_module

    params = tmp_path / "params.yaml"
    write(params)
    before = sorted(tmp_path.iterdir())
    result = run_module(stage, "--params", params)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert sorted(tmp_path.iterdir()) == before

"""Shared fixtures: where the real NIH sample lives, and a tiny synthetic dataset in the NIH layout."""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (the README's test command runs two workers), each worker and every stage it starts computes
# on one thread (stages size their threads by OMP_NUM_THREADS, torch reads it at import): two workers with a
# thread each use two cores fully, where two threads each made every test wait on the other's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# A test that hangs dumps every thread's stack and ends the run, instead of running out CI's clock silently.
HANG_SECONDS = 900


@pytest.fixture(autouse=True)
def fail_fast_on_hang():
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# The real NIH reference files (read-only, never copied into the repo): ../shared/nih from the repo root.
NIH = Path(__file__).resolve().parents[1] / ".." / "shared" / "nih"
NIH_TABLE = NIH / "Data_Entry_2017_v2020.csv.gz"
NIH_IMAGES = 308
NIH_ROWS = 112_120
NIH_TRAIN_VAL = 86_524
NIH_TEST = 25_596
RGBA_FILES = ("00000004_000.png", "00000100_000.png", "00005224_000.png", "00001369_000.png")

# The original 2017 header: the two bracketed names contain commas, and the line ends with one.
HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)

# (image, findings, patient): every class appears, 'No Finding' too; patients 7 and 8 are the test list.
TINY_ROWS: tuple[tuple[str, str, int], ...] = (
    ("00000001_000.png", "Cardiomegaly", 1),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1),
    ("00000001_002.png", "Cardiomegaly|Effusion", 1),
    ("00000002_000.png", "No Finding", 2),
    ("00000002_001.png", "Hernia", 2),
    ("00000003_000.png", "Atelectasis", 3),
    ("00000003_001.png", "Infiltration|Mass|Nodule", 3),
    ("00000004_000.png", "Pneumonia", 4),
    ("00000004_001.png", "No Finding", 4),
    ("00000005_000.png", "Pneumothorax|Consolidation", 5),
    ("00000005_001.png", "Edema", 5),
    ("00000006_000.png", "Fibrosis", 6),
    ("00000006_001.png", "Pleural_Thickening|Hernia", 6),
    ("00000007_000.png", "No Finding", 7),
    ("00000007_001.png", "Effusion|Infiltration", 7),
    ("00000008_000.png", "Nodule", 8),
    ("00000008_001.png", "Mass", 8),
)
TINY_TEST_PATIENTS = (7, 8)
TINY_RGBA = "00000002_001.png"
TINY_I16 = "00000005_000.png"
TINY_WIDE = "00000003_001.png"  # not square: 80x64


def phantom(height: int, width: int, seed: int) -> np.ndarray:
    """A small radiograph-like uint8 image: bright body, two darker lung fields, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    body = 180 - 60 * y
    lungs = np.exp(-(((x - 0.3) / 0.13) ** 2 + ((y - 0.45) / 0.25) ** 2))
    lungs += np.exp(-(((x - 0.7) / 0.13) ** 2 + ((y - 0.45) / 0.25) ** 2))
    image = body - 110 * lungs + rng.normal(0, 8, (height, width))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_png(path: Path, name: str, seed: int) -> None:
    """Write one tiny image; TINY_RGBA is saved as RGBA and TINY_I16 as a 16-bit PNG ('I;16')."""
    gray = phantom(64, 80 if name == TINY_WIDE else 64, seed)
    if name == TINY_RGBA:
        rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
        Image.fromarray(rgba).save(path)
    elif name == TINY_I16:
        wide = gray.astype(np.uint16) * 257
        wide[0, :4] = (65535, 32896, 1000, 129)  # full range, exact midpoint, values that clipping would ruin
        Image.fromarray(wide).save(path)
    else:
        Image.fromarray(gray).save(path)


class TinyNIH:
    """A 17-image dataset in the NIH layout under `root`, with helpers to break it in specific ways."""

    def __init__(self, root: Path, layout: str = "nih") -> None:
        self.root = root
        self.rows = list(TINY_ROWS)
        self.test = [n for n, _, p in TINY_ROWS if p in TINY_TEST_PATIENTS]
        self.train_val = [n for n, _, p in TINY_ROWS if p not in TINY_TEST_PATIENTS]
        root.mkdir(parents=True, exist_ok=True)
        self.table = self.write_table(self.rows)
        self.write_list("train_val_list.txt", self.train_val)
        self.write_list("test_list.txt", self.test)
        self.paths: dict[str, Path] = {}
        for i, (name, _, _) in enumerate(self.rows):
            folder = root / "images" if layout == "nih" else root / f"images_{1 + i % 3:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            write_png(folder / name, name, seed=i)
            self.paths[name] = folder / name

    def write_table(
        self,
        rows: Iterable[Sequence[object]],
        name: str = "Data_Entry_2017.csv",
        header: str = HEADER_2017,
        trailing_comma: bool = True,
    ) -> Path:
        """The label table in the original 2017 format (trailing comma on every line)."""
        lines = [header]
        for i, (image, findings, patient) in enumerate(rows):
            line = f"{image},{findings},{i % 5},{patient},{40 + i:03d}Y,{'MF'[i % 2]},PA,2500,2048,0.143,0.143"
            lines.append(line + ("," if trailing_comma else ""))
        path = self.root / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def write_list(self, name: str, names: Iterable[str]) -> Path:
        path = self.root / name
        path.write_text("".join(f"{n}\n" for n in names))
        return path


@pytest.fixture
def tiny_nih(tmp_path: Path) -> TinyNIH:
    """The tiny dataset in NIH's layout (`images/`)."""
    return TinyNIH(tmp_path / "nih")


@pytest.fixture
def tiny_kaggle(tmp_path: Path) -> TinyNIH:
    """The tiny dataset in Kaggle's layout (`images_001/images/` ...)."""
    return TinyNIH(tmp_path / "kaggle", layout="kaggle")


def write_params(
    path: Path, root: Path | str, *, missing: str = "skip", image_size: int = 64, workers: int = 2
) -> Path:
    """A params.yaml with the sections split and prepare read."""
    path.write_text(
        f"data:\n  format: nih\n  root: {root}\n  table: null\n  missing: {missing}\n"
        f"split:\n  val_fraction: 0.1\n  seed: 42\n  test_fraction: 0.2\n"
        f"prepare:\n  image_size: {image_size}\n  workers: {workers}\n"
    )
    return path


def project_params(path: Path, overrides: dict[str, dict] | None = None) -> Path:
    """The repo's own params.yaml (every section, every key) with `overrides` merged per section, written to
    `path`: tests start from the real defaults, since the schema refuses missing keys."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in (overrides or {}).items():
        params[section] = merge(params.get(section, {}), values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_pipeline(work: Path, overrides: dict[str, dict], names: Sequence[str] = ("cxr14", "stages", "dvc.yaml")
                  ) -> Path:
    """The pipeline's code and dvc.yaml copied into `work`, with the repo's params.yaml and `overrides`: a
    project for `dvc repro` that runs this checkout's code (`python -m stages.<name>` imports from `work`)."""
    import shutil

    for name in names:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / name)
    return project_params(work / "params.yaml", overrides)


TINY_DEMO = {"data": {"root": "data/demo", "missing": "error"},
             "demo": {"patients": 24, "images": 60, "image_size": 64, "label_noise": 0.0, "class_floor": 0.03,
                      "test_fraction": 0.25, "seed": 0},
             "split": {"val_fraction": 0.25, "seed": 0}}


def tiny_demo(root: Path, overrides: dict[str, dict]) -> Path:
    """`root`/params.yaml (TINY_DEMO and `overrides`) and its 60-image demo in `root`/data/demo, built in-process."""
    from cxr14.data.demo import generate
    from cxr14.params import Demo, build

    params = project_params(root / "params.yaml", {**TINY_DEMO, **overrides})
    generate(build(Demo, yaml.safe_load(params.read_text())["demo"], "test"), root / "data/demo", workers=1)
    return params


def merge(base: dict, update: dict) -> dict:
    """`base` with `update`'s keys replaced, nested mappings merged key by key."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def child_env(*, ci: bool = True, pythonpath: str | Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a command a test starts, as a user (or DVC) runs it: this venv's `python` and `dvc`
    first on PATH (DVC's stages run `python -m ...`), DVC's analytics off, no PYTHONPATH (the code comes from the
    working directory, or from `pythonpath`), and CI=1 unless `ci` is false, so progress bars stay off (stderr
    is a pipe) and stderr holds only messages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    if ci:
        env["CI"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env | extra


def run(args: Sequence[str | Path], cwd: str | Path = REPO, *, check: bool = True, env: dict[str, str] | None = None,
        timeout: float | None = 600, **options: object) -> subprocess.CompletedProcess[str]:
    """The one way the tests run a command: `args` in `cwd` with `env` (default `child_env()`), stdout and stderr
    captured as text; with `check`, a failure is an assertion that shows both. `options` go to subprocess.run."""
    args = [str(a) for a in args]
    result = subprocess.run(args, cwd=cwd, env=child_env() if env is None else env, capture_output=True, text=True,
                            timeout=timeout, **options)
    assert not check or result.returncode == 0, f"{shlex.join(args)}: exit {result.returncode}\n{result.stdout}\n" \
                                                f"{result.stderr}"
    return result


def launch(args: Sequence[str | Path], cwd: str | Path = REPO, *, env: dict[str, str] | None = None,
          **popen: object) -> subprocess.Popen:
    """`args` started in `cwd` with `env` (default `child_env()`) and not waited for: a test that kills it.
    `popen` goes to subprocess.Popen (stdout, stderr, start_new_session ...)."""
    return subprocess.Popen([str(a) for a in args], cwd=cwd, env=child_env() if env is None else env, text=True,
                            **popen)


def dvc(*args: str, cwd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in `cwd` (this venv's DVC), through `run`."""
    return run([sys.executable, "-m", "dvc", *args], cwd, check=check)


def run_module(module: str, *args: str | Path, ci: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m stages.<module> ARGS` from the repo root, as a user (or DVC) runs it; the exit status is the
    caller's to check. `ci`: see `child_env`."""
    return run([sys.executable, "-m", f"stages.{module}", *args], REPO, check=False, env=child_env(ci=ci),
               timeout=300)


def stage_result(main: Callable[[list[str]], None], argv: Sequence[str | Path], capsys: pytest.CaptureFixture
                 ) -> tuple[int, list[str]]:
    """A stage entry point run in this process as its `__main__` runs it (through run_main; test_layout checks
    every stage's is): the exit code and the stderr lines. For errors found before any work, where a
    `run_module` subprocess would spend seconds importing torch to print one line."""
    from cxr14.runtime.signals import run_main

    capsys.readouterr()
    code = 0
    try:
        run_main(main, [str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.splitlines()


def stage_main(name: str) -> Callable[[list[str]], None]:
    """What `python -m stages.<name>` runs (train: `worker`, which wraps `main` for launched ranks)."""
    module = importlib.import_module(f"stages.{name}")
    return getattr(module, "worker", module.main)


# The tiny DVC project that tests/test_pipeline.py and tests/test_faults_dvc.py share: the whole DAG on a 120-image
# demo at 48 px, one epoch. Large enough for train's resume point and DataLoader worker to be caught by a kill.
TINY_DVC = {
    "demo": {"patients": 40, "images": 120, "image_size": 64, "test_fraction": 0.25},
    "split": {"val_fraction": 0.25},
    "prepare": {"image_size": 48, "workers": 2},
    "train": {"epochs": 2, "batch_size": 16, "device": "cpu", "workers": 1},  # 2: the baseline is the
    # uninterrupted run a killed two-epoch experiment must resume to (tests/test_faults_dvc.py)
    "evaluate": {"bootstrap": 20},
    "ood": {"images": 8},
}
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]


def dvc_project(work: Path, overrides: dict[str, dict]) -> Path:
    """A new git + DVC repo in `work` holding the pipeline (code, dvc.yaml, plots/templates, .gitignore) with the
    repo's params and `overrides`, committed (dvclive wants a commit to compare against, as in a clone)."""
    copy_pipeline(work, overrides, names=("cxr14", "stages", "dvc.yaml", "plots/templates", ".gitignore"))
    run(["git", "init", "-q"], work)
    dvc("init", "-q", cwd=work)
    dvc("config", "core.analytics", "false", cwd=work)
    run(["git", "add", "-A"], work)
    run([*GIT, "commit", "-qm", "code"], work)
    return work


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dvc_project` on TINY_DVC after `dvc repro`, its outputs committed: a clone after `dvc repro`, built once
    per session. Never changed: a module that changes a project works on `copy_project` of it."""
    work = dvc_project(tmp_path_factory.mktemp("reproduced") / "project", TINY_DVC)
    dvc("repro", cwd=work)
    run(["git", "add", "-A"], work)
    run([*GIT, "commit", "-qm", "baseline"], work)
    return work


def metrics(project: Path, stage: str) -> dict:
    """A stage's headline figures: `project`/metrics/<stage>.json."""
    return json.loads((project / f"metrics/{stage}.json").read_text())


def breakdown(project: Path, stage: str) -> dict:
    """A stage's breakdowns (per class, per subgroup, expert labels, examples): where they are read from, in one
    place."""
    return json.loads((project / f"reports/{stage}.json").read_text())


def copy_project(project: Path, dest: Path) -> Path:
    """A copy of `project` at `dest`: workspace, git repo and DVC cache (the workspace's outputs are copies, not
    links, so the copy's outputs are its own), without .dvc/tmp (locks, and hashes by inode that a copy changes)."""
    shutil.copytree(project, dest, symlinks=True, ignore=lambda folder, _: ["tmp"] if folder.endswith(".dvc") else [])
    return dest


def files_under(folder: Path) -> list[str]:
    """Every file and folder below `folder`, relative, sorted (empty if it does not exist)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="session")
def nih_sample_split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | subprocess.CompletedProcess[str]]:
    """`python -m stages.split` on ../shared/nih itself (308 of 112,120 images there: data.missing=skip)."""
    work = tmp_path_factory.mktemp("nih_sample")
    # The root is given relative to the repo root, as a user would write it in params.yaml.
    params = write_params(work / "params.yaml", os.path.relpath(NIH, REPO), missing="skip", image_size=64)
    out, metrics = work / "split", work / "metrics" / "split.json"
    result = run_module("split", "--params", params, "--out", out, "--metrics", metrics)
    return {"work": work, "params": params, "out": out, "metrics": metrics, "result": result}


# The train stage's tiny project (tests/test_train.py, tests/test_distributed.py).
TRAIN = {
    "arch": "resnet18", "output_stride": 32, "weights": "none", "freeze": [], "epochs": 1, "batch_size": 16,
    "lr_head": 1e-3,
    "lr_backbone": 1e-3, "weight_decay": 1e-4, "scheduler": "cosine", "pos_weight_cap": 20, "label_smoothing": 0.0,
    "patience": 3, "ema": 0.0,
    "augment": {"hflip": 0.5, "rotate": 5, "crop_scale": [0.85, 1.0]}, "device": "cpu", "nproc": 1, "compile": False,
    "cpu_kernels": "avx2",
    "workers": 0, "seed": 0,
    "resume": False, "init": None,
}


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` run once for the whole test run, not once per xdist worker: the first worker to take the
    lock builds in the workers' shared temporary folder, the others wait and reuse it (pytest-xdist's documented
    recipe for session fixtures, with a POSIX lock instead of the filelock package)."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (root / f"{name}.built").touch()
    return folder


def build_tiny_data(root: Path) -> None:
    tiny_demo(root, {"prepare": {"image_size": 48, "workers": 1}})
    cwd = os.getcwd()
    from stages import prepare, split

    os.chdir(root)  # split tables hold paths relative to the project, as in the real pipeline
    try:
        split.main(["--params", "params.yaml", "--metrics", "split.json"])
        prepare.main(["--params", "params.yaml"])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/split and data/prepared for a 60-image demo at 48 px, built once per test run. Never changed: tests
    work in `workdir`'s copy."""
    return built_once(tmp_path_factory, "tiny", build_tiny_data)


def tiny_project(tiny_data: Path, folder: Path) -> Path:
    """`folder` made a project holding the tiny data: split tables and prepared arrays copied, the images linked
    (split tables point at data/demo relative to the project), and its params.yaml."""
    (folder / "data").mkdir(parents=True)
    for name in ("split", "prepared"):
        shutil.copytree(tiny_data / "data" / name, folder / "data" / name)
    (folder / "data/demo").symlink_to(tiny_data / "data/demo")
    (folder / "params.yaml").write_text((tiny_data / "params.yaml").read_text())
    return folder


@pytest.fixture
def workdir(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh `tiny_project`; the stage runs with it as the working directory."""
    monkeypatch.chdir(tiny_project(tiny_data, tmp_path))
    return tmp_path


def write_train_params(folder: Path, name: str = "params.yaml", **overrides) -> None:
    """`folder`/params.yaml with the train section TRAIN and `overrides`, written to `folder`/`name`."""
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"] = {**TRAIN, **overrides}
    (folder / name).write_text(yaml.safe_dump(params))


def outputs(folder: Path = Path()) -> dict[str, bytes]:
    """Every file the train stage writes for DVC in `folder` (default: here), by path relative to it: what a
    killed run must leave as it was."""
    files = [folder / "models/model.pt", folder / "metrics/train.json", *sorted((folder / "dvclive").rglob("*"))]
    return {str(f.relative_to(folder)): f.read_bytes() for f in files if f.is_file()}


# The exported tiny model (tests/test_export.py, and the deployment side of the fault catalogue).
DEPLOYED_SIZE = 32
DEPLOYED_PHANTOMS = 40  # train and val images of its out-of-distribution fit


@pytest.fixture(scope="session")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random resnet18 at DEPLOYED_SIZE px as the train stage saves it, a Platt calibrator, thresholds, its ONNX
    export, and a few images (`images/`): what predict and the deployment faults run on. Built once per test run
    and shared: a test that changes a file works on a copy."""
    return built_once(tmp_path_factory, "deployed", build_deployed)


def build_deployed(folder: Path) -> None:
    import torch

    from cxr14.data.nih import CLASSES
    from cxr14.deployment.export import export_onnx, metadata
    from cxr14.evaluation.calibration import fit_calibrator
    from cxr14.model.factory import build_model
    from cxr14.model.ood import features, fit_gaussian

    torch.manual_seed(0)
    model = build_model("resnet18", "none").eval()
    ckpt = {"state_dict": model.state_dict(), "arch": "resnet18", "classes": list(CLASSES),
            "image_size": DEPLOYED_SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "epoch": 3,
            "val_mean_auc": 0.5}
    # the out-of-distribution fit on phantom radiographs (DEPLOYED_PHANTOMS train, then as many val)
    phantoms = np.stack([phantom(DEPLOYED_SIZE, DEPLOYED_SIZE, seed) for seed in range(2 * DEPLOYED_PHANTOMS)])
    feats = features(model, "resnet18", phantoms, ckpt["mean"], ckpt["std"])  # one pass: fit_ood makes two
    ckpt["ood"] = fit_gaussian(feats[:DEPLOYED_PHANTOMS], feats[DEPLOYED_PHANTOMS:])
    torch.save(ckpt, folder / "model.pt")
    rng = np.random.default_rng(0)
    probs = rng.random((200, len(CLASSES)))
    calibrator = fit_calibrator("platt", (rng.random((200, len(CLASSES))) < probs).astype(int), probs)
    (folder / "calibrator.json").write_text(json.dumps(calibrator))
    thresholds = {c: 0.3 for c in CLASSES} | {"Hernia": None}
    (folder / "thresholds.json").write_text(json.dumps({"metadata": {"calibration": "platt"},
                                                        "thresholds": thresholds}))
    export_onnx(model, ckpt, metadata(ckpt, thresholds, calibrator, "test"), folder / "model.onnx", 20)
    images = folder / "images" / "nested"
    images.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (60 + 10 * i, 50), dtype=np.uint8)).save(images / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "images" / "colour.jpg")


OOD_WARNING = ": out of distribution (score "  # predict's warning about an image the model should not judge


def besides_ood(lines: Iterable[str]) -> list[str]:
    """Stderr lines other than out-of-distribution warnings: the deployed fixture's random model scores real and
    random images far from its phantom fit, which tests of other warnings do not look at (tests/test_ood.py does)."""
    return [line for line in lines if OOD_WARNING not in line]


def own(folder: Path, onnx: bool = True) -> list[str]:
    """Files of the fixture, never the repo's models/ (absent on a fresh clone)."""
    if onnx:
        return ["--model", str(folder / "model.onnx")]
    return ["--model", str(folder / "model.pt"), "--thresholds", str(folder / "thresholds.json"),
            "--calibrator", str(folder / "calibrator.json")]

"""`cxr14-compare` and its statistics: DeLong against a reference written from the 1988 paper, the paired
bootstrap's verdicts, and runs named as git revisions, experiments and the workspace, read through DVC."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run

from cxr14 import cli
from cxr14.data.nih import CLASSES
from cxr14.evaluation.compare import bootstrap_p, compare, delong, midranks, paired, read_run, resolve
from cxr14.evaluation.predictions import PROB_PREFIX
from cxr14.runtime.errors import PipelineError


def delong_by_definition(y: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> tuple[float, float]:
    """DeLong, DeLong & Clarke-Pearson (1988), section 3, pair by pair: the reference for the midrank form."""
    y = y.astype(bool)
    v10, v01 = [], []
    for s in (s1, s2):
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])  # psi(X_i, Y_j)
        v10.append(psi.mean(axis=1))  # V10(X_i): structural component of each positive
        v01.append(psi.mean(axis=0))  # V01(Y_j): of each negative
    m, n = len(v10[0]), len(v01[0])

    def cov(v: list[np.ndarray], k: int) -> np.ndarray:
        centred = [a - a.mean() for a in v]
        return np.array([[np.sum(centred[r] * centred[c]) / (k - 1) for c in range(2)] for r in range(2)])

    s = cov(v10, m) / m + cov(v01, n) / n
    contrast = np.array([-1.0, 1.0])
    theta = np.array([v10[0].mean(), v10[1].mean()])
    z = float(contrast @ theta / math.sqrt(contrast @ s @ contrast))
    return z, float(math.erfc(abs(z) / math.sqrt(2)))


def test_midranks_average_ties() -> None:
    assert midranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_agrees_with_the_pairwise_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(int)
    s1 = np.round(y * 0.8 + rng.normal(0, 1, 300), 1)  # rounded: ties within and across classes
    s2 = np.round(y * 1.2 + 0.5 * s1 + rng.normal(0, 1, 300), 1)  # correlated with s1, as two models are
    z, p = delong(y, s1, s2)
    z_ref, p_ref = delong_by_definition(y, s1, s2)
    assert abs(p - p_ref) < 0.01 and z == pytest.approx(z_ref, rel=1e-9)
    assert delong(y, s1, s1) == (0.0, 1.0)


def predictions(signal_b: float, seed: int, n: int = 600) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two runs on the same images and labels: A sees the findings with strength 1, B with `signal_b`; their
    errors share a patient effect and differ by their own noise (as two trainings of one recipe do)."""
    rng = np.random.default_rng(seed)
    patients = np.arange(n) // 3
    labels = (rng.random((n, len(CLASSES))) < 0.2).astype(int)
    shared = rng.normal(0, 1, (n // 3, len(CLASSES)))[patients]
    runs = []
    for strength in (1.0, signal_b):
        logits = 2 * strength * labels + shared + 0.7 * rng.normal(0, 1, labels.shape)
        frame = pd.DataFrame(labels, columns=list(CLASSES))
        frame.insert(0, "Patient ID", patients)
        frame.insert(0, "Image Index", [f"{i:08d}_000.png" for i in range(n)])
        frame[[PROB_PREFIX + c for c in CLASSES]] = 1 / (1 + np.exp(-logits))
        runs.append(frame)
    return runs[0], runs[1]


def test_same_recipe_other_noise_covers_zero_and_a_weaker_model_does_not() -> None:
    a, b = predictions(1.0, seed=0)
    same = compare(a, b, resamples=300, seed=0)
    assert same["ci_low"] < 0 < same["ci_high"] and same["p_bootstrap"] > 0.05
    assert same["ci_high"] - same["ci_low"] < 0.03  # paired: far narrower than each AUC's own interval
    a, b = predictions(0.5, seed=0)
    worse = compare(a, b, resamples=300, seed=0)
    assert worse["ci_high"] < 0 and worse["p_bootstrap"] < 0.01 and worse["difference"] < -0.05
    assert all(v["p_delong"] < 0.01 for v in worse["per_class"].values())
    assert bootstrap_p(np.array([0.1] * 999)) == pytest.approx(2 / 1000)


def test_runs_must_pair() -> None:
    a, b = predictions(1.0, seed=0, n=30)
    with pytest.raises(PipelineError, match="predict different test images: 1 images in one only"):
        paired(a, b.iloc[:-1], ("x", "y"))
    with pytest.raises(PipelineError, match="the same images in another order"):
        paired(a, b.iloc[::-1], ("x", "y"))
    b.loc[0, "Edema"] = 1 - b.loc[0, "Edema"]
    with pytest.raises(PipelineError, match="label the test images differently \\(first: Edema\\)"):
        paired(a, b, ("x", "y"))


MAKE = """import os, shutil, yaml
seed = yaml.safe_load(open("params.yaml"))["seed"]
os.makedirs("data/predictions", exist_ok=True)
shutil.copy(f"runs/{seed}.csv", "data/predictions/test.csv")
"""


def sh(cwd: Path, *args: str) -> str:
    return run(args, cwd, timeout=300).stdout  # python in the stage: this one (child_env)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project whose one stage writes data/predictions/test.csv from a `seed` param: a commit
    without it, a commit with seed 0, an experiment with seed 1, the workspace left at seed 1."""
    root = tmp_path_factory.mktemp("runs")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    sh(root, "git", "init", "-q")
    sh(root, sys.executable, "-m", "dvc", "init", "-q")
    sh(root, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    (root / "params.yaml").write_text("seed: 0\n")
    (root / "make.py").write_text(MAKE)
    (root / "runs").mkdir()
    for seed, frame in enumerate(predictions(1.0, seed=0, n=90)):
        frame.to_csv(root / "runs" / f"{seed}.csv", index=False)
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: python make.py\n    deps: [make.py, runs]\n"
                                   "    params: [seed]\n    outs: [data/predictions]\n")
    sh(root, "git", "add", "-A")
    sh(root, *git, "commit", "-qm", "no predictions yet")
    sh(root, "git", "tag", "empty")
    sh(root, sys.executable, "-m", "dvc", "repro", "-q")
    sh(root, "git", "add", "-A")
    sh(root, *git, "commit", "-qm", "seed 0")
    sh(root, sys.executable, "-m", "dvc", "exp", "run", "-q", "-S", "seed=1", "-n", "seed-one")
    return root


@pytest.mark.slow
def test_revisions_experiments_and_the_workspace(repo: Path) -> None:
    assert resolve(repo, "workspace") == "workspace"
    head = sh(repo, "git", "rev-parse", "HEAD").strip()
    assert resolve(repo, "HEAD") == head and resolve(repo, "main" if "main" in sh(repo, "git", "branch") else "HEAD")
    assert resolve(repo, "seed-one") != head
    a, b = predictions(1.0, seed=0, n=90)
    assert np.allclose(read_run(repo, "HEAD")[PROB_PREFIX + "Edema"], a[PROB_PREFIX + "Edema"])
    assert np.allclose(read_run(repo, "seed-one")[PROB_PREFIX + "Edema"], b[PROB_PREFIX + "Edema"])
    assert np.allclose(read_run(repo, "workspace")[PROB_PREFIX + "Edema"], b[PROB_PREFIX + "Edema"])


@pytest.mark.slow
def test_bad_runs_are_one_line(repo: Path) -> None:
    with pytest.raises(PipelineError, match="^nosuch: unknown revision; expected a git commit"):
        read_run(repo, "nosuch")
    with pytest.raises(PipelineError, match="^empty: cannot read its data/predictions/test.csv"):
        read_run(repo, "empty")


@pytest.mark.slow
def test_command_prints_a_table_and_json(repo: Path, capsys: pytest.CaptureFixture) -> None:
    cli.compare(["HEAD", "seed-one", "--repo", str(repo), "--bootstrap", "50", "--seed", "0",
                "--params", str(Path(__file__).resolve().parents[1] / "params.yaml")])
    text = capsys.readouterr().out
    assert text.startswith("A = HEAD, B = seed-one: test ROC-AUC on 90 images, 30 patients, 50 paired")
    assert "mean difference: the interval" in text
    cli.compare(["HEAD", "workspace", "--json", "--repo", str(repo), "--bootstrap", "50",
                "--params", str(Path(__file__).resolve().parents[1] / "params.yaml")])
    out = json.loads(capsys.readouterr().out)
    assert out["a"] == "HEAD" and out["images"] == 90 and len(out["per_class"]) == len(CLASSES)
    assert out["ci_low"] <= out["difference"] <= out["ci_high"]


def test_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.compare_main(["--repo", str(tmp_path)])  # no params.yaml there for the defaults
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "params.yaml" in err


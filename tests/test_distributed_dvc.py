"""`dvc exp run -S train.nproc=2` on a small demo: two gloo processes train what one trains, as an experiment.

The baseline (one process) comes from `dvc repro train` in a scratch git + DVC repo; the experiment (the train
stage, the one that differs) must reach a val mean AUC within 0.02 of it, leave one dvclive folder and one
checkpoint, and be listed by `dvc exp show`. The full demo, measured by hand, is in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_pipeline

# Chosen so that both runs learn (val mean AUC ~0.85 here): on smaller demos the two differ by more, since CPU
# processes normalise BatchNorm over their own half batch (PyTorch's SyncBatchNorm is CUDA-only). Measured here
# (1 vs 2 processes): 800 images, 6 epochs: 0.8506 vs 0.8535; 800 images, 4 epochs: 0.844 vs 0.826.
SMALL = {
    "demo": {"patients": 320, "images": 800, "image_size": 128, "test_fraction": 0.2},
    "split": {"val_fraction": 0.15, "seed": 0},
    "prepare": {"image_size": 64, "workers": 2},
    "train": {"arch": "resnet18", "epochs": 6, "batch_size": 32, "device": "cpu", "patience": 7},  # as measured
    "evaluate": {"bootstrap": 20},
    "explain": {"per_class": 0},
}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "CI": "1",
           "DVC_NO_ANALYTICS": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ddp_project")
    copy_pipeline(work, SMALL)
    run(["git", "init", "-q"], work)
    run([sys.executable, "-m", "dvc", "init", "-q"], work)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], work)
    commit = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-qm"]
    run(["git", "add", "-A"], work)  # dvclive wants a commit to compare against, as in a clone
    run([*commit, "code"], work)
    run([sys.executable, "-m", "dvc", "repro", "-q", "train"], work)  # training is what differs
    run(["git", "add", "-A"], work)
    run([*commit, "baseline"], work)
    return work


def test_dvc_exp_run_with_two_processes_matches_one_and_is_an_experiment_like_any(project: Path) -> None:
    one = json.loads((project / "metrics/train.json").read_text())
    assert one["val_auc"] > 0.8  # a model that learned
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.nproc=2", "-n", "two-procs", "train"],
              project).stdout
    assert "train: 2 processes (gloo on the CPU" in out
    two = json.loads((project / "metrics/train.json").read_text())
    assert abs(two["val_auc"] - one["val_auc"]) <= 0.02, (one, two)
    assert two["epochs_run"] == 6
    # one log, written once (not once per process): each epoch a single step
    steps = (project / "dvclive/plots/metrics/val/mean_auc.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in steps] == ["step", *map(str, range(6))]
    assert sorted(p.name for p in (project / "models").glob("*.pt")) == ["model.pt"]
    state = torch.load(project / "models/model.pt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("module.")]
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    named = [e for e in experiments if e.get("name") == "two-procs"]
    assert len(named) == 1
    data = named[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["nproc"] == 2
    assert data["metrics"]["metrics/train.json"]["data"]["val_auc"] == two["val_auc"]

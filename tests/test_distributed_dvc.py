"""`dvc exp run -S train.nproc=2`: the train stage launches two gloo processes and the run is an experiment like
any other: one dvclive log written once, one checkpoint without DDP's `module.` prefix, listed by `dvc exp show`
with its params and metrics.

That two processes train what one trains is checked where it can be exact, in-process:
tests/test_distributed.py::test_two_processes_with_frozen_batchnorm_train_what_one_process_trains (weights within
1e-5 after two epochs). Here the session's tiny reproduced project (conftest.TINY_DVC) is copied and only its
train stage re-run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_DVC, copy_project, dvc, metrics

# xdist: every module on the reproduced project is in this group, so one worker builds it once for all of them
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc_project")]


@pytest.fixture(scope="module")
def project(reproduced_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(reproduced_project, tmp_path_factory.mktemp("ddp") / "project")


def test_dvc_exp_run_with_two_processes_is_an_experiment_like_any(project: Path) -> None:
    one = metrics(project, "train")
    # train.workers=0: with DataLoader worker processes forked from ranks that ran Python threads (tqdm's monitor,
    # the previous loader's queue feeders), a fork once deadlocked in CPython's after-fork clean-up
    # (PyOS_AfterFork_Child -> _PyThreadState_DeleteExcept, seen in CI on 3.11.7). make_loader now forks with
    # none alive (test_prepare); training with a DataLoader worker runs in test_faults_dvc's random kills
    out = dvc("exp", "run", "-S", "train.nproc=2", "-S", "train.workers=0", "-n", "two-procs", "train",
              cwd=project).stdout
    assert "train: 2 processes (gloo on the CPU" in out
    two = metrics(project, "train")
    epochs = TINY_DVC["train"]["epochs"]
    assert two["epochs_run"] == one["epochs_run"] == epochs and 0 <= two["val_auc"] <= 1
    # one log, written once (not once per process): each epoch a single step
    steps = (project / "dvclive/plots/metrics/val/mean_auc.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in steps] == ["step", *map(str, range(epochs))]
    assert sorted(p.name for p in (project / "models").glob("*.pt")) == ["model.pt"]
    state = torch.load(project / "models/model.pt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("module.")]
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    named = [e for e in experiments if e.get("name") == "two-procs"]
    assert len(named) == 1
    data = named[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["nproc"] == 2
    assert data["metrics"]["metrics/train.json"]["data"]["val_auc"] == two["val_auc"]

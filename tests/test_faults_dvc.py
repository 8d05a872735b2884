"""Faults of a whole project under DVC (issue 11's catalogue, continued from test_faults.py): a killed
`dvc exp run` resumed with the documented command, stage processes killed at random moments, two
`dvc repro` at once, and a resume on other data refused through DVC.

All run in one scratch git + DVC project built once on a tiny demo; each test starts from its committed
baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import copy_project, dvc, launch, metrics, run

# xdist: every module on the reproduced project is in this group, so one worker builds it once for all of them
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc_project")]


@pytest.fixture(scope="module")
def baseline(reproduced_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's reproduced tiny project (conftest.TINY_DVC), copied: a clone after `dvc repro`."""
    return copy_project(reproduced_project, tmp_path_factory.mktemp("faults_dvc") / "project")


@pytest.fixture
def project(baseline: Path) -> Path:
    """The baseline project as committed, with the workspace's outputs checked out and no resume point."""
    reset(baseline)
    dvc("checkout", "--force", cwd=baseline)
    shutil.rmtree(baseline / "models/resume", ignore_errors=True)
    assert "up to date" in dvc("status", cwd=baseline).stdout
    return baseline


def reset(project: Path) -> None:
    """`git reset --hard` from a new index: after a failed `dvc exp run`, the index DVC leaves can hold the stat
    of a workspace file together with HEAD's content, and git then keeps the file as it is."""
    (project / ".git/index").unlink(missing_ok=True)
    run(["git", "reset", "-q", "--hard"], project)
    # Outputs committed to git (cache: false): an experiment's explain may have drawn overlays of other images,
    # which reset leaves behind as untracked files and `dvc status` then calls a modified output.
    run(["git", "clean", "-q", "-fd", "--", "plots", "dvclive", "metrics", "reports"], project)


def cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def train_outputs(project: Path) -> dict[str, str]:
    """model.pt, every dvclive file, and train.json without its timings: what an uninterrupted run makes."""
    out = {"models/model.pt": md5(project / "models/model.pt")}
    out.update({str(p.relative_to(project)): md5(p) for p in sorted((project / "dvclive").rglob("*")) if p.is_file()})
    train = metrics(project, "train")
    out["metrics/train.json"] = json.dumps({k: train[k] for k in ("best_epoch", "val_auc", "epochs_run")})
    return out


def leftovers(project: Path) -> list[str]:
    """Temporaries of our atomic writes (`.<name>.*.tmp` / `.old`), anywhere outside .git and .dvc."""
    return sorted(str(p.relative_to(project)) for p in project.rglob(".*")
                  if p.name.endswith((".tmp", ".old")) and not {".git", ".dvc"} & set(p.relative_to(project).parts))


def test_dvc_exp_run_resume_after_a_killed_experiment_gives_the_uninterrupted_result(project: Path) -> None:
    """The README's recipe: kill the train step of an experiment, then `dvc exp run -S train.resume=true`; DVC
    checks out the baseline's outputs first, so the resume point must live outside them, and the result must be the
    uninterrupted run's, byte for byte. The baseline is that run (TINY_DVC trains two epochs), so the killed
    experiment is the baseline's train stage forced to run again."""
    straight = train_outputs(project)
    assert json.loads(straight["metrics/train.json"])["epochs_run"] == 2
    # only train: the stages after it would only add minutes, what is compared is train's outputs
    experiment = ["exp", "run", "--force", "--single-item", "train"]
    point = project / "models/resume/last.pt"
    with open(project / "killed.log", "w") as log:
        proc = launch([sys.executable, "-m", "dvc", *experiment], project, stdout=log, stderr=subprocess.STDOUT,
                     start_new_session=True)
        deadline = time.monotonic() + 300
        while not point.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: DVC and the stage, as a lost machine would
        proc.wait()
    killed_at = torch.load(point, weights_only=True)["state"]["epoch"]
    assert killed_at == 1, f"the experiment was not killed during training:\n{(project / 'killed.log').read_text()}"
    (project / "killed.log").unlink()

    result = dvc("exp", "run", "-S", "train.resume=true", "train", cwd=project)
    assert "resuming from models/resume/last.pt after epoch 1 of 2" in result.stdout
    assert train_outputs(project) == straight
    assert not leftovers(project)


def test_resume_on_another_split_is_refused_through_dvc(project: Path, reproduced_project: Path) -> None:
    """The probe's first scenario: `dvc exp run -S split.seed=43 -S train.resume=true` on a seed-42 resume point
    handed back the seed-42 model; now train stops with one line and DVC reports the stage failed."""
    # the seed-42 resume point: the baseline's own `dvc repro` left it
    shutil.copytree(reproduced_project / "models/resume", project / "models/resume")
    model = md5(project / "models/model.pt")
    result = dvc("exp", "run", "-S", "split.seed=43", "-S", "train.resume=true", "train", cwd=project, check=False)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: models/resume/last.pt was trained on other data (data/prepared/train.npy differs, "
                    "4 file(s) in all); set train.resume: false"], result.stderr
    assert "Traceback" not in result.stderr
    assert md5(project / "models/model.pt") == model  # the previous model stays; no other one takes its place


def test_two_dvc_repro_at_once_the_second_stops_and_the_first_finishes(project: Path) -> None:
    """DVC's locks: the second run stops with DVC's error naming the busy output and the process holding it,
    runs nothing, and the first finishes with the outputs it would have made alone."""
    # --single-item: train alone, forced (its inputs are the baseline's), not the stages before it as well
    first = launch([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train"], project,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline:  # wait until the train stage itself runs
        if any("stages.train" in cmdline(c) for c in psutil.Process(first.pid).children(recursive=True)):
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first repro ended before the second could start"
    second = dvc("repro", cwd=project, check=False)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("ERROR")]  # DVC's own words
    assert len(errors) == 1 and ("is busy, it is being blocked by" in errors[0] or "Unable to acquire lock"
                                 in errors[0]), second.stderr
    assert "Traceback" not in second.stderr
    assert "up to date" in dvc("status", cwd=project).stdout  # the first run's outputs equal the baseline's


def finished(project: Path, stage: str) -> float:
    """When `stage` last wrote an output in `project` (the newest mtime among its dvc.lock outputs)."""
    outs = [project / o["path"] for o in yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]["outs"]]
    return max(f.stat().st_mtime for out in outs for f in ([out] if out.is_file() else out.rglob("*")))


def test_random_kills_of_train_and_prepare_leave_no_process_no_temporary_and_the_same_dvc_status(
        project: Path, reproduced_project: Path) -> None:
    """SIGKILL, SIGTERM or Ctrl-C at a random moment of a prepare or train run: workers end with the stage,
    outputs DVC tracks are the old ones or the new whole ones (so `dvc status` does not change), SIGTERM and
    Ctrl-C leave no temporary at all, and what a SIGKILL leaves is hidden beside the outputs and removed by the
    stage's next run."""
    timings = (project / "reports/train.json").read_bytes()  # the baseline's

    def status() -> str:
        """dvc status, once a reports/train.json that differs from the baseline's only in its timings (any re-run,
        or a run killed after its last write) is put back: seconds and images/s are the one thing a re-run may
        change."""
        untimed = {"seconds", "images_per_second"}
        now, then = (json.loads(b) for b in ((project / "reports/train.json").read_bytes(), timings))
        if {k: v for k, v in now.items() if k not in untimed} == {k: v for k, v in then.items() if k not in untimed}:
            (project / "reports/train.json").write_bytes(timings)
        return dvc("status", cwd=project).stdout

    # how long each ran in the session's `dvc repro` (from its outputs' times, untouched there: running both
    # here once more to time them cost ~10 s): the kills below come at a random moment of a run
    durations = {stage: finished(reproduced_project, stage) - finished(reproduced_project, previous)
                 for stage, previous in (("prepare", "split"), ("train", "prepare"))}
    assert all(0 < d < 300 for d in durations.values()), durations
    before = status()
    assert "up to date" in before
    rng = random.Random(11)
    # each stage SIGKILLed once and stopped once by SIGTERM or Ctrl-C (which of the two: drawn), in a drawn
    # order, each at a random moment of its run
    gentle = rng.sample([signal.SIGTERM, signal.SIGINT], 2)
    plan = [("prepare", signal.SIGKILL), ("train", signal.SIGKILL), ("prepare", gentle[0]), ("train", gentle[1])]
    rng.shuffle(plan)
    for stage, sig in plan:
        delay = rng.uniform(0.5, durations[stage])
        earlier = set(leftovers(project))  # a SIGKILLed run's, until the same stage runs again
        proc = launch([sys.executable, "-m", f"stages.{stage}"], project, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE)
        ours: dict[int, psutil.Process] = {}
        end = time.monotonic() + delay
        while time.monotonic() < end and proc.poll() is None:
            try:
                ours.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        _, alive = psutil.wait_procs(list(ours.values()), timeout=15)  # DataLoader workers poll every 5 s
        what = f"{stage} {signal.Signals(sig).name} after {delay:.1f} s"
        assert not alive, f"{what}: processes left {alive}"
        if sig != signal.SIGKILL:
            assert not set(leftovers(project)) - earlier, f"{what}: {leftovers(project)}"
            assert "Traceback" not in err, f"{what}: {err}"
        assert status() == before, what
    for stage in ("prepare", "train"):
        run([sys.executable, "-m", f"stages.{stage}"], project)
    assert not leftovers(project)
    assert status() == before

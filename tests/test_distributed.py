"""train.nproc: several training processes (DDP over torchrun's engine, gloo on the CPU) on a tiny demo.

Two processes must train what one trains (same global batch, same sample order, same augmentation draws),
write once (rank 0), resume after a kill, and fail in one line without leaving a process behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from conftest import (
    REPO,
    child_env,
    launch,
    outputs,
    run,
    stage_main,
    stage_result,
    tiny_project,
    write_train_params,
)

from cxr14.data.loader import PreparedImages, SortedBatchSampler, augment, read_labels
from cxr14.data.nih import CLASSES
from cxr14.model.factory import build_model, freeze, set_train_mode, unwrap
from cxr14.params import Train, load_section
from cxr14.runtime.errors import PipelineError
from cxr14.training import distributed
from cxr14.training import loop as training
from stages import train

# Every BatchNorm of resnet10 (one block per stage) frozen (eval mode): with these, per-process batch statistics
# cannot differ from one process's, so the weights must agree to float rounding. resnet10, the demo's, rather than
# resnet18: half the blocks, the same code paths, and the float64 runs below take half the time.
ALL_BATCHNORM = ["bn1", *[f"layer{i}.0.bn{k}" for i in range(1, 5) for k in (1, 2)],
                 *[f"layer{i}.0.downsample.1" for i in range(2, 5)]]


def run_train(folder: Path, env: dict[str, str] | None = None, popen: bool = False, args: Sequence[str] = ()) -> Any:
    """`python -m stages.train ARGS` in `folder` as DVC runs it (progress bars off), this checkout's code on the
    path."""
    full = {k: v for k, v in child_env(pythonpath=REPO).items() if k != "MASTER_PORT"} | (env or {})
    args = [sys.executable, "-m", "stages.train", *args]
    if popen:
        return launch(args, folder, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return run(args, folder, check=False, env=full, timeout=300)


def children() -> set[int]:
    """The pids of this process's children: a stage run in-process that started no process adds none."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def fit_here(folder: Path, world: distributed.World, out: Path) -> None:
    """`training.fit` on `folder`'s tiny data in float64 (rounding then cannot blur a wrong sample or augmentation),
    BatchNorm frozen; the final weights go to `out` (rank 0)."""
    os.chdir(folder)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    t = load_section("params.yaml", Train)
    device = torch.device("cpu")
    if world.size > 1:
        distributed.start(world, device)
    torch.manual_seed(t.seed)
    model = build_model(t.arch, t.weights, len(CLASSES), t.output_stride)
    frozen = freeze(model, t.freeze)
    train_set = PreparedImages("data/prepared/train.npy", read_labels("data/split/train.csv"))
    val_set = PreparedImages("data/prepared/val.npy", read_labels("data/split/val.csv"))
    final = training.fit(model, frozen, training.TrainingData(train_set, val_set), t, device,
                         out.with_suffix(f".{world.rank}.pt"), world)
    if world.main:
        torch.save({"weights": model.state_dict(), "history": final.state.history}, out)
    distributed.stop()


def ddp_rank(rank: int, folder: Path, out: Path) -> None:
    fit_here(folder, distributed.World(rank, rank, 2), out)


@pytest.mark.slow
def test_two_processes_with_frozen_batchnorm_train_what_one_process_trains(workdir: Path, monkeypatch) -> None:
    write_train_params(workdir, arch="resnet10", epochs=2, batch_size=8, freeze=ALL_BATCHNORM)  # 3 steps an epoch
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:  # one process: this one (a spawned one would spend seconds importing torch)
        fit_here(workdir, distributed.World(), workdir / "one.pt")
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.multiprocessing.spawn(ddp_rank, args=(workdir, workdir / "two.pt"), nprocs=2, join=True)
    one, two = (torch.load(workdir / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert one["weights"].keys() == two["weights"].keys()
    trained = [k for k, v in one["weights"].items() if v.is_floating_point()
               and not any(k.startswith(p + ".") for p in ALL_BATCHNORM)]
    assert len(trained) >= 14  # every conv and the head: conv1, 2 per block, 3 downsamples, fc weight and bias
    initial = build_model("resnet10", "none", len(CLASSES), 32).state_dict()
    assert max((one["weights"][k] - initial[k].double()).abs().max().item() for k in trained) > 1e-3  # it learned
    worst = max((one["weights"][k] - two["weights"][k]).abs().max().item() for k in trained)
    assert worst <= 1e-5, worst
    for a, b in zip(one["history"], two["history"], strict=True):  # logged as the whole batch's figures
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-6)
        assert b["val/mean_auc"] == pytest.approx(a["val/mean_auc"], abs=1e-9)
        assert b["val/loss"] == pytest.approx(a["val/loss"], abs=1e-6)


def test_each_process_reads_its_share_of_the_same_batches() -> None:
    rows = list(range(40))
    whole = list(SortedBatchSampler(torch.utils.data.RandomSampler(rows, generator=torch.Generator().manual_seed(3)),
                                    8, True))
    shares = [list(SortedBatchSampler(torch.utils.data.RandomSampler(rows,
                                                                     generator=torch.Generator().manual_seed(3)),
                                      8, True, part=(r, 2))) for r in range(2)]
    for b, batch in enumerate(whole):
        assert shares[0][b] + shares[1][b] == batch  # contiguous halves, in file order


def test_each_process_augments_its_share_as_one_process_would() -> None:
    images = torch.rand(8, 1, 16, 16)
    whole = augment(images, torch.Generator().manual_seed(1), 0.5, 10, (0.8, 1.0))
    halves = [augment(images[r * 4:(r + 1) * 4], torch.Generator().manual_seed(1), 0.5, 10, (0.8, 1.0), part=(r, 2))
              for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_validation_blocks_cover_every_row_once() -> None:
    for total in (1, 2, 7, 160):
        for size in (1, 2, 3, 8):
            rows = [i for block in distributed.blocks(total, size) for i in block]
            assert rows == list(range(total))


def loads_torchvision(pid: int) -> bool:
    """Whether process `pid` has torchvision's compiled extension mapped: it imported torchvision (False for a
    process gone meanwhile)."""
    try:
        return "torchvision/_C" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


TWO_PROCESSES = {"arch": "resnet10", "epochs": 2, "batch_size": 8, "nproc": 2}  # resnet10: the demo's, the cheapest


@pytest.fixture(scope="module")
def two_processes(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """One uninterrupted two-process run, shared by the tests below (each launch costs seconds): the train
    stage given `--params other.yaml` (TWO_PROCESSES) beside a params.yaml that asks for one epoch; its folder
    and its outputs."""
    folder = tiny_project(tiny_data, tmp_path_factory.mktemp("two_processes"))
    write_train_params(folder, "other.yaml", **TWO_PROCESSES)
    write_train_params(folder, **{**TWO_PROCESSES, "epochs": 1})  # what the ranks must not read
    result = run_train(folder, args=["--params", "other.yaml"])
    assert result.returncode == 0, result.stderr
    return folder, outputs(folder)


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")  # on one worker, so the run is made once
def test_launched_processes_read_the_params_file_the_launcher_was_given(two_processes) -> None:
    folder, _ = two_processes
    assert json.loads((folder / "metrics/train.json").read_text())["epochs_run"] == 2


@pytest.mark.slow
@pytest.mark.xdist_group("two_processes")
def test_a_run_killed_after_an_epoch_resumes_with_two_processes_to_the_uninterrupted_result(
        workdir: Path, two_processes) -> None:
    _, straight = two_processes
    write_train_params(workdir, "other.yaml", **TWO_PROCESSES)
    proc = run_train(workdir, popen=True, args=["--params", "other.yaml"])
    point = workdir / "models/resume/last.pt"
    deadline = time.monotonic() + 240
    while not point.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len(ranks) >= 2
    # the launcher builds no model, so it never loads torchvision (1.6 s at start-up); the ranks do
    assert not loads_torchvision(proc.pid) and any(loads_torchvision(r.pid) for r in ranks)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher: its ranks must die with it
    proc.communicate(timeout=30)
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, alive
    epoch = torch.load(point, weights_only=True)["state"]["epoch"]
    assert epoch == 1 and not Path("models/model.pt").exists()

    write_train_params(workdir, "other.yaml", **TWO_PROCESSES, resume=True)
    result = run_train(workdir, args=["--params", "other.yaml"])
    assert result.returncode == 0, result.stderr
    assert "resuming from models/resume/last.pt after epoch 1 of 2" in result.stdout
    resumed = outputs()
    assert resumed.keys() == straight.keys()
    for name, content in straight.items():  # metrics/train.json too: its timings are in reports/train.json
        assert resumed[name] == content, name


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_with_one_line(workdir: Path) -> None:
    write_train_params(workdir, arch="resnet10", epochs=50, batch_size=8, nproc=2, patience=50)
    proc = run_train(workdir, popen=True)
    deadline = time.monotonic() + 120
    ranks: list[psutil.Process] = []
    while len(ranks) < 2 and time.monotonic() < deadline:
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "stages.train" in " ".join(p.cmdline())]
        time.sleep(0.1)
    rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
    while not (workdir / "models/resume/last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # into training
    started = time.monotonic()
    rank1.kill()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert lines == ["error: train: rank 1 of 2 was killed by SIGKILL (out of memory?); the other ranks were "
                     "stopped"], err
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_exits_143(workdir: Path) -> None:
    write_train_params(workdir, arch="resnet10", epochs=50, batch_size=8, nproc=2, patience=50)
    proc = run_train(workdir, popen=True)
    deadline = time.monotonic() + 120
    while not (workdir / "models/resume/last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["terminated"], err
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive
    assert not Path("models/model.pt").exists()
    leftovers = [p for p in Path("models").rglob(".*") if p.name != ".gitignore"]
    assert not leftovers  # temporaries removed on the way out


def test_a_busy_rendezvous_port_is_one_line(workdir: Path, monkeypatch, capsys) -> None:
    write_train_params(workdir, epochs=1, batch_size=8, nproc=2)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        before = children()
        code, lines = stage_result(stage_main("train"), [], capsys)
    assert code == 1
    assert lines == [f"error: MASTER_PORT: port {port} is in use on this machine; choose another, or unset "
                     "MASTER_PORT for a free one"]
    assert not Path("models/resume/last.pt").exists() and not children() - before


def test_more_processes_than_gpus_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(PipelineError, match=r"^train.nproc: 4, but 2 CUDA device\(s\) are visible here "
                                            r"\(CUDA_VISIBLE_DEVICES 0,1\); expected at most 2$"):
        train.check_gpus(torch.device("cuda"), 4)
    train.check_gpus(torch.device("cuda"), 2)
    train.check_gpus(torch.device("cpu"), 4)  # gloo processes on the CPU: any number


def test_a_batch_that_does_not_divide_is_refused_before_any_process_starts(workdir: Path, monkeypatch,
                                                                          capsys) -> None:
    monkeypatch.delenv("MASTER_PORT", raising=False)
    write_train_params(workdir, batch_size=9, nproc=2)
    before = children()
    code, lines = stage_result(stage_main("train"), [], capsys)
    assert code == 1
    assert lines == ["error: params.yaml train.batch_size: 9; expected a multiple of train.nproc (2): the batch is "
                     "global, each process takes an equal share"]
    assert not children() - before


def test_fewer_training_images_than_a_batch_is_refused_with_several_processes(workdir: Path, monkeypatch,
                                                                              capsys) -> None:
    monkeypatch.delenv("MASTER_PORT", raising=False)
    n = len(np.load("data/prepared/train.npy", mmap_mode="r"))
    write_train_params(workdir, batch_size=2 * n, nproc=2)
    before = children()
    code, lines = stage_result(stage_main("train"), [], capsys)
    assert code == 1
    assert lines[0].startswith(f"error: data/prepared/train.npy: {n} training images, fewer than "
                               f"train.batch_size ({2 * n})")
    assert not children() - before


def test_compile_wraps_the_model_but_modes_and_checkpoints_see_the_network() -> None:
    t = dataclasses.replace(load_section(REPO / "params.yaml", Train), compile=True)
    model = build_model("resnet18", "none", len(CLASSES), 32)
    runner = training.wrap(model, t, torch.device("cpu"), distributed.World())
    assert runner is not model and unwrap(runner) is model
    set_train_mode(runner, ["layer1"])  # frozen names are the network's, not `_orig_mod.layer1`
    assert model.training and not model.layer1.training and model.layer2.training
    assert training.wrap(model, dataclasses.replace(t, compile=False), torch.device("cpu"),
                         distributed.World()) is model


def test_torchrun_world_size_must_divide_the_batch(workdir: Path) -> None:
    t = dataclasses.replace(load_section("params.yaml", Train), batch_size=8)
    data = PreparedImages("data/prepared/train.npy")
    training.check_world(data, t, 4)
    with pytest.raises(PipelineError, match=r"^train.batch_size: 8; expected a multiple of the 3 processes"):
        training.check_world(data, t, 3)


def failures(**codes: int) -> dict[int, Any]:
    return {int(rank[1:]): types.SimpleNamespace(exitcode=code) for rank, code in codes.items()}


def test_the_launcher_reports_the_cause_not_the_ranks_it_stopped() -> None:
    with pytest.raises(SystemExit) as exit_:  # rank 1 printed its own error; rank 0 was SIGKILLed by the agent
        distributed.report_failure(failures(r0=-9, r1=1), 2)
    assert exit_.value.code == 1
    with pytest.raises(PipelineError, match=r"^train: rank 1 of 2 was killed by SIGKILL \(out of memory\?\); "):
        distributed.report_failure(failures(r0=-15, r1=-9), 2)
    with pytest.raises(PipelineError, match=r"^train: ranks 0, 1 of 2 were killed by SIGKILL"):
        distributed.report_failure(failures(r0=-9, r1=-9), 2)  # which came first is unknown: both named
    with pytest.raises(PipelineError, match=r"^train: the 2 processes lost each other"):
        distributed.report_failure(failures(r0=3, r1=3), 2)


def disagreeing_rank(rank: int, out: Path) -> None:
    distributed.start(distributed.World(rank, rank, 2), torch.device("cpu"))
    try:
        distributed.agree("data", {"data/prepared/train.npy": "md5-" + str(rank)}, distributed.World(rank, rank, 2))
    except PipelineError as exc:
        out.with_suffix(f".{rank}").write_text(str(exc))
    distributed.stop()


@pytest.mark.slow
def test_ranks_that_read_other_data_stop_in_one_line(tmp_path: Path, monkeypatch) -> None:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.multiprocessing.spawn(disagreeing_rank, args=(tmp_path / "err",), nprocs=2, join=True)
    for rank in (0, 1):
        assert (tmp_path / f"err.{rank}").read_text().startswith(
            "train: rank 1 and rank 0 disagree on the data ({'data/prepared/train.npy': 'md5-1'} against")

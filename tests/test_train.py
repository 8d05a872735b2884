"""The train stage on a tiny demo: one epoch end to end, checkpoints, dvclive logs, exact resume."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import outputs, write_train_params

from cxr14.data.nih import CLASSES
from cxr14.runtime.errors import PipelineError
from cxr14.training import loop as training
from stages import train


def test_one_epoch_writes_checkpoint_metrics_and_logs(workdir: Path) -> None:
    write_train_params(workdir)
    train.main([])
    ckpt = torch.load("models/model.pt", weights_only=True)
    assert ckpt["arch"] == "resnet18" and ckpt["image_size"] == 48 and len(ckpt["classes"]) == 14
    assert ckpt["params"]["lr_head"] == 1e-3 and ckpt["epoch"] == 1
    metrics = json.loads(Path("metrics/train.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["best_epoch"] == 1
    assert 0.0 <= metrics["val_auc"] <= 1.0 and "images_per_second" not in metrics  # a timing: in the report
    assert json.loads(Path("reports/train.json").read_text())["images_per_second"] > 0
    assert metrics["val_auc"] == pytest.approx(ckpt["val_mean_auc"], abs=1e-6)
    logged = Path("dvclive/plots/metrics/val/mean_auc.tsv").read_text().splitlines()
    assert logged[0].split("\t") == ["step", "mean_auc"] and len(logged) == 2
    assert Path("dvclive/plots/metrics/train/loss.tsv").is_file()
    assert Path("dvclive/plots/metrics/lr/head.tsv").is_file()
    point = torch.load("models/resume/last.pt", weights_only=True)  # the resume point, outside DVC's outputs
    assert point["state"]["epoch"] == 1 and point["best_model"] is None  # the latest epoch is the best
    assert all(torch.equal(v, point["model"][k]) for k, v in ckpt["state_dict"].items())
    assert sorted(p.name for p in Path("models").iterdir()) == ["model.pt", "resume"]
    assert sorted(p.name for p in Path("models/resume").iterdir()) == [".gitignore", "last.pt"]


@pytest.mark.parametrize(("ema", "scheduler"), [(0.0, "cosine"), (0.9, "cosine"), (0.0, "onecycle")],
                         ids=["plain", "moving-average", "one-cycle"])
@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_result(workdir: Path, monkeypatch, ema: float,
                                                             scheduler: str) -> None:
    write_train_params(workdir, arch="resnet10", epochs=2, scheduler=scheduler, ema=ema)  # the demo's: the cheapest
    train.main([])
    straight = outputs()
    shutil.rmtree("models"), shutil.rmtree("dvclive")

    real_epoch = training.train_one_epoch
    calls = {"n": 0}

    def killed_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main([])
    assert torch.load("models/resume/last.pt", weights_only=True)["state"]["epoch"] == 1
    assert not Path("models/model.pt").exists() and not Path("dvclive").exists()  # written when training ends
    monkeypatch.setattr(training, "train_one_epoch", real_epoch)
    write_train_params(workdir, arch="resnet10", epochs=2, scheduler=scheduler, resume=True, ema=ema)
    train.main([])
    resumed = outputs()
    assert resumed.keys() == straight.keys()
    for name, content in straight.items():
        if name != "metrics/train.json":  # its seconds and images/s are timings
            assert resumed[name] == content, name  # model.pt and the log: the same bytes
    steps = Path("dvclive/plots/metrics/val/mean_auc.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in steps] == ["step", "0", "1"]


def test_train_state_round_trips_through_the_resume_point(tmp_path: Path) -> None:
    """fit's typed state is stored as the plain dict resume points have always held (same keys, same order),
    loads back with weights_only=True into an equal state, and a foreign one is refused in one line."""
    state = training.TrainState(epoch=3, best_auc=0.75, best_epoch=2, bad_epochs=1, seconds=12.5, images=96,
                                history=[{"train/loss": 0.5, "val/mean_auc": 0.75}, {"train/loss": 0.4}])
    training.save_checkpoint(tmp_path / "last.pt", {"state": state.to_dict()})
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["state"]
    assert list(saved) == ["epoch", "best_auc", "best_epoch", "bad_epochs", "seconds", "images", "history"]
    assert saved["history"][1] == {"train/loss": 0.4} and saved["best_auc"] == 0.75
    restored = training.TrainState.from_dict(saved, tmp_path / "last.pt")
    assert restored == state and restored.history is not state.history
    assert training.TrainState().to_dict() == {"epoch": 0, "best_auc": -1.0, "best_epoch": 0, "bad_epochs": 0,
                                               "seconds": 0.0, "images": 0, "history": []}
    with pytest.raises(PipelineError, match=r"last.pt: state holds \['epoch'\]; expected the keys .* train.resume"):
        training.TrainState.from_dict({"epoch": 1}, tmp_path / "last.pt")


def test_resume_with_other_params_is_refused(workdir: Path) -> None:
    write_train_params(workdir)
    train.main([])
    write_train_params(workdir, lr_head=5e-4, resume=True)
    with pytest.raises(PipelineError, match="models/resume/last.pt was made with other train params"):
        train.main([])


def test_missing_prepared_data_is_a_clear_error(workdir: Path) -> None:
    write_train_params(workdir)
    Path("data/prepared/val.npy").unlink()
    with pytest.raises(PipelineError, match=r"data/prepared/val.npy: cannot open prepared array .* run the prepare"):
        train.main([])


def test_resume_refused_leaves_the_logs_alone(workdir: Path) -> None:
    write_train_params(workdir)
    train.main([])
    logged = Path("dvclive/plots/metrics/val/mean_auc.tsv").read_text()
    write_train_params(workdir, lr_head=5e-4, resume=True)
    with pytest.raises(PipelineError, match="other train params"):
        train.main([])
    assert Path("dvclive/plots/metrics/val/mean_auc.tsv").read_text() == logged


def test_val_without_any_two_sided_class_stops_with_its_cause(workdir: Path) -> None:
    """The seed's failure mode: val mean AUC NaN, no epoch is ever 'better', no model.pt, evaluate confused."""
    write_train_params(workdir)
    table = pd.read_csv("data/split/val.csv")
    table[list(CLASSES)] = 0
    table.to_csv("data/split/val.csv", index=False)
    with pytest.raises(PipelineError, match=r"data/prepared/val.npy: no class has both positive and negative labels "
                                            r"among these \d+ val images, .* undefined; raise split.val_fraction"):
        train.main([])
    assert not Path("models/model.pt").exists()


def test_imagenet_weights_offline_stop_the_stage_with_where_to_put_them(workdir: Path, monkeypatch, tmp_path) -> None:
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    write_train_params(workdir, weights="imagenet")
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(PipelineError) as err:
            train.main([])
    finally:
        torch.hub._hub_dir = None
    assert str(tmp_path / "hub/checkpoints/resnet18-f37072fd.pth") in str(err.value)
    assert "download failed" in str(err.value) and not Path("models").exists()


def test_resume_on_other_data_is_refused(workdir: Path) -> None:
    """The resume point records what it was trained on: another split or other arrays is a one-line refusal."""
    write_train_params(workdir)
    train.main([])
    array = np.load("data/prepared/train.npy")
    array[0, 0, 0] ^= 1
    np.save("data/prepared/train.npy", array)
    write_train_params(workdir, resume=True)
    with pytest.raises(PipelineError, match=r"models/resume/last.pt was trained on other data \("
                                            r"data/prepared/train.npy differs, 1 file\(s\) in all\); "
                                            r"set train.resume: false"):
        train.main([])


# resnet10 (the demo's): fifteen trainings below, the same code whatever the arch, at half resnet18's cost
RECIPE = {"arch": "resnet10", "epochs": 2, "scheduler": "cosine", "lr_head": 3e-3, "lr_backbone": 3e-3, "patience": 5}


@pytest.mark.slow
def test_a_kill_before_any_write_leaves_the_old_outputs_and_resumes_to_the_uninterrupted_result(
        workdir: Path, monkeypatch) -> None:
    """Killed before each write (the resume point every epoch, then model.pt, dvclive/, metrics/train.json):
    the outputs of the previous run stay as they were until the final writes, and a resume gives the
    uninterrupted run's bytes, best epoch and metrics whatever moment the run was killed at."""
    write_train_params(workdir, **RECIPE)
    train.main([])
    straight = outputs()
    straight_metrics = {k: v for k, v in json.loads(straight["metrics/train.json"]).items()
                        if k in ("best_epoch", "val_auc", "epochs_run")}
    writes: list[str] = []
    real = {"resume point": training.save_checkpoint, "model.pt": train.save_checkpoint,
            "dvclive": train.write_log, "train.json": train.write_json}

    def recorder(name, function):
        def record(*args, **kwargs):
            writes.append(name)
            return function(*args, **kwargs)
        return record

    def patch(wrap) -> None:
        monkeypatch.setattr(training, "save_checkpoint", wrap("resume point", real["resume point"]))
        monkeypatch.setattr(train, "save_checkpoint", wrap("model.pt", real["model.pt"]))
        monkeypatch.setattr(train, "write_log", wrap("dvclive", real["dvclive"]))
        monkeypatch.setattr(train, "write_json", wrap("train.json", real["train.json"]))

    shutil.rmtree("models/resume")
    patch(recorder)
    train.main([])
    # train.json twice: reports/train.json (with the timings), then metrics/train.json (without)
    assert writes == ["resume point"] * 2 + ["model.pt", "dvclive", "train.json", "train.json"]
    assert outputs() == straight  # metrics/train.json holds no timing: the same bytes
    patch(lambda name, function: function)
    write_train_params(workdir, **{**RECIPE, "epochs": 1})
    train.main([])  # the previous run's outputs: other weights and a shorter log
    previous = outputs()
    for kill_at in range(len(writes)):
        shutil.rmtree("models/resume")
        calls = {"n": 0}

        def killing(name, function, kill_at=kill_at, calls=calls):
            def kill(*args, **kwargs):
                if calls["n"] == kill_at:
                    raise KeyboardInterrupt  # as a kill just before this write (writes are atomic: during = before)
                calls["n"] += 1
                return function(*args, **kwargs)
            return kill

        patch(killing)
        write_train_params(workdir, **RECIPE)
        with pytest.raises(KeyboardInterrupt):
            train.main([])
        left = outputs()
        finished = writes[:kill_at]
        for name, content in previous.items():
            written = (name == "models/model.pt" and "model.pt" in finished) or \
                      (name.startswith("dvclive") and "dvclive" in finished)
            if not written:
                assert left[name] == content, (kill_at, name)  # the previous run's, untouched
        patch(lambda name, function: function)
        write_train_params(workdir, **RECIPE, resume=True)
        train.main([])
        resumed = outputs()
        assert resumed.keys() == straight.keys(), kill_at
        for name, content in straight.items():
            if name != "metrics/train.json":
                assert resumed[name] == content, (kill_at, name)
        metrics = json.loads(resumed["metrics/train.json"])
        assert {k: metrics[k] for k in straight_metrics} == straight_metrics, kill_at
        for name, content in previous.items():  # the previous run's outputs back, for the next kill point
            Path(name).write_bytes(content)


@pytest.mark.parametrize("ema", [0.0, 0.999999])
def test_the_moving_average_is_what_gets_validated_and_saved(workdir: Path, ema: float) -> None:
    """With a decay near 1 the average stays at the weights after the first step: model.pt must be those, not
    the trained weights; with 0 it is the trained weights themselves."""
    write_train_params(workdir, epochs=3, scheduler="none", ema=ema)  # one step an epoch on the tiny data
    train.main([])
    saved = torch.load("models/model.pt", weights_only=True)["state_dict"]
    point = torch.load("models/resume/last.pt", weights_only=True)
    trained = point["model"]
    moved = max((saved[k].float() - trained[k].float()).abs().max().item() for k in trained if k.endswith("weight"))
    last_is_best = point["state"]["best_epoch"] == 3
    if ema:  # the average of 3 steps at this decay is still the weights after the first: far from the trained ones
        assert moved > 1e-3 and point["ema"]["n_averaged"].item() == 3
        if last_is_best:
            assert all(torch.equal(saved[k], point["ema"][f"module.{k}"].cpu()) for k in saved)
    else:
        assert point["ema"] is None and (moved == 0 or not last_is_best)

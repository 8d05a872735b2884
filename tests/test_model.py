"""Model factory, freezing, loss weights, augmentation: the seed's bugs must stay fixed."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from cxr14.data.loader import augment, to_model_input
from cxr14.evaluation.metrics import mean_auc
from cxr14.model import checkpoint
from cxr14.model import factory as model_mod
from cxr14.model.factory import build_model, freeze, param_groups, set_train_mode
from cxr14.model.inference import Batches, evaluate
from cxr14.runtime.errors import PipelineError
from cxr14.training.loss import loss_function, positive_weights
from cxr14.training.schedules import make_scheduler

NIH_FREEZE = ["conv1", "bn1", "layer1", "layer2", "layer3"]


def test_positive_weights_are_negatives_over_positives() -> None:
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=np.float32)
    w = positive_weights(labels, cap=None)
    assert w.tolist() == pytest.approx([3 / 2, 4 / 1, 1.0])  # no positives: neutral weight
    assert positive_weights(labels, cap=2.0).tolist() == pytest.approx([1.5, 2.0, 1.0])


def test_training_loss_weighs_positives_only() -> None:
    """The seed passed class weights as `weight=`, which scales the negatives' loss too; the loss the train
    stage uses (engine.loss_function) must weigh the positives of a class by negatives/positives, nothing else."""
    labels = np.array([[1, 0], [0, 0], [0, 0], [0, 1]], dtype=np.float32)  # weights 3 and 3
    criterion = loss_function(labels, cap=None)
    logits, target = torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # mean over 4 cells: one positive at 3 log 2, three negatives at log 2 each
    assert criterion(logits, target).item() == pytest.approx((3 + 3) * np.log(2) / 4)
    assert criterion.weight is None


def test_label_smoothing_pulls_targets_toward_one_half() -> None:
    """With smoothing e (and no class weights) a label 1 is fitted best at probability 1 - e/2 and a 0 at e/2,
    so the loss is lowest there (and not at the label itself, as with plain BCE); class weights still apply."""
    labels = np.array([[1, 0], [0, 0], [0, 0], [0, 1]], dtype=np.float32)  # pos_weight 3 and 3, capped at 1
    smooth, plain = loss_function(labels, cap=1.0, smoothing=0.2), loss_function(labels, cap=1.0)
    target = torch.tensor([[1.0, 0.0]])
    best = torch.logit(torch.tensor([[0.9, 0.1]]))
    toward = torch.tensor([[0.3, -0.3]])  # toward the labels 1 and 0
    for candidate in (best + toward, best - toward):  # moving either way from 0.9 / 0.1 costs loss
        assert smooth(candidate, target).item() > smooth(best, target).item()
    assert plain(best + toward, target).item() < plain(best, target).item()  # plain BCE wants 1 and 0
    soft = torch.tensor([[0.9, 0.1]])  # = the smoothed targets, through plain BCE with the same weights
    weighted, weighted_plain = loss_function(labels, cap=None, smoothing=0.2), loss_function(labels, cap=None)
    assert weighted(best, target).item() == pytest.approx(weighted_plain(best, soft).item(), rel=1e-6)
    assert smooth(best, target).item() == pytest.approx(plain(best, soft).item(), rel=1e-6)


def test_one_cycle_warms_up_over_a_quarter_then_anneals_every_step() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr": 2e-3}, {"params": [model.bias], "lr": 1e-3}])
    scheduler = make_scheduler(optimizer, "onecycle", epochs=4, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    head = [lr[0] for lr in lrs]
    assert head[0] == pytest.approx(2e-3 / 25) and max(head) == pytest.approx(2e-3)  # the params' rates are peaks
    assert head.index(max(head)) in (9, 10) and head[-1] < 1e-6  # peak after a quarter of the 40 steps
    assert all(b > a for a, b in zip(head[:9], head[1:10], strict=True))
    assert all(b < a for a, b in zip(head[10:-1], head[11:], strict=True))
    assert lrs[10][1] == pytest.approx(lrs[10][0] / 2)  # each group at its own rate


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "resnet34", "resnet50", "densenet121"])
def test_build_model_has_14_logits(arch: str) -> None:
    model = build_model(arch, "none")
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 14)
    assert model_mod.gradcam_layer(model, arch)[0] == model_mod.ARCHS[arch][2]


def test_frozen_parameters_and_batchnorm_statistics_do_not_change() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "none")
    frozen = freeze(model, NIH_FREEZE)
    assert "layer3.1.bn2" in frozen and "layer4" not in frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(param_groups(model, "resnet18", 1e-2, 1e-2), weight_decay=1e-2)
    for _ in range(3):
        set_train_mode(model, frozen)
        loss = model(torch.randn(4, 3, 64, 64)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        is_frozen = any(key == p or key.startswith(p + ".") for p in NIH_FREEZE)
        if is_frozen:  # weights and running_mean/var/num_batches_tracked alike
            assert torch.equal(value, after[key]), key
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_param_groups_split_head_and_backbone() -> None:
    model = build_model("resnet18", "none")
    freeze(model, NIH_FREEZE)
    groups = param_groups(model, "resnet18", 1e-3, 1e-4)
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert sum(p.numel() for p in groups[0]["params"]) == 512 * 14 + 14
    assert sum(p.numel() for p in groups[1]["params"]) == sum(p.numel() for p in model.layer4.parameters())


def test_checkpoint_round_trip_with_weights_only(tmp_path) -> None:
    """What the train stage saves (save_checkpoint) loads back through load_checkpoint as the same model."""
    model = build_model("resnet18", "none", num_classes=2)
    payload = {"state_dict": model.state_dict(), "arch": "resnet18", "classes": ["A", "B"], "image_size": 128,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
               "params": {"freeze": ["conv1"], "lr_head": 1e-3, "augment": {"crop_scale": [0.9, 1.0]}}}
    checkpoint.save_checkpoint(tmp_path / "model.pt", payload)
    restored, meta = checkpoint.load_checkpoint(tmp_path / "model.pt")
    assert meta["params"] == payload["params"] and meta["image_size"] == 128 and meta["classes"] == ["A", "B"]
    assert not restored.training
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path) -> None:
    """weights_only=True: a checkpoint holding arbitrary Python objects is not unpickled."""
    torch.save({"state_dict": {}, "arch": "resnet18", "hook": PipelineError("x")}, tmp_path / "evil.pt")
    with pytest.raises(PipelineError, match=r"evil.pt: not a readable checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(PipelineError, match=r"missing.pt: no checkpoint; run the train stage"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize(("output_stride", "dilated"), [(16, [False, False, True]), (8, [False, True, True])])
def test_output_stride_equals_torchvision_dilation(output_stride: int, dilated: list[bool]) -> None:
    """torchvision dilates only Bottleneck ResNets; ours must give the same network there, and the same cells."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilated, num_classes=14).eval()
    mine = build_model("resnet50", "none", 14, output_stride).eval()
    mine.load_state_dict(reference.state_dict())  # same parameter names and shapes as the undilated network
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(mine(x), reference(x), atol=1e-6)
    small = build_model("resnet18", "none", 14, output_stride).eval()
    body = torch.nn.Sequential(*list(small.children())[:-2])
    assert body(torch.zeros(1, 3, 96, 96)).shape == (1, 512, 96 // output_stride, 96 // output_stride)


def test_output_stride_is_resnet_only_and_survives_the_checkpoint(tmp_path) -> None:
    with pytest.raises(PipelineError, match="train.output_stride: 4; expected one of 32, 16, 8"):
        build_model("resnet18", "none", 14, 4)
    with pytest.raises(PipelineError, match="train.output_stride: 16 needs a ResNet; densenet121 supports 32 only"):
        build_model("densenet121", "none", 14, 16)
    model = build_model("resnet18", "none", 14, 16).eval()
    payload = {"state_dict": model.state_dict(), "arch": "resnet18", "output_stride": 16,
               "classes": list("ABCDEFGHIJKLMN"), "image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    checkpoint.save_checkpoint(tmp_path / "model.pt", payload)
    restored, _ = checkpoint.load_checkpoint(tmp_path / "model.pt")
    assert restored.layer4[1].conv1.dilation == (2, 2) and restored.layer4[0].conv1.stride == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_unknown_arch_and_weights_are_clear_errors() -> None:
    with pytest.raises(PipelineError, match=r"train.arch: 'resnet51'; expected one of resnet10, resnet18, resnet34"):
        build_model("resnet51")
    with pytest.raises(PipelineError, match=r"train.weights: 'imagenet21k'"):
        build_model("resnet18", "imagenet21k")
    with pytest.raises(PipelineError, match=r"train.weights: imagenet; resnet10 has no ImageNet weights, expected"):
        build_model("resnet10", "imagenet")
    with pytest.raises(PipelineError, match=r"train.weights: IMAGENET1K_V1; resnet10 has no ImageNet weights"):
        model_mod.imagenet_weights("resnet10", "IMAGENET1K_V1")  # what train checks first under torchrun


def test_resnet10_is_resnet18_with_one_block_per_stage() -> None:
    """The demo's backbone: ResNet18's stem, widths and head, half its blocks (about half its compute)."""
    small, large = build_model("resnet10", "none"), build_model("resnet18", "none")
    assert [len(getattr(small, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    second_blocks = tuple(f"layer{i}.1." for i in range(1, 5))
    assert {k: v.shape for k, v in small.state_dict().items()} == {
        k: v.shape for k, v in large.state_dict().items() if not k.startswith(second_blocks)}
    dilated = build_model("resnet10", "none", 14, 8).eval()  # output strides work with one block per stage
    with torch.no_grad():
        assert torch.nn.Sequential(*list(dilated.children())[:-2])(torch.zeros(1, 3, 64, 64)).shape[-1] == 8


def test_freeze_prefix_matching_nothing_is_an_error() -> None:
    model = build_model("resnet18", "none")
    with pytest.raises(PipelineError, match=r"train.freeze: 'layer5' matches no module; expected prefixes of conv1"):
        freeze(model, ["conv1", "layer5"])
    with pytest.raises(PipelineError, match="matches no module"):
        freeze(model, ["layer1.0.bn"])  # a prefix must end at a module boundary


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, at the lowest level urllib reaches: every name lookup fails as it does offline."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_missing_imagenet_weights_offline_fails_and_says_where(tmp_path, monkeypatch) -> None:
    offline(monkeypatch)
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(PipelineError) as err:
            build_model("resnet50", "imagenet")
    finally:
        torch.hub._hub_dir = None  # back to the default (TORCH_HOME) for other tests
    message = str(err.value)
    # imagenet means torchvision's best weights for the arch: IMAGENET1K_V2 for ResNet50, as the seed used
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert "download failed" in message and "\n" not in message
    assert not list((tmp_path / "hub" / "checkpoints").glob("*"))  # no partial file left behind


def test_weights_download_has_a_timeout_and_restores_it(tmp_path, monkeypatch) -> None:
    """Offline networks that drop packets never answer: the download must give up after DOWNLOAD_TIMEOUT."""
    seen = {}

    def stalled(url, dst, hash_prefix=None, progress=True):
        seen.update(timeout=socket.getdefaulttimeout(), url=url, hash=hash_prefix, progress=progress)
        raise TimeoutError("timed out")

    monkeypatch.setattr(torch.hub, "download_url_to_file", stalled)
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(PipelineError, match="download failed"):
            build_model("resnet18", "IMAGENET1K_V1")
    finally:
        torch.hub._hub_dir = None
    assert seen == {"timeout": model_mod.DOWNLOAD_TIMEOUT, "url": model_mod.weights_file("resnet18")[1],
                    "hash": "f37072fd", "progress": True}
    assert socket.getdefaulttimeout() is None


def test_imagenet_names_resolve_per_arch() -> None:
    assert model_mod.imagenet_weights("resnet50", "imagenet").name == "IMAGENET1K_V2"
    assert model_mod.imagenet_weights("resnet50", "IMAGENET1K_V1").name == "IMAGENET1K_V1"
    assert model_mod.imagenet_weights("resnet18", "imagenet").name == "IMAGENET1K_V1"
    with pytest.raises(PipelineError, match="train.weights: IMAGENET1K_V2 does not exist for resnet18"):
        model_mod.imagenet_weights("resnet18", "IMAGENET1K_V2")


def test_imagenet_weights_load_from_the_cache(tmp_path) -> None:
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        path, _ = model_mod.weights_file("resnet18")
        path.parent.mkdir(parents=True)
        reference = build_model("resnet18", "none", num_classes=1000)
        torch.save(reference.state_dict(), path)
        loaded = build_model("resnet18", "imagenet")
    finally:
        torch.hub._hub_dir = None
    assert torch.equal(loaded.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert loaded.fc.out_features == 14


def test_mean_auc_skips_classes_without_both_labels() -> None:
    labels = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]])
    probs = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.1], [0.6, 0.2, 0.3], [0.4, 0.4, 0.9]])
    mean, per_class = mean_auc(labels, probs)
    assert per_class[0] == 1.0 and per_class[1] is None and per_class[2] == pytest.approx(0.5)
    assert mean == pytest.approx(0.75)


def test_to_model_input_normalises_like_imagenet() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    x = to_model_input(images)
    assert x.shape == (2, 3, 1, 1)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rel=1e-5)
    assert x[1, :, 0, 0].tolist() == pytest.approx([0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], rel=1e-5)
    buffer = torch.empty(2, 3, 1, 1)
    assert to_model_input(images, out=buffer).data_ptr() == buffer.data_ptr()


def test_batches_are_new_tensors_unless_reuse_is_asked_for() -> None:
    """A caller keeping a batch must not see it overwritten by the next one (reuse is the loops' opt-in)."""
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    fresh = Batches(torch.device("cpu"))
    first = fresh(images)
    kept = first.clone()
    fresh(images + 255)
    assert torch.equal(first, kept)
    reused = Batches(torch.device("cpu"), reuse=True)
    a = reused(images)
    b = reused(images + 255)
    assert a.data_ptr() == b.data_ptr() and torch.equal(a, b)


def test_channels_last_batches_are_written_so_in_their_reused_buffer() -> None:
    """Training asks for channels_last on every device (cxr14.training.loop.fit): the normalisation writes that layout
    itself (no second copy per batch), with the default layout's values, and the buffer is still reused."""
    images = torch.randint(0, 256, (2, 1, 5, 4), dtype=torch.uint8)
    plain = Batches(torch.device("cpu"))(images)
    assert plain.is_contiguous()  # the CPU default: evaluate, explain and export see what they always saw
    nhwc = Batches(torch.device("cpu"), reuse=True, channels_last=True)
    a = nhwc(images)
    assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
    assert torch.equal(a, plain)
    b = nhwc(images)
    assert b.data_ptr() == a.data_ptr() and b.is_contiguous(memory_format=torch.channels_last)


def test_evaluate_refuses_non_finite_outputs() -> None:
    """A diverged model (NaN logits) must stop training with its cause, not give a NaN AUC that never improves."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))  # 3 channels x 4 x 4
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    batch = (torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 2))
    with pytest.raises(PipelineError, match="not finite .* lower train.lr_head"):
        evaluate(model, [batch], torch.nn.BCEWithLogitsLoss(), Batches(torch.device("cpu")))


def test_augment_flip_and_identity() -> None:
    images = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(8, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(images, g), images)  # all off: untouched
    flipped = augment(images, g, hflip=1.0)
    assert torch.allclose(flipped, images.flip(-1), atol=1e-4)
    rotated = augment(images, torch.Generator().manual_seed(1), rotate=10.0, crop_scale=(0.8, 1.0))
    again = augment(images, torch.Generator().manual_seed(1), rotate=10.0, crop_scale=(0.8, 1.0))
    assert rotated.shape == images.shape and torch.equal(rotated, again) and not torch.equal(rotated, images)


def test_checkpoint_bytes_do_not_depend_on_the_file_name(tmp_path) -> None:
    """dvc.lock records the checkpoint's hash: equal runs must write equal bytes (torch.save names the zip after
    the file it writes to, and atomic writes go through random temporary names)."""
    payload = {"state_dict": build_model("resnet18", "none").state_dict(), "arch": "resnet18"}
    checkpoint.save_checkpoint(tmp_path / "a.pt", payload)
    checkpoint.save_checkpoint(tmp_path / "other_name.pt", payload)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other_name.pt").read_bytes()


def test_cpu_kernels_are_capped_at_avx2_unless_native_or_the_user_chose(monkeypatch) -> None:
    """AVX-512 and AVX2 oneDNN kernels round differently: train.cpu_kernels avx2 pins AVX2 so x86-64 machines agree."""
    from cxr14.runtime.devices import cpu_kernels

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu_kernels("native")
    assert "ONEDNN_MAX_CPU_ISA" not in os.environ
    cpu_kernels("avx2")
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    cpu_kernels("avx2")
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"


def test_freezing_the_new_head_is_refused() -> None:
    model = build_model("resnet18", "none")
    with pytest.raises(PipelineError, match=r"train.freeze: \['layer1', 'fc'\] freezes the new head 'fc'"):
        freeze(model, ["layer1", "fc"])
    with pytest.raises(PipelineError, match="freezes the new head 'classifier'"):
        freeze(build_model("densenet121", "none"), ["features", "classifier"])


def test_a_foreign_checkpoint_is_a_one_line_error(tmp_path) -> None:
    good = build_model("resnet18", "none")
    payload = {"state_dict": good.state_dict(), "arch": "resnet99", "classes": list("ABCDEFGHIJKLMN"),
               "image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    checkpoint.save_checkpoint(tmp_path / "arch.pt", payload)
    with pytest.raises(PipelineError, match=r"arch.pt: checkpoint does not describe a model .*resnet99"):
        checkpoint.load_checkpoint(tmp_path / "arch.pt")
    checkpoint.save_checkpoint(tmp_path / "shape.pt", {**payload, "arch": "resnet34"})
    with pytest.raises(PipelineError, match=r"shape.pt: checkpoint does not describe a model"):
        checkpoint.load_checkpoint(tmp_path / "shape.pt")


def test_params_choices_match_what_the_model_factory_builds() -> None:
    """The schema's Literals and the factory's tables name the same archs, weights and strides."""
    import typing

    from cxr14.params import Train

    hints = typing.get_type_hints(Train)
    assert set(typing.get_args(hints["arch"])) == set(model_mod.ARCHS)
    assert set(typing.get_args(hints["weights"])) == set(model_mod.WEIGHTS)
    assert set(typing.get_args(hints["output_stride"])) == set(model_mod.OUTPUT_STRIDES)

"""Model factory, freezing, loss weights, augmentation: the seed's bugs must stay fixed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cxr14 import model as model_mod
from cxr14.common import PipelineError
from cxr14.data import augment, to_model_input
from cxr14.engine import mean_auc, positive_weights
from cxr14.model import build_model, freeze, param_groups, set_train_mode
from stages.train import check_params

NIH_FREEZE = ["conv1", "bn1", "layer1", "layer2", "layer3"]


def test_positive_weights_are_negatives_over_positives() -> None:
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=np.float32)
    w = positive_weights(labels, cap=None)
    assert w.tolist() == pytest.approx([3 / 2, 4 / 1, 1.0])  # no positives: neutral weight
    assert positive_weights(labels, cap=2.0).tolist() == pytest.approx([1.5, 2.0, 1.0])


def test_loss_uses_pos_weight_not_weight() -> None:
    # The seed passed class weights as `weight=`: that scales negatives too. pos_weight scales positives only.
    logits, target = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    loss = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 3.0]), reduction="none")(logits, target)
    assert loss[0, 0].item() == pytest.approx(3 * np.log(2)) and loss[0, 1].item() == pytest.approx(np.log(2))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "densenet121"])
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
    model = build_model("resnet18", "none")
    payload = {"state_dict": model.state_dict(), "arch": "resnet18", "classes": ["A", "B"], "image_size": 128,
               "mean": [0.485, 0.456, 0.406], "params": {"freeze": ["conv1"], "lr_head": 1e-3, "augment": {}}}
    torch.save(payload, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    restored = build_model(loaded["arch"], "none")
    restored.load_state_dict(loaded["state_dict"])
    assert loaded["params"] == payload["params"] and loaded["image_size"] == 128
    x = torch.randn(1, 3, 64, 64)
    model.eval(), restored.eval()
    assert torch.equal(model(x), restored(x))


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
    torch.save(payload, tmp_path / "model.pt")
    restored, _ = model_mod.load_checkpoint(tmp_path / "model.pt")
    assert restored.layer4[1].conv1.dilation == (2, 2) and restored.layer4[0].conv1.stride == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_unknown_arch_and_weights_are_clear_errors() -> None:
    with pytest.raises(PipelineError, match=r"train.arch: 'resnet51'; expected one of resnet18, resnet34"):
        build_model("resnet51")
    with pytest.raises(PipelineError, match=r"train.weights: 'imagenet21k'"):
        build_model("resnet18", "imagenet21k")


def test_freeze_prefix_matching_nothing_is_an_error() -> None:
    model = build_model("resnet18", "none")
    with pytest.raises(PipelineError, match=r"train.freeze: 'layer5' matches no module; expected prefixes of conv1"):
        freeze(model, ["conv1", "layer5"])
    with pytest.raises(PipelineError, match="matches no module"):
        freeze(model, ["layer1.0.bn"])  # a prefix must end at a module boundary


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr_head", 0.0, "train.lr_head: 0.0; expected a positive number"),
        ("lr_backbone", -1e-4, "train.lr_backbone: -0.0001; expected a positive number"),
        ("epochs", 0, "train.epochs: 0; expected a positive integer"),
        ("scheduler", "step", "train.scheduler: 'step'"),
    ],
)
def test_bad_train_params_are_clear_errors(key: str, value, message: str) -> None:
    params = {"lr_head": 1e-3, "lr_backbone": 1e-4, "epochs": 1, "batch_size": 8, "patience": 1,
              "scheduler": "none", "freeze": []}
    params[key] = value
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_params(params)


def test_missing_imagenet_weights_offline_is_fast_and_says_where(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        start = time.perf_counter()
        with pytest.raises(PipelineError) as err:
            build_model("resnet50", "imagenet")
        assert time.perf_counter() - start < 5
    finally:
        torch.hub._hub_dir = None  # back to the default (TORCH_HOME) for other tests
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message


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
    from stages.train import save

    payload = {"state_dict": build_model("resnet18", "none").state_dict(), "arch": "resnet18"}
    save(tmp_path / "a.pt", payload)
    save(tmp_path / "other_name.pt", payload)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other_name.pt").read_bytes()

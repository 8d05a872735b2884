"""Heatmaps from the exported model: the ONNX graph's `cam` output, resampled and normalised in numpy, equals the
PyTorch Grad-CAM that the torch engine and the explain stage draw (within 1e-4 after normalisation).

Two steps, so that four exports (a minute on this CPU) are not needed: the closed form the export puts into the
graph (`last_block_maps`) against autograd Grad-CAM on every arch, and one exported model's heatmaps through both
predict engines. `tests/test_export.py::test_onnx_engine_never_imports_torch` runs --gradcam without PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import built_once
from PIL import Image

from cxr14.data.loader import to_model_input
from cxr14.data.nih import CLASSES
from cxr14.deployment.predict import OnnxEngine, TorchEngine
from cxr14.explanation.gradcam import GradCAM, last_block_maps
from cxr14.explanation.heatmaps import normalise, resample
from cxr14.model.factory import build_model, gradcam_layer
from cxr14.runtime.errors import PipelineError

SIZE = 64  # layer4 is 2 x 2 cells at output stride 32, 4 x 4 at 16: maps with a shape to compare


@pytest.mark.parametrize(("arch", "output_stride"), [("resnet10", 32), ("resnet18", 32), ("resnet50", 32),
                                                     ("densenet121", 32), ("resnet18", 16), ("resnet50", 8)])
def test_closed_form_grad_cam_equals_autograd_grad_cam(arch: str, output_stride: int) -> None:
    """What the exported graph computes, resampled and normalised as predict's onnx engine does it (numpy),
    against GradCAM (hooks, autograd, torch resampling) on the default layer, for every class."""
    torch.manual_seed(0)
    model = build_model(arch, "none", len(CLASSES), output_stride).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with GradCAM(model, gradcam_layer(model, arch)[1]) as cam:
        probs, expected = cam(x, list(range(len(CLASSES))))
        geometry = cam.geometry((SIZE, SIZE))
    with torch.no_grad():
        logits, cells, _ = last_block_maps(model, x)
        assert torch.equal(logits, model(x))  # the same forward pass as the model's own
    got = normalise(resample(cells.numpy(), (SIZE, SIZE), *geometry))
    assert np.abs(got - expected.numpy()).max() < 1e-4
    shaped = got.max(axis=(2, 3)) > got.min(axis=(2, 3))
    assert shaped.sum() >= 7  # of 14: enough maps with a shape (not all-zero) for the comparison to mean something
    if arch == "densenet121":  # plain CAM (classifier weights only) is not Grad-CAM of denseblock4: the ReLU's share
        weights = model.classifier.weight
        with torch.no_grad():
            block = model.features[:-1](x)
            plain = torch.relu(torch.einsum("ck,bkhw->bchw", weights, block)).numpy()
        assert np.abs(normalise(resample(plain, (SIZE, SIZE), *geometry)) - expected.numpy()).max() > 0.05


def build_cam_model(folder: Path) -> None:
    """A random resnet10 at 64 px, layer4 dilated (output stride 16: 4 x 4 cells), its checkpoint, ONNX export
    (no calibrator; thresholds 0.5) and three images."""
    from cxr14.deployment.export import export_onnx, metadata

    torch.manual_seed(0)
    model = build_model("resnet10", "none", len(CLASSES), 16).eval()
    ckpt = {"state_dict": model.state_dict(), "arch": "resnet10", "classes": list(CLASSES), "image_size": SIZE,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "output_stride": 16}
    torch.save(ckpt, folder / "model.pt")
    thresholds = dict.fromkeys(CLASSES, 0.5)
    (folder / "thresholds.json").write_text(json.dumps({"metadata": {}, "thresholds": thresholds}))
    export_onnx(model, ckpt, metadata(ckpt, thresholds, None, "test"), folder / "model.onnx", 20)
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    for i, shape in enumerate([(100, 80), (64, 64), (90, 120)]):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / "images" / f"img{i}.png")


@pytest.fixture(scope="module")
def cam_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_once(tmp_path_factory, "cam_model", build_cam_model)


def test_onnx_heatmaps_equal_the_torch_engines(cam_model: Path) -> None:
    """Both predict engines on the same images and classes: the exported file's heatmaps (numpy, no PyTorch) are
    the checkpoint's Grad-CAM within 1e-4, cell geometry included (output stride 16)."""
    onnx = OnnxEngine(cam_model / "model.onnx", "cpu")
    images = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    alone = onnx.gradcam(images, [[0, 5]] * 3)  # without want_heatmaps: a run of its own for the cells
    onnx.want_heatmaps("auto", "--layer")
    assert onnx.meta["cam"] == {"output": "cam", "layer": "layer4", "cells": [4, 4], "stride": [16.0, 16.0],
                                "offset": [0.0, 0.0]}
    reference = TorchEngine(cam_model / "model.pt", "cpu", "--device", None, "auto", "--layer")
    chosen = [list(range(len(CLASSES)))] * len(images)
    probs = onnx.probabilities(images)
    assert np.abs(probs - reference.probabilities(images)).max() < 1e-5
    got, expected = np.array(onnx.gradcam(images, chosen)), np.array(reference.gradcam(images, chosen))
    assert got.shape == expected.shape == (3, len(CLASSES), SIZE, SIZE)
    assert np.abs(got - expected).max() < 1e-4 and np.array_equal(np.array(alone), got[:, [0, 5]])
    assert (got.max(axis=(2, 3)) > got.min(axis=(2, 3))).sum() >= 21  # of 42 maps: most have a shape
    x = to_model_input(torch.from_numpy(images)[:, None].float())
    with torch.no_grad():  # and the map is the image's: another image's cells would not match
        _, cells, _ = last_block_maps(reference.model, x.flip(-1))
    flipped = normalise(resample(cells.numpy(), (SIZE, SIZE), (16.0, 16.0), (0.0, 0.0)))
    assert np.abs(flipped - expected).max() > 0.1


def test_onnx_engine_refuses_heatmaps_it_cannot_draw(cam_model: Path) -> None:
    engine = OnnxEngine(cam_model / "model.onnx", "cpu")
    with pytest.raises(PipelineError, match=r"^params.yaml explain.layer: layer3; the exported model carries Grad-CAM "
                                            r"of layer4 only \(auto\): use --engine torch for another layer$"):
        engine.want_heatmaps("layer3", "params.yaml explain.layer")
    engine.cam = None  # a file exported before the cam output existed
    with pytest.raises(PipelineError, match=r"--gradcam: .*model.onnx has no 'cam' output \(exported before "
                                            r"heatmaps were\); run the export stage again"):
        engine.want_heatmaps("auto", "--layer")

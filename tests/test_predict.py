"""Grad-CAM and the predict command: heatmap shape and range, hooks released, margins, per-file errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages import predict
from stages.gradcam import GradCAM
from stages.model import build_model, gradcam_layer
from stages.nih import CLASSES

NIH_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "nih" / "images"


def test_heatmaps_have_input_shape_and_unit_range() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "none").eval()
    with GradCAM(model, gradcam_layer(model, "resnet18")) as cam:
        probs, maps = cam(torch.randn(3, 3, 64, 64), [0, 5])
    assert probs.shape == (3, 14) and maps.shape == (3, 2, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1 and torch.allclose(maps.amax(dim=(2, 3)), torch.ones(3, 2))


def test_hooks_are_released_after_every_use() -> None:
    model = build_model("resnet18", "none").eval()
    layer = gradcam_layer(model, "resnet18")
    before = (len(layer._forward_hooks), len(layer._backward_hooks))
    for _ in range(100):
        with GradCAM(model, layer) as cam:
            cam(torch.randn(1, 3, 32, 32), [1])
    assert (len(layer._forward_hooks), len(layer._backward_hooks)) == before
    assert not any(len(m._forward_hooks) for m in model.modules())


def test_margins_by_hand() -> None:
    assert predict.margins(0.8, 0.6) == ("POS", pytest.approx(0.2), pytest.approx(0.5))  # 0.2 / 0.4
    assert predict.margins(0.3, 0.6) == ("NEG", pytest.approx(-0.3), pytest.approx(-0.5))  # -0.3 / 0.6
    assert predict.margins(0.6, 0.6) == ("POS", 0.0, 0.0)
    assert predict.margins(0.5, None) == ("n/a", None, None)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", "none")
    torch.save({"state_dict": model.state_dict(), "arch": "resnet18", "classes": list(CLASSES), "image_size": 64,
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, tmp_path / "model.pt")
    thresholds = {c: 0.5 for c in CLASSES}
    thresholds["Hernia"] = None
    (tmp_path / "thresholds.json").write_text(json.dumps({"metadata": {}, "thresholds": thresholds}))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.new("RGBA", (120, 90), (90, 90, 90, 255)).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def test_predict_json_gradcam_and_a_broken_file(artifacts: Path, capsys) -> None:
    args = [str(artifacts / n) for n in ("a.png", "broken.png", "b.png")]
    with pytest.raises(SystemExit) as exit_info:
        predict.main([*args, "--model", str(artifacts / "model.pt"), "--thresholds", str(artifacts / "thresholds.json"),
                      "--calibrator", str(artifacts / "none.json"), "--json", "--gradcam", str(artifacts / "cam")])
    assert exit_info.value.code == 1
    out = capsys.readouterr()
    results = json.loads(out.out)
    assert [Path(r["image"]).name for r in results] == ["a.png", "b.png"]  # the broken file did not stop the others
    assert "broken.png: cannot decode image" in out.err
    rows = results[0]["predictions"]
    assert [r["class"] for r in rows] == list(CLASSES)
    for r in rows:
        if r["threshold"] is None:
            assert r["decision"] == "n/a"
        else:
            assert r["decision"] == ("POS" if r["calibrated"] >= 0.5 else "NEG")
            assert r["margin"] == pytest.approx(r["calibrated"] - 0.5)
    for result in results:
        positives = [r["class"] for r in result["predictions"] if r["decision"] == "POS"]
        names = [Path(p).name for p in result["gradcam"]]
        stem = Path(result["image"]).stem
        assert names == [f"{stem}_{c}.png" for c in positives] or (not positives and len(names) == 1)
        assert all((artifacts / "cam" / n).is_file() for n in names)


@pytest.mark.skipif(not NIH_IMAGES.is_dir(), reason="needs ../shared/nih")
def test_predict_reads_real_rgba_nih_images(artifacts: Path, capsys) -> None:
    files = [str(NIH_IMAGES / n) for n in ("00000004_000.png", "00000100_000.png")]  # RGBA in NIH
    predict.main([*files, "--model", str(artifacts / "model.pt"), "--thresholds", str(artifacts / "thresholds.json"),
                  "--calibrator", str(artifacts / "none.json")])
    out = capsys.readouterr().out
    assert out.count("Atelectasis") == 2 and "00000100_000.png" in out

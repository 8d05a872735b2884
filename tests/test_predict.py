"""Grad-CAM and the predict command: heatmap shape and range, hooks released, margins, per-file errors."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import project_params
from PIL import Image

from cxr14 import cli
from cxr14.data.nih import CLASSES
from cxr14.deployment import predict
from cxr14.explanation.gradcam import GradCAM, resample
from cxr14.explanation.localisation import peak
from cxr14.model.factory import build_model, gradcam_layer
from cxr14.runtime.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
NIH_IMAGES = REPO.parent / "shared" / "nih" / "images"


def test_heatmaps_have_input_shape_and_unit_range() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "none").eval()
    with GradCAM(model, gradcam_layer(model, "resnet18")[1]) as cam:
        probs, maps = cam(torch.randn(3, 3, 64, 64), [0, 5])
    assert probs.shape == (3, 14) and maps.shape == (3, 2, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1 and torch.allclose(maps.amax(dim=(2, 3)), torch.ones(3, 2))


def forward_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_are_released_after_every_use() -> None:
    model = build_model("resnet18", "none").eval()
    layer = gradcam_layer(model, "resnet18")[1]
    assert forward_hooks(model) == 0
    for i in range(100):
        if i % 2:
            with GradCAM(model, layer) as cam:
                assert forward_hooks(model) > 1  # the layer's hook and the strided ops' recorders
                cam(torch.randn(1, 3, 32, 32), [1])
        else:  # without `with`: release() removes them
            cam = GradCAM(model, layer).__enter__()
            assert forward_hooks(model) > 1
            cam(torch.randn(1, 3, 32, 32), [1])
            cam.release()
        assert forward_hooks(model) == 0 and cam.activations is None
    cam.release()  # twice is safe
    model(torch.randn(1, 3, 32, 32))
    assert forward_hooks(model) == 0 and cam.activations is None  # nothing is listening any more


@pytest.mark.parametrize(("arch", "layer", "output_stride", "stride", "offset"), [
    ("resnet18", "layer4", 32, 32, 0.0),  # every strided op pads (k - 1)/2: cell j sits on pixel 32j
    ("resnet18", "layer3", 32, 16, 0.0),
    ("resnet18", "layer4", 16, 16, 0.0),  # dilated layer4: no stride of its own
    ("resnet50", "layer4", 8, 8, 0.0),
    ("densenet121", "features.denseblock4", 32, 32, 14.0),  # 2x2 average-pool transitions: 2 + 4 + 8
])
def test_cell_geometry_by_hand(arch: str, layer: str, output_stride: int, stride: int, offset: float) -> None:
    model = build_model(arch, "none", 14, output_stride).eval()
    with GradCAM(model, gradcam_layer(model, arch, layer)[1]) as cam:
        cam(torch.randn(1, 3, 64, 64), [0])
        assert cam.geometry((64, 64)) == ((stride, stride), (offset, offset))


def test_resample_puts_each_cell_on_its_pixel() -> None:
    cells = torch.zeros(1, 1, 3, 4)
    cells[0, 0, 1, 2] = 1.0
    out = resample(cells, (96, 128), (32.0, 32.0), (0.0, 0.0))[0, 0]
    assert out.shape == (96, 128) and out[32, 64] == 1.0 and out.max() == 1.0
    assert out[32, 80] == pytest.approx(0.5) and out[48, 64] == pytest.approx(0.5)  # half-way to the next cell
    shifted = resample(cells, (96, 128), (32.0, 32.0), (14.0, 14.0))[0, 0]
    assert shifted[46, 78] == 1.0 and shifted[32, 64] < 1.0


@pytest.mark.parametrize(("arch", "layer", "size", "places"), [
    ("resnet18", "layer4", 96, [0.5, 32.5, 64.5]),  # 3 x 3 cells on pixels 0, 32, 64
    ("resnet18", "layer3", 64, [0.5, 16.5, 32.5, 48.5]),
    # cells on 14, 46, 78: pixels 0-14 all hold the first cell's value, and the peak is the first pixel of a tie
    ("densenet121", "features.denseblock4", 96, [0.5, 46.5, 78.5]),
])
def test_peak_points_are_where_any_heatmap_peaks(arch: str, layer: str, size: int, places: list[float]) -> None:
    model = build_model(arch, "none").eval()
    with GradCAM(model, gradcam_layer(model, arch, layer)[1]) as cam:
        cam(torch.randn(1, 3, size, size), [0])
        points = cam.peak_points((size, size))
        assert points == sorted((x, y) for y in places for x in places)
        n = len(places)
        maps = resample(torch.rand(200, 1, n, n), (size, size), *cam.geometry((size, size)))
    assert all(peak(m[0].numpy()) in points for m in maps)  # 200 random maps: every peak is one of them


def test_margins_by_hand() -> None:
    assert predict.margins(0.8, 0.6) == ("POS", pytest.approx(0.2), pytest.approx(0.5))  # 0.2 / 0.4
    assert predict.margins(0.3, 0.6) == ("NEG", pytest.approx(-0.3), pytest.approx(-0.5))  # -0.3 / 0.6
    assert predict.margins(0.6, 0.6) == ("POS", 0.0, 0.0)
    assert predict.margins(0.5, None) == ("n/a", None, None)


def test_margins_at_thresholds_of_one_and_zero() -> None:
    # Regression: (p - t) / (1 - t) divided by zero at t = 1, p = 1 (an isotonic calibrator's top plateau).
    assert predict.margins(1.0, 1.0) == ("POS", 0.0, 0.0)
    assert predict.margins(0.7, 1.0) == ("NEG", pytest.approx(-0.3), pytest.approx(-0.3))  # -0.3 / 1
    assert predict.margins(0.0, 1.0) == ("NEG", -1.0, -1.0)
    assert predict.margins(0.3, 0.0) == ("POS", 0.3, 0.3)  # every p is positive at t = 0: relative margin p
    assert predict.margins(0.0, 0.0) == ("POS", 0.0, 0.0)
    assert predict.margins(1.0, 0.0) == ("POS", 1.0, 1.0)


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
        cli.predict_main([*args, "--model", str(artifacts / "model.pt"), "--thresholds",
                          str(artifacts / "thresholds.json"), "--calibrator", str(artifacts / "none.json"), "--json",
                          "--gradcam", str(artifacts / "cam")])
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


def test_predict_with_thresholds_of_one_and_zero(artifacts: Path, capsys) -> None:
    # Regression: a class calibrated onto 1.0 with a threshold of 1.0 (isotonic + max F1) crashed predict.
    thresholds = {c: 0.5 for c in CLASSES} | {"Mass": 1.0, "Nodule": 1.0, "Edema": 0.0}
    (artifacts / "thresholds.json").write_text(json.dumps({"metadata": {}, "thresholds": thresholds}))
    top = {"x": [0.0, 1.0], "y": [1.0, 1.0]}  # isotonic plateau at 1.0: every probability becomes 1.0
    params = dict.fromkeys(CLASSES) | {"Mass": top}
    (artifacts / "calibrator.json").write_text(json.dumps({"method": "isotonic", "split": "val", "params": params}))
    params_file = project_params(artifacts / "params.yaml", {"train": {"device": "cpu"}})
    cli.predict_main([str(artifacts / "a.png"), "--model", str(artifacts / "model.pt"), "--params",
                  str(params_file), "--thresholds", str(artifacts / "thresholds.json"),
                  "--calibrator", str(artifacts / "calibrator.json"), "--json"])  # returns: exit code 0
    out = capsys.readouterr()
    assert out.err == ""  # no traceback, no error
    rows = {r["class"]: r for r in json.loads(out.out)[0]["predictions"]}
    mass, nodule, edema = rows["Mass"], rows["Nodule"], rows["Edema"]
    assert (mass["calibrated"], mass["decision"], mass["margin"], mass["relative_margin"]) == (1.0, "POS", 0.0, 0.0)
    assert nodule["calibrated"] == nodule["probability"] < 1.0 and nodule["decision"] == "NEG"
    assert nodule["relative_margin"] == pytest.approx(nodule["calibrated"] - 1.0)
    assert edema["decision"] == "POS" and edema["relative_margin"] == pytest.approx(edema["calibrated"])


@pytest.mark.skipif(not NIH_IMAGES.is_dir(), reason="needs ../shared/nih")
def test_predict_reads_real_rgba_nih_images(artifacts: Path, capsys) -> None:
    files = [str(NIH_IMAGES / n) for n in ("00000004_000.png", "00000100_000.png")]  # RGBA in NIH
    cli.predict_main([*files, "--model", str(artifacts / "model.pt"), "--thresholds",
                      str(artifacts / "thresholds.json"), "--calibrator", str(artifacts / "none.json")])
    out = capsys.readouterr().out
    assert out.count("Atelectasis") == 2 and "00000100_000.png" in out


def squares(n: int, rng: np.random.Generator, size: int = 32, side: int = 6) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Noise images; half carry one bright square at a random place (the planted finding, with its box)."""
    x = torch.from_numpy(rng.normal(0, 0.3, (n, 1, size, size)).astype(np.float32))
    y, boxes = torch.zeros(n, 1), []
    for i in range(n):
        if i % 2:
            r, c = rng.integers(0, size - side, 2)
            x[i, 0, r:r + side, c:c + side] += 1.5
            y[i] = 1
            boxes.append((float(c), float(r), float(side), float(side)))
        else:
            boxes.append(None)
    return x, y, boxes


def test_heatmap_peaks_inside_the_planted_box_of_a_trained_tiny_model() -> None:
    from cxr14.explanation.localisation import inside, peak

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    layers = [torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
              torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        x, y, _ = squares(32, rng)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, y, boxes = squares(40, np.random.default_rng(1))
    with GradCAM(model, layers[4]) as cam:  # the last conv block: 16x16 cells on 32 px
        probs, maps = cam(x, [0])
    assert ((probs[:, 0] > 0.5).float() == y[:, 0]).float().mean() > 0.95  # it learned the task
    hits = [inside(peak(maps[i, 0].numpy()), box) for i, box in enumerate(boxes) if box is not None]
    assert len(hits) == 20 and np.mean(hits) >= 0.9
    # a wrong orientation (transposed map) would miss: the test can fail
    flipped = [inside(peak(maps[i, 0].numpy().T[::-1]), box) for i, box in enumerate(boxes) if box is not None]
    assert np.mean(flipped) < 0.5


def test_overlay_draws_heat_box_and_legend(tmp_path: Path) -> None:
    from cxr14.explanation.heatmaps import overlay

    heat = np.zeros((32, 32), dtype=np.float32)
    heat[8, 24] = 1.0  # the peak, inside the box below
    overlay(np.full((32, 32), 100, dtype=np.uint8), heat, "TP Mass: a.png\np=0.900, t=0.500", tmp_path / "o.png",
            boxes=[(20, 4, 8, 8)])
    image = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    top = 8 + 16 * 2  # two title lines above the picture; the picture is 10x (320 px)
    assert image.shape == (top + 320 + 8, 320 + 64, 3)
    peak, cold = image[top + 85, 245], image[top + 300, 20]
    assert peak[0] > peak[2] + 50 and cold[2] > cold[0] + 20  # red at the peak, blue far from it
    assert (image[top + 40, 200:280] > 240).all()  # the box's top edge, white, at y = 4 * 10


def test_predict_params_named_but_missing_is_an_error(artifacts: Path) -> None:
    with pytest.raises(PipelineError, match=r"nowhere.yaml: not found"):
        cli.predict([str(artifacts / "a.png"), *own_files(artifacts), "--params", str(artifacts / "nowhere.yaml")])


def test_predict_bad_layer_names_where_it_came_from(artifacts: Path) -> None:
    params_file = project_params(artifacts / "layer.yaml", {"explain": {"layer": "layer9"}})
    with pytest.raises(PipelineError, match=r"layer.yaml explain.layer: Grad-CAM layer 'layer9' is no module"):
        cli.predict([str(artifacts / "a.png"), *own_files(artifacts), "--params", str(params_file)])
    with pytest.raises(PipelineError, match=r"^--layer: Grad-CAM layer 'layer7'"):
        cli.predict([str(artifacts / "a.png"), *own_files(artifacts), "--params", str(params_file),
                     "--layer", "layer7"])


def own_files(artifacts: Path) -> list[str]:
    """The test's model and thresholds, never the repo's models/ (absent on a fresh clone)."""
    return ["--model", str(artifacts / "model.pt"), "--thresholds", str(artifacts / "thresholds.json"),
            "--calibrator", str(artifacts / "none.json")]


def test_console_commands_print_their_help(capsys: pytest.CaptureFixture) -> None:
    """Each `[project.scripts]` entry names a function that parses its own arguments under its own name."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"cxr14-predict", "cxr14-compare", "cxr14-serve"}
    for name, target in scripts.items():
        module, function = target.split(":")
        with pytest.raises(SystemExit) as exit_info:
            getattr(importlib.import_module(module), function)(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {name} ")
        assert {"cxr14-predict": "--gradcam", "cxr14-compare": "--bootstrap", "cxr14-serve": "--max-batch"}[name] in out


@pytest.mark.parametrize(("alias", "command"), [("stages.predict", "cxr14-predict"),
                                                ("stages.compare", "cxr14-compare")])
def test_stage_aliases_run_the_console_commands(alias: str, command: str) -> None:
    done = subprocess.run([sys.executable, "-m", alias, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {command} "), done.stderr
    wrong = subprocess.run([sys.executable, "-m", alias, "x.png", "--no-such-option"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and f"{command}: error: unrecognized arguments: --no-such-option" in wrong.stderr


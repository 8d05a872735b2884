"""Explain: NIH's box list, localisation scores by hand, example choice by margin, the heatmaps' sanity checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import NIH, project_params
from scipy.stats import spearmanr
from torch import nn

from cxr14.data.boxes import BBOX_LIST, read_box_list
from cxr14.data.loader import PreparedImages
from cxr14.data.nih import CLASSES
from cxr14.explanation import sanity
from cxr14.explanation.examples import choose_examples, heatmaps, localisation, scaled_boxes
from cxr14.explanation.gradcam import GradCAM
from cxr14.explanation.localisation import heat_boxes, inside, iobb, peak, score_box, summarise
from cxr14.explanation.sanity import (
    RANDOMISED,
    cell_index,
    cell_order,
    deleted_counts,
    deletion_areas,
    deletion_curves,
    most_confident_positives,
    randomisation_score,
    randomised_copy,
    sanity_checks,
    spearman,
)
from cxr14.model.factory import ARCHS, build_model
from cxr14.params import Explain, build
from cxr14.runtime.errors import PipelineError
from stages import explain

needs_nih = pytest.mark.skipif(not (NIH / "images").is_dir(), reason="needs the NIH sample in ../shared/nih")


@needs_nih
def test_reads_nih_box_list_with_its_header_quirk() -> None:
    boxes = read_box_list(NIH / BBOX_LIST)
    assert len(boxes) == 984
    counts = boxes["Finding"].value_counts()
    assert counts["Infiltration"] == 123 and counts["Atelectasis"] == 180 and len(counts) == 8
    first = boxes.iloc[0]
    assert first["Image Index"] == "00013118_008.png" and first["Finding"] == "Atelectasis"
    assert first[["x", "y", "w", "h"]].tolist() == pytest.approx([225.0847, 547.0192, 86.7797, 79.1865], abs=1e-3)


@pytest.mark.parametrize(("row", "message"), [
    ("a.png,Nodules,1,2,3,4", "line 3: unknown finding 'Nodules'"),
    ("a.png,Mass,1,2,x,4", "line 3: box ['1', '2', 'x', '4'] is not four numbers"),
    ("a.png,Mass,1,2,0,4", "line 3: box ['1', '2', '0', '4']; expected finite x,y and positive w,h"),
    ("a.png,Mass,1,2,3", "line 3: 5 fields"),
])
def test_bad_box_rows_are_named_by_line(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / BBOX_LIST
    path.write_text(f"Image Index,Finding Label,Bbox [x,y,w,h],,,\nb.png,Infiltrate,1,2,3,4\n{row}\n")
    with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_box_list(path)
    path.write_text("Image,Label\n")
    with pytest.raises(PipelineError, match="line 1: expected the header"):
        read_box_list(path)


def test_localisation_scores_by_hand() -> None:
    heat = np.zeros((20, 20))
    heat[2:6, 3:9] = 0.6     # region A: x 3..9, y 2..6 (6 x 4)
    heat[12:16, 12:14] = 1.0  # region B, the peak at row 12, col 12: centre (12.5, 12.5)
    assert peak(heat) == (12.5, 12.5)
    assert inside((12.5, 12.5), (12, 12, 1, 1)) and not inside((12.5, 12.5), (13, 13, 5, 5))
    assert inside((13, 12.5), (13, 12, 5, 5))  # edges count
    assert heat_boxes(heat, 0.5) == [(3.0, 2.0, 6.0, 4.0), (12.0, 12.0, 2.0, 4.0)]
    assert heat_boxes(heat, 0.7) == [(12.0, 12.0, 2.0, 4.0)]
    assert heat_boxes(np.zeros((4, 4)), 0.5) == []
    assert iobb((3, 2, 6, 4), (0, 0, 6, 20)) == pytest.approx(3 * 4 / 24)  # half of A lies in the truth
    assert iobb((3, 2, 6, 4), (10, 10, 2, 2)) == 0
    # truth around A only: no pointing hit (the peak is in B), IoBB 1 through region A
    assert score_box(heat, (2, 1, 8, 6), 0.5) == {"pointing": 0.0, "iobb": 1.0}
    assert score_box(heat, (11, 11, 4, 2), 0.5) == {"pointing": 1.0, "iobb": pytest.approx(2 / 8)}  # 2 x 1 of B
    s = summarise([{"pointing": 1.0, "iobb": 0.3}, {"pointing": 0.0, "iobb": 0.1}, {"pointing": 1.0, "iobb": 0.6}],
                  [0.1, 0.25, 0.5])
    assert s == {"boxes": 3, "pointing_game": 0.666667, "iobb_0.1": 0.666667, "iobb_0.25": 0.666667,
                 "iobb_0.5": 0.333333}
    assert summarise([], [0.1])["pointing_game"] is None
    # the ceiling: a box holding none of the places a peak can fall can never be hit
    peaks = [(0.5, 0.5), (10.5, 10.5)]
    assert score_box(heat, (2, 1, 8, 6), 0.5, peaks)["reachable"] == 0.0  # neither point in x 2..10, y 1..7
    assert score_box(heat, (9, 9, 4, 4), 0.5, peaks)["reachable"] == 1.0
    s = summarise([{"pointing": 1.0, "iobb": 0.3, "reachable": 1.0}, {"pointing": 0.0, "iobb": 0.1, "reachable": 0.0}],
                  [0.1])
    assert s["pointing_game_ceiling"] == 0.5 and s["pointing_game"] == 0.5


def test_examples_are_the_most_confident_of_each_kind() -> None:
    labels = np.zeros((6, len(CLASSES)), dtype=int)
    cal = np.full((6, len(CLASSES)), 0.1)
    labels[:, 0] = [1, 1, 0, 0, 1, 1]
    cal[:, 0] = [0.9, 0.7, 0.8, 0.2, 0.3, 0.1]
    thresholds = {name: None for name in CLASSES} | {CLASSES[0]: 0.5}
    chosen = choose_examples(labels, cal, thresholds, per_class=1)
    assert [(k, kind, row) for k, kind, row, _ in chosen] == [(0, "TP", 0), (0, "FP", 2), (0, "FN", 5)]
    assert [m for *_, m in chosen] == pytest.approx([0.4, 0.3, -0.4])
    two = choose_examples(labels, cal, thresholds, per_class=2)
    assert [row for _, kind, row, _ in two if kind == "TP"] == [0, 1] and len(two) == 5  # one FP exists


def test_localisation_scores_each_box_with_its_class_heatmap() -> None:
    mass, nodule = CLASSES.index("Mass"), CLASSES.index("Nodule")
    hot = np.zeros((20, 20))
    hot[2:6, 3:9] = 1.0  # one region, x 3..9, y 2..6; its peak at (3.5, 2.5)
    maps = {(0, mass): hot, (1, mass): hot[::-1].copy(), (0, nodule): hot.T.copy()}
    boxes = pd.DataFrame({"Image Index": ["a.png", "b.png", "a.png"], "Finding": ["Mass", "Mass", "Nodule"],
                          "x": [2.0, 2.0, 2.0], "y": [1.0, 1.0, 1.0], "w": [8.0, 8.0, 8.0], "h": [6.0, 6.0, 4.0],
                          "row": [0, 1, 0]})
    # Mass on row 0 (box x 2..10, y 1..7): its own region inside, hit both ways. Mass on row 1: the map flipped
    # to y 14..18, peak (3.5, 14.5) and region outside: missed. Nodule (box x 2..10, y 1..5): the map transposed
    # to x 2..6, y 3..9, peak (2.5, 3.5) inside, its region 4 x 2 of 4 x 6 inside (IoBB 1/3).
    out = localisation(maps, boxes, 0.5, [0.1, 0.5], peaks=[(3.5, 2.5), (15.5, 15.5)])
    assert out["per_class"] == {
        "Mass": {"boxes": 2, "pointing_game": 0.5, "pointing_game_ceiling": 1.0, "iobb_0.1": 0.5, "iobb_0.5": 0.5},
        "Nodule": {"boxes": 1, "pointing_game": 1.0, "pointing_game_ceiling": 1.0, "iobb_0.1": 1.0, "iobb_0.5": 0.0},
    }
    assert out["overall"] == {"boxes": 3, "pointing_game": 0.666667, "pointing_game_ceiling": 1.0,
                              "iobb_0.1": 0.666667, "iobb_0.5": 0.333333}
    assert localisation({}, boxes.iloc[:0], 0.5, [0.1])["overall"]["pointing_game"] is None


@needs_nih
def test_nih_boxes_scale_from_original_pixels_to_the_model_size() -> None:
    boxes = read_box_list(NIH / BBOX_LIST)
    names = sorted(p.name for p in (NIH / "images").glob("*.png"))
    table = pd.DataFrame({"Image Index": names, "path": [str(NIH / "images" / n) for n in names]})
    scaled = scaled_boxes(boxes, table, 224)
    assert len(scaled) == 6  # the sample's images carry 6 of NIH's 984 boxes (one of them an RGBA file)
    assert set(scaled["Image Index"]) >= {"00001369_000.png", "00015649_000.png"}
    original = boxes.set_index("Image Index").loc[scaled["Image Index"]]
    for key in ("x", "y", "w", "h"):  # NIH images are 1024 x 1024
        assert scaled[key].to_numpy() == pytest.approx(original[key].to_numpy() * 224 / 1024)
    assert [table["Image Index"][r] for r in scaled["row"]] == scaled["Image Index"].tolist()


GOOD = {"per_class": 1, "layer": "auto", "cam_threshold": 0.5, "iobb_thresholds": [0.1, 0.25, 0.5], "batch_size": 32,
        "sanity_images": 5, "deletion_steps": 16, "deletion_grid": 8, "sanity_seed": 0}
THRESHOLDS = "a non-empty list of numbers in [0, 1)"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("per_class", -1, "explain.per_class: -1; expected an integer >= 0"),
    ("per_class", 1.5, "explain.per_class: 1.5; expected an integer >= 0"),
    ("batch_size", 0, "explain.batch_size: 0; expected an integer >= 1"),
    ("cam_threshold", 1.5, "explain.cam_threshold: 1.5; expected a number in (0, 1): the fraction of the heatmap's "
                           "maximum that outlines regions"),
    ("cam_threshold", 0, "explain.cam_threshold: 0; expected a number in (0, 1)"),
    ("iobb_thresholds", [0.1, 1.2], f"explain.iobb_thresholds: [0.1, 1.2]; expected {THRESHOLDS}"),
    ("iobb_thresholds", [], f"explain.iobb_thresholds: []; expected {THRESHOLDS}"),
    ("iobb_thresholds", 0.5, f"explain.iobb_thresholds: 0.5; expected {THRESHOLDS}"),
    ("layer", 3, "explain.layer: 3; expected 'auto' or a module name such as layer3"),
    ("sanity_images", -1, "explain.sanity_images: -1; expected 0 (no sanity checks) or a positive integer"),
    ("deletion_steps", 0, "explain.deletion_steps: 0; expected an integer >= 1"),
    ("deletion_steps", 65, "explain.deletion_steps: 65; expected at most explain.deletion_grid squared (64): each "
                           "step blanks one cell or more"),
    ("deletion_grid", 0, "explain.deletion_grid: 0; expected an integer in [1, 4096]"),
    ("sanity_seed", -1, "explain.sanity_seed: -1; expected an integer in [0, 4294967295]"),
])
def test_bad_explain_params_are_named(key: str, value: object, message: str) -> None:
    assert build(Explain, GOOD, "p.yaml") == Explain(**GOOD)
    with pytest.raises(PipelineError) as error:
        build(Explain, GOOD | {key: value}, "p.yaml")
    assert str(error.value).startswith(f"p.yaml {message}")


def test_explain_stage_refuses_bad_params_naming_the_file(tmp_path: Path) -> None:
    # main reads its params before the model or any data, so this fails on the params alone
    path = project_params(tmp_path / "params.yaml", {"explain": {"batch_size": 0}})
    with pytest.raises(PipelineError) as error:
        explain.main(["--params", str(path)])
    assert str(error.value) == f"{path} explain.batch_size: 0; expected an integer >= 1"
    params = yaml.safe_load(path.read_text())
    params["explain"]["batch_size"] = 32
    params["explain"]["per_clas"] = params["explain"].pop("per_class")
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError) as error:
        explain.main(["--params", str(path)])
    assert str(error.value) == f"{path} explain.per_clas: unknown key; did you mean per_class?"
    del params["explain"]["per_clas"]
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError) as error:
        explain.main(["--params", str(path)])
    assert str(error.value) == (f"{path} explain.per_class: missing; expected an integer >= 0 "
                                "(the defaults live in params.yaml)")


# ---- sanity checks (cxr14/explanation/sanity.py): model randomisation and deletion ----

def trained_looking(arch: str) -> nn.Module:
    """A model whose every parameter and buffer is off its initial value, as after training: a reset that
    leaves a tensor as it was (a BatchNorm weight of 1) is then seen as no reset."""
    torch.manual_seed(0)
    model = build_model(arch, "none").eval()
    with torch.no_grad():
        for value in model.state_dict().values():  # the module's own tensors
            if value.is_floating_point():
                value.add_(0.05 + 0.1 * torch.randn_like(value))
            else:
                value.fill_(7)  # num_batches_tracked
    return model


def test_every_architecture_has_its_randomised_modules() -> None:
    assert set(RANDOMISED) == set(ARCHS)
    with pytest.raises(PipelineError, match="arch 'vgg'; expected one of resnet10, resnet18"):
        randomised_copy(nn.Linear(2, 2), "vgg", 0)


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "densenet121"])
def test_randomised_copy_reinitialises_exactly_the_head_and_last_block(arch: str) -> None:
    model = trained_looking(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    twin, reset = randomised_copy(model, arch, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream goes on as before
    under = tuple(f"{prefix}." for prefix in RANDOMISED[arch])
    assert sorted(reset) == sorted(k for k in before if k.startswith(under)) and len(reset) == len(set(reset))
    assert any(k.endswith("running_var") for k in reset) and any(k.endswith(".bias") for k in reset)
    after = twin.state_dict()
    assert list(after) == list(before)
    for key, value in after.items():  # every reset tensor changed, every other one is the original bit for bit
        assert torch.equal(value, before[key]) == (key not in reset), key
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"the original's {key} changed"
    assert not twin.training and twin is not model
    again, _ = randomised_copy(model, arch, seed=3)
    other, _ = randomised_copy(model, arch, seed=4)
    assert all(torch.equal(v, after[k]) for k, v in again.state_dict().items())  # seeded: the same copy
    assert not torch.equal(other.state_dict()[reset[0]], after[reset[0]])


def test_spearman_of_maps() -> None:
    a = np.random.default_rng(0).random((8, 8))
    assert spearman(a, a) == pytest.approx(1.0, abs=1e-12)
    assert spearman(a, a.max() - a) == pytest.approx(-1.0, abs=1e-12)  # every rank reversed
    assert spearman(a, a ** 3) == pytest.approx(1.0, abs=1e-12)  # ranks, not values
    b = np.random.default_rng(1).random((8, 8))
    ties_a, ties_b = np.round(a * 3), np.round(b * 3)  # many ties: average ranks, as scipy's spearmanr
    assert spearman(ties_a, ties_b) == pytest.approx(spearmanr(ties_a.ravel(), ties_b.ravel()).statistic)
    assert abs(spearman(a, b)) < 0.5
    assert np.isnan(spearman(a, np.full((8, 8), 0.3))) and np.isnan(spearman(np.zeros((8, 8)), a))
    with pytest.raises(PipelineError, match="maps of 64 and 16 values"):
        spearman(a, a[:4, :4])
    # a randomised model whose map went flat lost the trained map's order: 0; a flat trained map: left out
    assert randomisation_score(a, np.zeros((8, 8))) == 0.0 and np.isnan(randomisation_score(np.zeros((8, 8)), a))
    assert randomisation_score(a, a ** 3) == pytest.approx(1.0, abs=1e-12)


def test_a_constant_map_deletes_in_random_order() -> None:
    """A map with no preference (equal everywhere) gives the random order, not one skewed by cell sizes."""
    cells = cell_index((10, 10), 3)  # cells of 3 or 4 pixels a side: unequal sizes
    flat = np.full((10, 10), 0.7)
    assert (cell_order(flat, cells, np.random.default_rng(5)) == np.random.default_rng(5).permutation(9)).all()


def test_most_confident_positives_per_class() -> None:
    labels = np.zeros((5, len(CLASSES)), dtype=int)
    probs = np.zeros((5, len(CLASSES)))
    labels[:, 0], probs[:, 0] = [1, 0, 1, 1, 1], [0.2, 0.99, 0.7, 0.7, 0.9]  # row 1 scores highest, not positive
    labels[3, 2] = 1
    rows = most_confident_positives(labels, probs, 3)
    assert rows[0] == [4, 2, 3] and rows[2] == [3] and rows[1] == [] and set(rows) == set(range(len(CLASSES)))
    assert most_confident_positives(labels, probs, 0)[0] == []


def test_cells_steps_and_orders() -> None:
    cells = cell_index((10, 10), 3)
    assert cells[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]  # sides 4, 3, 3
    assert cells[:, 0].tolist() == [0, 0, 0, 0, 3, 3, 3, 6, 6, 6]
    assert cell_index((32, 32), 4)[5, 30] == 3 and cell_index((32, 32), 4)[31, 31] == 15
    with pytest.raises(PipelineError, match="33 cells across a 32x32 image; expected 1 to 32"):
        cell_index((32, 32), 33)
    assert deleted_counts(16, 5).tolist() == [0, 3, 6, 10, 13, 16] and deleted_counts(64, 16).tolist()[:3] == [0, 4, 8]
    with pytest.raises(PipelineError, match="deletion steps: 17; expected 1 to 16"):
        deleted_counts(16, 17)
    cells = cell_index((32, 32), 4)
    heat = np.zeros((32, 32))
    heat[8:16, 0:8], heat[0:8, 24:32] = 1.0, 0.5  # cell 4 first, then cell 3, then the rest, tied
    order = cell_order(heat, cells, np.random.default_rng(0))
    assert order[:2].tolist() == [4, 3] and sorted(order.tolist()) == list(range(16))
    flat = cell_order(np.zeros((32, 32)), cells, np.random.default_rng(0))  # no preference: a random order
    assert flat.tolist() == np.random.default_rng(0).permutation(16).tolist() != list(range(16))


class PatchModel(nn.Module):
    """Every logit is 4x the mean of the input's first channel over rows 0-7, columns 24-31: cell 3 of a 4 x 4
    grid on a 32 px image, and nothing else, moves the probability."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (4 * x[:, 0, 0:8, 24:32].mean(dim=(1, 2)))[:, None].repeat(1, len(CLASSES))


def test_deletion_in_the_salient_order_beats_random_and_the_opposite_loses() -> None:
    image = np.random.default_rng(0).integers(40, 80, (32, 32)).astype(np.uint8)
    image[0:8, 24:32] = 250  # the bright patch the model reads
    toward = np.zeros((32, 32))
    toward[0:8, 24:32] = 1.0
    cells = cell_index((32, 32), 4)
    rng = np.random.default_rng(0)
    orders = np.stack([cell_order(toward, cells, rng), cell_order(1 - toward, cells, rng),
                       *(rng.permutation(16) for _ in range(40))])[None]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    curves = deletion_curves(PatchModel(), image[None], [5], orders, 4, 16, mean, std, batch=7)
    assert curves.shape == (1, 42, 17)
    high, low = curves[0, 0, 0], curves[0, 0, 1]
    assert high > 0.99 and low < 0.1  # the patch blanked with the image's mean grey in the first step
    assert np.allclose(curves[0, :, 0], high) and np.allclose(curves[0, :, -1], low)  # shared ends
    assert np.allclose(curves[0, 0, 1:], low) and np.allclose(curves[0, 1, :-1], high)  # first and last to go
    areas = deletion_areas(curves, 4, 16)[0]
    assert areas[0] == pytest.approx((high + low) / 32 + low * 15 / 16)  # trapezoids over fractions 0..1
    assert areas[0] < 0.1 < 0.3 < areas[2:].mean() < 0.7 < 0.9 < areas[1]
    again = deletion_curves(PatchModel(), image[None], [5], orders, 4, 16, mean, std, batch=1000)
    assert np.array_equal(again, curves)  # batching changes nothing


@pytest.fixture
def tiny_test_set(tmp_path: Path) -> PreparedImages:
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "test.npy", images)
    return PreparedImages(tmp_path / "test.npy")


def test_sanity_checks_on_a_tiny_model_release_every_hook(tiny_test_set: PreparedImages, monkeypatch) -> None:
    """The section's numbers are those of the model's and its randomised copy's maps; both lose their hooks."""
    model = trained_looking("resnet18")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rows = {0: [0, 1, 2, 3], 3: [2]}
    pairs = [(r, k) for k in rows for r in rows[k]]
    with GradCAM(model, model.layer4) as cam:
        maps = heatmaps(cam, tiny_test_set, pairs, mean, std, 8)
    copies = []

    def keep(*args, **kwargs):
        copies.append(randomised_copy(*args, **kwargs))
        return copies[-1]

    monkeypatch.setattr(sanity, "randomised_copy", keep)
    out = sanity_checks(model, "resnet18", "layer4", tiny_test_set, rows, maps, mean, std, steps=4, grid=4, seed=0,
                        batch=16)
    (twin, reset), = copies
    for m in [*model.modules(), *twin.modules()]:
        assert not m._forward_hooks, f"a hook left on {m}"
    assert out["settings"] == {"deletion_steps": 4, "deletion_grid": 4, "seed": 0, "randomised": ["fc", "layer4"],
                               "randomised_tensors": len(reset), "map_size": [64, 64], "blank": "image mean grey"}
    with GradCAM(twin, twin.layer4) as cam:
        twin_maps = heatmaps(cam, tiny_test_set, pairs, mean, std, 8)
    rho = {p: randomisation_score(maps[p], twin_maps[p]) for p in pairs}
    flat = {p: np.ptp(twin_maps[p]) == 0 and np.ptp(maps[p]) > 0 for p in pairs}
    per = out["per_class"]
    assert [per[name]["images"] for name in CLASSES] == [4, 0, 0, 1] + [0] * 10
    for k in rows:
        c, values = per[CLASSES[k]], [rho[(r, k)] for r in rows[k]]
        finite = [v for v in values if not np.isnan(v)]
        assert c["constant_trained_maps"] == len(values) - len(finite)  # left out of the mean, and counted
        assert c["constant_randomised_maps"] == sum(flat[(r, k)] for r in rows[k])  # scored 0, and counted
        assert c["randomisation_spearman"] == (pytest.approx(np.mean(finite), abs=1e-6) if finite else None)
        assert 0 <= c["deletion_area_gradcam"] <= 1 and 0 <= c["deletion_area_random"] <= 1
    assert any(np.isfinite(v) for v in rho.values())  # so the comparison above compared numbers
    assert per[CLASSES[1]] == {"images": 0, "constant_trained_maps": 0, "constant_randomised_maps": 0,
                               "randomisation_spearman": None,
                               "deletion_area_gradcam": None, "deletion_area_random": None}
    o = out["overall"]
    assert o["classes"] == 2 and o["images"] == 5
    assert o["constant_trained_maps"] == sum(np.isnan(v) for v in rho.values())
    assert o["constant_randomised_maps"] == sum(flat.values())
    assert o["classes_gradcam_below_random"] == sum(per[CLASSES[k]]["deletion_area_gradcam"]
                                                    < per[CLASSES[k]]["deletion_area_random"] for k in rows)
    assert o["deletion_area_random"] == pytest.approx(np.mean([per[CLASSES[k]]["deletion_area_random"] for k in rows]),
                                                      abs=1e-6)
    monkeypatch.undo()
    assert sanity_checks(model, "resnet18", "layer4", tiny_test_set, rows, maps, mean, std, steps=4, grid=4, seed=0,
                         batch=5) == out  # seeded, and batching changes nothing

"""Explain: NIH's box list, localisation scores by hand, example choice by margin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import NIH, project_params

from cxr14.boxes import BBOX_LIST, read_box_list
from cxr14.common import PipelineError
from cxr14.explanations import choose_examples, localisation, scaled_boxes
from cxr14.localisation import heat_boxes, inside, iobb, peak, score_box, summarise
from cxr14.nih import CLASSES
from cxr14.params import Explain, build
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


GOOD = {"per_class": 1, "layer": "auto", "cam_threshold": 0.5, "iobb_thresholds": [0.1, 0.25, 0.5], "batch_size": 32}
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

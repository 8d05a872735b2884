"""Explain stage: Grad-CAM on the test images worth a look, and a score for where it points.

The seed drew heatmaps and only looked at them. Here, per class, the most confident true positive,
false positive and false negative (by calibrated probability minus the val threshold, as predict
prints it) are drawn to `plots/gradcam/<Class>/<image>.png`, and every expert box of the dataset in
use (NIH's BBox_List_2017.csv; the demo plants one per finding) is scored: Grad-CAM for the box's
class on its image, pointing game and T(IoBB) (stages/localisation.py), per class and overall.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from stages.calibrate import read_predictions
from stages.calibration import apply_calibrator, load_calibrator, load_thresholds
from stages.common import PipelineError, cpu_count, load_params, progress, replace_dir, run_main, write_json
from stages.data import PreparedImages, to_model_input
from stages.gradcam import GradCAM, overlay
from stages.localisation import score_box, summarise
from stages.model import gradcam_layer, load_checkpoint
from stages.nih import BBOX_LIST, CLASSES, read_box_list

PREPARED, SPLIT, PREDICTIONS, PLOTS = Path("data/prepared"), Path("data/split"), Path("data/predictions"), \
    Path("plots/gradcam")
KINDS = ("TP", "FP", "FN")


def check_params(e: dict) -> None:
    def fail(key: str, expected: str) -> None:
        raise PipelineError(f"params.yaml explain.{key}: {e.get(key)!r}; expected {expected}")

    for key in ("per_class", "batch_size"):
        if isinstance(e.get(key), bool) or not isinstance(e.get(key), int) or e[key] < (key == "batch_size"):
            fail(key, "a non-negative integer" if key == "per_class" else "a positive integer")
    if not isinstance(e.get("cam_threshold"), (int, float)) or not 0 < e["cam_threshold"] < 1:
        fail("cam_threshold", "a number in (0, 1): the fraction of the heatmap's maximum that outlines regions")
    t = e.get("iobb_thresholds")
    if not isinstance(t, list) or not t or not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in t):
        fail("iobb_thresholds", "a list of numbers in [0, 1)")
    if not isinstance(e.get("layer"), str):
        fail("layer", "'auto' or a module name such as layer3")


def choose_examples(labels: np.ndarray, cal: np.ndarray, thresholds: dict, per_class: int) -> list[tuple]:
    """(class index, kind, row, margin): per class the `per_class` largest margins of TP and FP, smallest of FN."""
    chosen = []
    for k, name in enumerate(CLASSES):
        if thresholds.get(name) is None:
            continue
        margin, y = cal[:, k] - thresholds[name], labels[:, k]
        for kind, mask, sign in (("TP", (y == 1) & (margin >= 0), -1), ("FP", (y == 0) & (margin >= 0), -1),
                                 ("FN", (y == 1) & (margin < 0), 1)):
            rows = np.flatnonzero(mask)
            for row in rows[np.argsort(sign * margin[rows], kind="stable")][:per_class]:
                chosen.append((k, kind, int(row), float(margin[row])))
    return chosen


def heatmaps(cam: GradCAM, data: PreparedImages, pairs: list[tuple[int, int]], mean, std, batch: int) -> dict:
    """Grad-CAM for each (row, class) pair, batched per class: {(row, class): (H, W) array}."""
    out = {}
    by_class: dict[int, list[int]] = {}
    for row, k in pairs:
        by_class.setdefault(k, []).append(row)
    bar = progress(total=len(pairs), desc="grad-cam", unit="map")
    for k, rows in by_class.items():
        rows = sorted(set(rows))
        for i in range(0, len(rows), batch):
            part = rows[i:i + batch]
            _, maps = cam(to_model_input(data[np.array(part)][0], mean, std), [k])
            out.update({(row, k): maps[j, 0].cpu().numpy() for j, row in enumerate(part)})
            bar.update(len(part))
    bar.close()
    return out


def scaled_boxes(boxes: pd.DataFrame, table: pd.DataFrame, size: int) -> pd.DataFrame:
    """Boxes of test images, moved from original-image pixels to the model's size x size pixels."""
    rows = {name: i for i, name in enumerate(table["Image Index"])}
    boxes = boxes[boxes["Image Index"].isin(rows)].copy()
    boxes["row"] = boxes["Image Index"].map(rows)
    dims = {}
    for name in boxes["Image Index"].unique():
        with Image.open(table["path"].iloc[rows[name]]) as image:  # reads the header only
            dims[name] = image.size
    sx = boxes["Image Index"].map(lambda n: size / dims[n][0])
    sy = boxes["Image Index"].map(lambda n: size / dims[n][1])
    boxes["x"], boxes["w"], boxes["y"], boxes["h"] = boxes.x * sx, boxes.w * sx, boxes.y * sy, boxes.h * sy
    return boxes.reset_index(drop=True)


def localisation(maps: dict, boxes: pd.DataFrame, e: dict, peaks: list[tuple[float, float]] | None = None) -> dict:
    scores = [score_box(maps[(b.row, CLASSES.index(b.Finding))], (b.x, b.y, b.w, b.h), e["cam_threshold"], peaks)
              for b in boxes.itertuples()]
    per_class = {name: summarise([s for s, f in zip(scores, boxes["Finding"], strict=True) if f == name],
                                 e["iobb_thresholds"]) for name in CLASSES if (boxes["Finding"] == name).any()}
    return {"overall": summarise(scores, e["iobb_thresholds"]), "per_class": per_class}


def draw(examples: list[tuple], maps: dict, data: PreparedImages, table, cal, raw, thresholds, boxes, out: Path):
    for k, kind, row, margin in examples:
        name, image = CLASSES[k], table["Image Index"].iloc[row]
        mine = boxes[(boxes["row"] == row) & (boxes["Finding"] == name)]
        title = (f"{kind} {name}: {image}\np={cal[row, k]:.3f} (raw {raw[row, k]:.3f}), t={thresholds[name]:.3f}, "
                 f"margin {margin:+.3f}")
        overlay(data[np.array([row])][0][0, 0].numpy(), maps[(row, k)], title, out / name / image,
                boxes=list(mine[["x", "y", "w", "h"]].itertuples(index=False, name=None)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (sections data, explain)")
    args = parser.parse_args(argv)
    params = load_params(path=args.params)
    e = params.get("explain", {})
    check_params(e)
    torch.set_num_threads(cpu_count())
    model, ckpt = load_checkpoint("models/model.pt")
    try:
        layer_name, layer = gradcam_layer(model, ckpt["arch"], e["layer"])
    except PipelineError as exc:
        raise PipelineError(f"params.yaml explain.layer: {exc}") from None
    table = pd.read_csv(SPLIT / "test.csv")
    labels, raw = read_predictions(PREDICTIONS / "test.csv")
    if pd.read_csv(PREDICTIONS / "test.csv")["Image Index"].tolist() != table["Image Index"].tolist():
        raise PipelineError(f"{PREDICTIONS / 'test.csv'}: rows differ from {SPLIT / 'test.csv'}; run dvc repro")
    calibrator = load_calibrator("models/calibrator.json")
    thresholds = load_thresholds(Path("models/thresholds.json"))
    cal = apply_calibrator(calibrator, raw)
    data = PreparedImages(PREPARED / "test.npy", labels.astype(np.float32))

    box_file = Path(params["data"]["root"]) / BBOX_LIST
    if box_file.is_file():
        boxes = scaled_boxes(read_box_list(box_file), table, ckpt["image_size"])
    else:
        print(f"warning: {box_file} not found: no localisation scores", file=sys.stderr)
        boxes = pd.DataFrame(columns=["Image Index", "Finding", "x", "y", "w", "h", "row"])
    examples = choose_examples(labels, cal, thresholds, e["per_class"])
    pairs = [(row, k) for k, _, row, _ in examples]
    pairs += [(b.row, CLASSES.index(b.Finding)) for b in boxes.itertuples()]
    with GradCAM(model, layer) as cam:
        maps = heatmaps(cam, data, pairs, tuple(ckpt["mean"]), tuple(ckpt["std"]), e["batch_size"])
        peaks = cam.peak_points((ckpt["image_size"],) * 2) if maps else None
    with replace_dir(PLOTS) as tmp:
        draw(examples, maps, data, table, cal, raw, thresholds, boxes, tmp)
    metrics = {"layer": layer_name, **localisation(maps, boxes, e, peaks),
               "examples": {kind: sum(x[1] == kind for x in examples) for kind in KINDS}}
    write_json("metrics/explain.json", metrics)
    o = metrics["overall"]
    print(f"explain: {len(examples)} overlays in {PLOTS}; {o['boxes']} boxes: pointing game {o['pointing_game']} "
          f"(ceiling at this map size {o.get('pointing_game_ceiling')}), "
          + ", ".join(f"T(IoBB>{t:g}) {o[f'iobb_{t:g}']}" for t in e["iobb_thresholds"]))


if __name__ == "__main__":
    run_main(main)

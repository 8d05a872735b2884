"""Explain stage: Grad-CAM on the test images worth a look, and a score for where it points.

The seed drew heatmaps and only looked at them. Here, per class, the most confident true positive,
false positive and false negative (by calibrated probability minus the val threshold, as predict
prints it) are drawn to `plots/gradcam/<Class>/<image>.png`, and every expert box of the dataset in
use (NIH's BBox_List_2017.csv; the demo plants one per finding) is scored: Grad-CAM for the box's
class on its image, pointing game and T(IoBB), per class and overall, in metrics/explain.json.
With explain.sanity_images > 0 its `sanity` section says whether the maps depend on the learned weights and
point at what the model uses (cxr14/explanation/sanity.py: model randomisation and deletion tests).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr14 import paths
from cxr14.data.boxes import BBOX_LIST, read_box_list
from cxr14.data.loader import PreparedImages
from cxr14.data.nih import CLASSES
from cxr14.data.splits import read_split_table
from cxr14.evaluation.calibration import apply_calibrator, check_pairing, load_calibrator, load_thresholds
from cxr14.evaluation.predictions import read_predictions
from cxr14.explanation.examples import KINDS, choose_examples, draw, heatmaps, localisation, scaled_boxes
from cxr14.explanation.gradcam import GradCAM
from cxr14.explanation.sanity import most_confident_positives, sanity_checks
from cxr14.model.checkpoint import load_checkpoint
from cxr14.model.factory import gradcam_layer
from cxr14.params import PARAMS_FILE, Data, Explain, Train, load_section
from cxr14.runtime.devices import cpu_count, cpu_kernels, pick_device
from cxr14.runtime.errors import PipelineError, warn
from cxr14.runtime.outputs import replace_dir, write_json
from cxr14.runtime.signals import run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (sections explain, data, train)")
    args = parser.parse_args(argv)
    e, data, t = load_section(args.params, Explain), load_section(args.params, Data), load_section(args.params, Train)
    torch.set_num_threads(cpu_count())
    cpu_kernels(t.cpu_kernels)
    device = pick_device(t.device, f"{args.params} train.device")  # the experiment's GPU, as evaluate's
    model, ckpt = load_checkpoint(paths.MODEL, device, classes=CLASSES)
    try:
        layer_name, layer = gradcam_layer(model, ckpt["arch"], e.layer)
    except PipelineError as exc:
        raise PipelineError(f"{args.params} explain.layer: {exc}") from None
    table = read_split_table(paths.SPLIT / "test.csv")
    labels, raw = read_predictions(paths.PREDICTIONS / "test.csv", table["Image Index"])
    thresholds, applies_to = load_thresholds(paths.THRESHOLDS)
    calibrator = load_calibrator(paths.CALIBRATOR)
    check_pairing(paths.THRESHOLDS, applies_to, calibrator, paths.CALIBRATOR)
    cal = apply_calibrator(calibrator, raw)
    test = PreparedImages(paths.PREPARED / "test.npy", labels.astype(np.float32))
    test.require_size(ckpt["image_size"], paths.MODEL)
    if e.sanity_images and e.deletion_grid > ckpt["image_size"]:
        raise PipelineError(f"{args.params} explain.deletion_grid: {e.deletion_grid}; expected at most the image size "
                            f"({ckpt['image_size']} px): a cell is one pixel or more")

    box_file = Path(data.root) / BBOX_LIST
    if box_file.is_file():
        boxes = scaled_boxes(read_box_list(box_file), table, ckpt["image_size"], box_file)
    else:
        warn(f"{box_file} not found: no localisation scores")
        boxes = pd.DataFrame(columns=["Image Index", "Finding", "x", "y", "w", "h", "row"])
    examples = choose_examples(labels, cal, thresholds, e.per_class)
    pairs = [(row, k) for k, _, row, _ in examples]
    pairs += [(b.row, CLASSES.index(b.Finding)) for b in boxes.itertuples()]
    sanity_rows = most_confident_positives(labels, raw, e.sanity_images)  # the model's own scores, uncalibrated
    pairs += [(row, k) for k, rows in sanity_rows.items() for row in rows]  # their maps in the same pass
    with GradCAM(model, layer) as cam:
        maps = heatmaps(cam, test, pairs, tuple(ckpt["mean"]), tuple(ckpt["std"]), e.batch_size, device)
        peaks = cam.peak_points((ckpt["image_size"],) * 2) if maps else None
    out = paths.PLOTS / "gradcam"
    with replace_dir(out) as tmp:
        draw(examples, maps, test, table, cal, raw, thresholds, boxes, tmp)
    metrics = {"layer": layer_name, **localisation(maps, boxes, e.cam_threshold, e.iobb_thresholds, peaks),
               "examples": {kind: sum(x[1] == kind for x in examples) for kind in KINDS}}
    if e.sanity_images:  # after the `with`: the randomised copy must not copy the trained model's hooks
        sanity = sanity_checks(model, ckpt["arch"], layer_name, test, sanity_rows, maps, tuple(ckpt["mean"]),
                               tuple(ckpt["std"]), steps=e.deletion_steps, grid=e.deletion_grid, seed=e.sanity_seed,
                               batch=e.batch_size, device=device)
        sanity["settings"] = {"images_per_class": e.sanity_images, **sanity["settings"]}
        metrics["sanity"] = sanity
    write_json(paths.METRICS / "explain.json", metrics)
    o = metrics["overall"]
    print(f"explain: {len(examples)} overlays in {out}; {o['boxes']} boxes: pointing game {o['pointing_game']} "
          f"(ceiling at this map size {o.get('pointing_game_ceiling')}), "
          + ", ".join(f"T(IoBB>{t:g}) {o[f'iobb_{t:g}']}" for t in e.iobb_thresholds))
    if e.sanity_images:
        s = metrics["sanity"]["overall"]
        print(f"explain sanity: {s['images']} images of {s['classes']} classes: Spearman with a randomised "
              f"{'+'.join(metrics['sanity']['settings']['randomised'])} {s['randomisation_spearman']} (low is good; "
              f"{s['constant_randomised_maps']} randomised maps constant, scored 0; {s['constant_trained_maps']} "
              f"trained maps constant, left out); deletion area Grad-CAM {s['deletion_area_gradcam']} vs "
              f"random {s['deletion_area_random']} (lower in {s['classes_gradcam_below_random']} of {s['classes']} "
              "classes)")


if __name__ == "__main__":
    run_main(main)

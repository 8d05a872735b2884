"""Explain stage: Grad-CAM on the test images worth a look, and a score for where it points.

Heatmaps that are only looked at prove nothing, so they are also scored. Per class, the most confident true
positive, false positive and false negative (by calibrated probability minus the val threshold, as predict
prints it) are drawn to `plots/gradcam/<Class>/<image>.png`, and every expert box of the dataset in use
(NIH's BBox_List_2017.csv; the demo plants one per finding) is scored: Grad-CAM for the box's class on its
image, pointing game and T(IoBB), per class and overall, in reports/explain.json. With explain.sanity_images > 0
its `sanity` section says whether the maps depend on the learned weights and point at what the model uses
(cxr14/explanation/sanity.py: model randomisation and deletion tests). metrics/explain.json holds the headline:
the overall pointing game and the randomisation score.
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
from cxr14.explanation.examples import (
    KINDS,
    choose_examples,
    draw,
    headline,
    heatmaps,
    localisation,
    scaled_boxes,
)
from cxr14.explanation.gradcam import GradCAM
from cxr14.explanation.sanity import most_confident_positives, sanity_checks
from cxr14.model.checkpoint import load_checkpoint
from cxr14.model.factory import gradcam_layer
from cxr14.params import PARAMS_FILE, load_params
from cxr14.runtime.devices import cpu_count, cpu_kernels, pick_device
from cxr14.runtime.errors import PipelineError, warn
from cxr14.runtime.outputs import replace_dir, write_json
from cxr14.runtime.signals import run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (sections explain, data, train)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    explain, data, train = params.explain, params.data, params.train
    torch.set_num_threads(cpu_count())
    cpu_kernels(train.cpu_kernels)
    device = pick_device(train.device, f"{args.params} train.device")  # the experiment's GPU, as evaluate's
    model, ckpt = load_checkpoint(paths.MODEL, device, classes=CLASSES)
    try:
        layer_name, layer = gradcam_layer(model, ckpt["arch"], explain.layer)
    except PipelineError as exc:
        raise PipelineError(f"{args.params} explain.layer: {exc}") from None
    table = read_split_table(paths.SPLIT / "test.csv")
    labels, raw = read_predictions(paths.PREDICTIONS / "test.csv", table["Image Index"])
    thresholds, cal = calibrated(raw)
    test = PreparedImages(paths.PREPARED / "test.npy", labels.astype(np.float32))
    test.require_size(ckpt["image_size"], paths.MODEL)
    if explain.sanity_images and explain.deletion_grid > ckpt["image_size"]:
        raise PipelineError(f"{args.params} explain.deletion_grid: {explain.deletion_grid}; expected at most the "
                            f"image size ({ckpt['image_size']} px): a cell is one pixel or more")
    boxes = box_table(Path(data.root) / BBOX_LIST, table, ckpt["image_size"], data.format)
    examples = choose_examples(labels, cal, thresholds, explain.per_class)
    pairs = [(row, k) for k, _, row, _ in examples]
    pairs += [(b.row, CLASSES.index(b.Finding)) for b in boxes.itertuples()]
    sanity_rows = most_confident_positives(labels, raw, explain.sanity_images)  # the model's own scores, uncalibrated
    pairs += [(row, k) for k, rows in sanity_rows.items() for row in rows]  # their maps in the same pass
    with GradCAM(model, layer) as cam:
        maps = heatmaps(cam, test, pairs, tuple(ckpt["mean"]), tuple(ckpt["std"]), explain.batch_size, device)
        peaks = cam.peak_points((ckpt["image_size"],) * 2) if maps else None
    out = paths.PLOTS / "gradcam"
    with replace_dir(out) as tmp:
        draw(examples, maps, test, table, cal, raw, thresholds, boxes, tmp)
    report = {"layer": layer_name, **localisation(maps, boxes, explain.cam_threshold, explain.iobb_thresholds, peaks),
              "examples": {kind: sum(x[1] == kind for x in examples) for kind in KINDS}}
    if explain.sanity_images:  # after the `with`: the randomised copy must not copy the trained model's hooks
        sanity = sanity_checks(model, ckpt["arch"], layer_name, test, sanity_rows, maps, tuple(ckpt["mean"]),
                               tuple(ckpt["std"]), steps=explain.deletion_steps, grid=explain.deletion_grid,
                               seed=explain.sanity_seed, batch=explain.batch_size, device=device)
        sanity["settings"] = {"images_per_class": explain.sanity_images, **sanity["settings"]}
        report["sanity"] = sanity
    write_json(paths.REPORTS / "explain.json", report)
    write_json(paths.METRICS / "explain.json", headline(report))
    print_summary(report, len(examples), out, explain.iobb_thresholds)


def calibrated(raw: np.ndarray) -> tuple[dict, np.ndarray]:
    """The val thresholds and the test probabilities calibrated as predict calibrates them: examples are chosen by
    their margin over the threshold, so both must come from the same calibrate run."""
    thresholds, applies_to = load_thresholds(paths.THRESHOLDS)
    calibrator = load_calibrator(paths.CALIBRATOR)
    check_pairing(paths.THRESHOLDS, applies_to, calibrator, paths.CALIBRATOR)
    return thresholds, apply_calibrator(calibrator, raw)


def box_table(box_file: Path, table: pd.DataFrame, size: int, data_format: str = "nih") -> pd.DataFrame:
    """The test images' expert boxes in model pixels; none (with a warning) where the data root has no box list,
    and none for an own-data table (NIH's box list names NIH's images)."""
    if data_format == "nih" and box_file.is_file():
        return scaled_boxes(read_box_list(box_file), table, size, box_file)
    if data_format == "nih":
        warn(f"{box_file} not found: no localisation scores")
    return pd.DataFrame(columns=["Image Index", "Finding", "x", "y", "w", "h", "row"])


def print_summary(report: dict, overlays: int, out: Path, iobb_thresholds: list[float]) -> None:
    o = report["overall"]
    print(f"explain: {overlays} overlays in {out}; {o['boxes']} boxes: pointing game {o['pointing_game']} "
          f"(ceiling at this map size {o.get('pointing_game_ceiling')}), "
          + ", ".join(f"T(IoBB>{t:g}) {o[f'iobb_{t:g}']}" for t in iobb_thresholds))
    if "sanity" in report:
        s = report["sanity"]["overall"]
        print(f"explain sanity: {s['images']} images of {s['classes']} classes: Spearman with a randomised "
              f"{'+'.join(report['sanity']['settings']['randomised'])} {s['randomisation_spearman']} (low is good; "
              f"{s['constant_randomised_maps']} randomised maps constant, scored 0; {s['constant_trained_maps']} "
              f"trained maps constant, left out); deletion area Grad-CAM {s['deletion_area_gradcam']} vs "
              f"random {s['deletion_area_random']} (lower in {s['classes_gradcam_below_random']} of {s['classes']} "
              "classes)")


if __name__ == "__main__":
    run_main(main)

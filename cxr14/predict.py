"""Predict: per-image probabilities, calibrated probabilities, thresholds, decisions and margins, plus Grad-CAM.

The seed's `inference.py`, done right: images are decoded exactly as the prepare stage decodes them
(any PNG/JPEG, any size or mode, NIH's RGBA files included), decisions use the calibrated probability
against the val thresholds the calibrate stage chose, and an unreadable file is reported while the
other files are still processed (exit code 1 at the end).

    cxr14-predict IMAGE [IMAGE ...] [--json] [--gradcam DIR]     (or: python -m stages.predict ...)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cxr14 import paths
from cxr14.calibration import apply_calibrator, check_pairing, load_calibrator, load_thresholds
from cxr14.common import PipelineError, cpu_count, cpu_kernels, run_main
from cxr14.data import to_model_input
from cxr14.engine import forward, pick_device
from cxr14.gradcam import GradCAM, overlay
from cxr14.images import load_gray
from cxr14.model import gradcam_layer, load_checkpoint
from cxr14.params import PARAMS_FILE, Explain, Train, load_section


def margins(p: float, t: float | None) -> tuple[str, float | None, float | None]:
    """Decision, absolute margin p - t, and relative margin: how far p has gone from the threshold towards
    the end of its side, (p - t)/(1 - t) above t (1 at p = 1) and (p - t)/t below (-1 at p = 0).

    At t = 1 only p = 1 is positive and it sits on the threshold: relative margin 0. At t = 0 every p is
    positive: (p - 0)/(1 - 0) = p. So the relative margin is defined for every threshold in [0, 1].
    """
    if t is None:
        return "n/a", None, None
    if p >= t:
        return "POS", p - t, (p - t) / (1 - t) if t < 1 else 0.0
    return "NEG", p - t, (p - t) / t


def predict_one(path: str, model, ckpt, layer, calibrator, thresholds, gradcam_dir: Path | None,
                stem: str | None = None) -> dict:
    """One image's table rows (and heatmap files `<stem>_<Class>.png`, stem the file's own by default)."""
    gray = load_gray(path, ckpt["image_size"])  # ValueError with the reason for unreadable files
    device = next(model.parameters()).device
    x = to_model_input(torch.from_numpy(gray.copy())[None, None].to(device), tuple(ckpt["mean"]), tuple(ckpt["std"]))
    classes = list(ckpt["classes"])
    with torch.no_grad():
        raw = torch.sigmoid(forward(model, x))[0].cpu().numpy()
    cal = apply_calibrator(calibrator, raw[None], classes)[0] if calibrator else raw
    rows = []
    for k, name in enumerate(classes):
        decision, margin, rel = margins(float(cal[k]), thresholds.get(name))
        rows.append({"class": name, "probability": float(raw[k]), "calibrated": float(cal[k]),
                     "threshold": thresholds.get(name), "decision": decision, "margin": margin,
                     "relative_margin": rel})
    result = {"image": path, "predictions": rows}
    if gradcam_dir is not None:
        chosen = [k for k, r in enumerate(rows) if r["decision"] == "POS"]
        if not chosen:  # the single closest-to-positive class
            chosen = [max((k for k, r in enumerate(rows) if r["relative_margin"] is not None),
                          key=lambda k: rows[k]["relative_margin"], default=int(np.argmax(cal)))]
        with GradCAM(model, layer) as cam:
            _, maps = cam(x, chosen)
        gradcam_dir.mkdir(parents=True, exist_ok=True)
        result["gradcam"] = []
        for j, k in enumerate(chosen):
            r = rows[k]
            out = gradcam_dir / f"{stem or Path(path).stem}_{r['class']}.png"
            t = "n/a" if r["threshold"] is None else f"{r['threshold']:.3f}"
            overlay(gray, maps[0, j].cpu().numpy(), f"{Path(path).name}: {r['class']}\np={r['calibrated']:.3f}, t={t}, "
                    f"{r['decision']}", out)
            result["gradcam"].append(str(out))
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['image']}")
    print(f"{'class':<20}{'prob':>8}{'calib':>8}{'thresh':>8}  {'dec':<4}{'margin':>9}{'rel':>9}")
    for r in result["predictions"]:
        t = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
        m = "-" if r["margin"] is None else f"{r['margin']:+.3f}"
        rel = "-" if r["relative_margin"] is None else f"{r['relative_margin']:+.3f}"
        print(f"{r['class']:<20}{r['probability']:8.3f}{r['calibrated']:8.3f}{t:>8}  {r['decision']:<4}{m:>9}{rel:>9}")
    for path in result.get("gradcam", []):
        print(f"  Grad-CAM: {path}")


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cxr14-predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="PNG or JPEG files, any size or mode")
    parser.add_argument("--model", type=Path, default=paths.MODEL, help="train-stage checkpoint")
    parser.add_argument("--thresholds", type=Path, default=paths.THRESHOLDS, help="calibrate output")
    parser.add_argument("--calibrator", type=Path, default=paths.CALIBRATOR,
                        help="calibrate output; pass a missing path to use raw probabilities")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--gradcam", type=Path, metavar="DIR", help="write heatmaps of positive classes here")
    parser.add_argument("--layer", help="Grad-CAM layer, e.g. layer3 (default: explain.layer of --params, else the "
                        "last block)")
    parser.add_argument("--params", type=Path,
                        help="project params to read train.device (where the model runs), train.cpu_kernels and "
                        "explain.layer from "
                        "(default: params.yaml when the working directory has one; else the CPU and the last block)")
    args = parser.parse_args(argv)
    params = args.params or (PARAMS_FILE if PARAMS_FILE.is_file() else None)  # a named file must exist
    device, layer_name, layer_key = torch.device("cpu"), "auto", "--layer"
    if params is not None:
        train = load_section(params, Train)
        device = pick_device(train.device, f"{params} train.device")
        cpu_kernels(train.cpu_kernels)  # the kernels evaluate used for the probabilities thresholds were fitted on
        layer_name, layer_key = load_section(params, Explain).layer, f"{params} explain.layer"
    if args.layer:
        layer_name, layer_key = args.layer, "--layer"
    torch.set_num_threads(cpu_count())
    model, ckpt = load_checkpoint(args.model, device)
    thresholds, applies_to = load_thresholds(args.thresholds, ckpt["classes"])
    calibrator = load_calibrator(args.calibrator) if args.calibrator.is_file() else None
    check_pairing(args.thresholds, applies_to, calibrator, args.calibrator)
    if args.gradcam is not None and args.gradcam.exists() and not args.gradcam.is_dir():
        raise PipelineError(f"--gradcam {args.gradcam}: is a file; expected a folder for the heatmaps")
    try:
        _, layer = gradcam_layer(model, ckpt["arch"], layer_name)
    except PipelineError as exc:
        raise PipelineError(f"{layer_key}: {exc}") from None
    results, failed = [], 0
    stems = [Path(p).stem for p in args.images]
    repeated = {s for s, n in collections.Counter(stems).items() if n > 1}  # a/x.png and b/x.png: numbered overlays
    for i, path in enumerate(args.images):
        try:
            stem = f"{i + 1}_{stems[i]}" if stems[i] in repeated else stems[i]
            result = predict_one(path, model, ckpt, layer, calibrator, thresholds, args.gradcam, stem)
        except ValueError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        results.append(result)
        if not args.json:
            print_table(result)
    if args.json:
        print(json.dumps(results, indent=2))
    if failed:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """The `cxr14-predict` console command: one-line errors, exit code 1 when any image failed."""
    run_main(run, argv)


if __name__ == "__main__":
    main()

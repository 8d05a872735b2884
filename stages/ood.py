"""Ood stage: how well the checkpoint's out-of-distribution score separates images the model should not judge.

Scores the in-distribution test images and four kinds of images that are not chest radiographs like the
training ones (`cxr14.evaluation.ood_sets`: photographs, blank/noise/checkerboard images, CT and MR slices, test
radiographs inverted, rotated 90 degrees or upside down) with the checkpoint's score (`cxr14.model.ood`, fitted
by the train stage: a Gaussian on the train images' features, the threshold on val). Per set: AUROC of the score
against the test images (1: every out-of-distribution image scores above every test image) and the share flagged
at the threshold. metrics/ood.json holds those per set and the test images' share flagged; reports/ood.json the
same per variant with score quantiles. The real NIH sample is measured by benchmarks/bench_ood.py (outside the
repository).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from cxr14 import paths
from cxr14.data.loader import PreparedImages
from cxr14.data.nih import CLASSES
from cxr14.evaluation.metrics import auc
from cxr14.evaluation.ood_sets import ood_sets
from cxr14.model.checkpoint import load_checkpoint
from cxr14.model.ood import check_ood, scores_of
from cxr14.params import PARAMS_FILE, load_params
from cxr14.runtime.devices import cpu_count, cpu_kernels, pick_device
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import rounded, write_json
from cxr14.runtime.signals import run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (sections ood, train)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    ood, train = params.ood, params.train
    device = pick_device(train.device, f"{args.params} train.device")
    torch.set_num_threads(cpu_count())
    cpu_kernels(train.cpu_kernels)
    model, ckpt = load_checkpoint(paths.MODEL, device, CLASSES)
    if ckpt.get("ood") is None:
        raise PipelineError(f"{paths.MODEL}: no out-of-distribution fit (ood); expected a checkpoint of this "
                            "revision's train stage: run dvc repro train")
    fit = check_ood(ckpt["ood"], str(paths.MODEL))
    data = PreparedImages(paths.PREPARED / "test.npy")
    data.require_size(ckpt["image_size"], paths.MODEL)
    test_images = np.load(data.path, mmap_mode="r")
    test = scores_of(model, ckpt, test_images, ood.batch_size, "ood: test")
    scored = {name: {v: scores_of(model, ckpt, images, ood.batch_size, f"ood: {v}") for v, images in variants.items()}
              for name, variants in ood_sets(test_images, ood.images, ood.seed).items()}
    report = summarise(test, scored, float(fit["threshold"]))
    write_json(paths.REPORTS / "ood.json", report)
    write_json(paths.METRICS / "ood.json", headline(report))
    for name, s in report["sets"].items():
        print(f"ood: {name}: AUROC {s['auroc']} against {report['test']['images']} test images, {s['flagged']:.1%} "
              f"of {s['images']} flagged")
    print(f"ood: test images flagged at the val threshold {report['threshold']}: {report['test']['flagged']:.1%}")


def separation(test: np.ndarray, other: np.ndarray, threshold: float) -> dict[str, Any]:
    """AUROC of the score, out-of-distribution images as positives against the test images, and the share of
    them flagged at `threshold`."""
    labels = np.r_[np.zeros(len(test)), np.ones(len(other))]
    return {"images": len(other), "auroc": rounded(float(auc(np.r_[test, other], labels))),
            "flagged": rounded(float((other > threshold).mean())),
            "median_score": rounded(float(np.median(other)))}


def summarise(test: np.ndarray, scored: dict[str, dict[str, np.ndarray]], threshold: float) -> dict[str, Any]:
    """reports/ood.json: per set (its variants pooled) and per variant."""
    quantiles = {q: rounded(float(np.quantile(test, float(q)))) for q in ("0.5", "0.95", "0.99")}
    return {"threshold": rounded(threshold),
            "test": {"images": len(test), "flagged": rounded(float((test > threshold).mean())),
                     "score_quantiles": quantiles},
            "sets": {name: separation(test, np.concatenate(list(variants.values())), threshold)
                     for name, variants in scored.items()},
            "variants": {v: separation(test, s, threshold)
                         for variants in scored.values() for v, s in variants.items()}}


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """metrics/ood.json: AUROC and share flagged per set, and the test images' share flagged (9 numbers)."""
    out: dict[str, Any] = {"test_flagged": report["test"]["flagged"]}
    for name, s in report["sets"].items():
        out[f"{name}_auroc"], out[f"{name}_flagged"] = s["auroc"], s["flagged"]
    return out


if __name__ == "__main__":
    run_main(main)

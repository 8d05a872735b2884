"""Train stage: the seed's fine-tuning recipe with its bugs fixed, logged with dvclive, resumable.

Fixed against the seed: `pos_weight` (not `weight`) in the loss, frozen layers' BatchNorm kept in
eval mode, validation patients disjoint from training (split stage). Every epoch updates the resume
point models/resume/last.pt (outside DVC's outputs, so neither `dvc exp run` nor `dvc checkout` restores
an older one over it); `train.resume: true` continues a killed run from there with the same result as an
uninterrupted run. When training ends, the best epoch goes to models/model.pt, the per-epoch log to
dvclive/ and the summary to metrics/train.json, all three from the resume point.
"""

from __future__ import annotations

import argparse

import torch

from cxr14 import paths
from cxr14.common import PipelineError, cpu_count, cpu_kernels, remove_leftovers, rounded, run_main, write_json
from cxr14.data import PreparedImages, read_labels
from cxr14.engine import pick_device
from cxr14.model import build_model, freeze, imagenet_weights, save_checkpoint
from cxr14.nih import CLASSES
from cxr14.params import PARAMS_FILE, Train, load_section
from cxr14.training import best_checkpoint, fingerprint, fit, write_log

TRAIN_METRICS = paths.METRICS / "train.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (section train)")
    args = parser.parse_args(argv)
    t = load_section(args.params, Train)
    cpu_kernels(t.cpu_kernels)
    try:  # settings and weights before any data: offline, a missing download fails within seconds
        device = pick_device(t.device)
        torch.set_num_threads(cpu_count())
        torch.manual_seed(t.seed)
        model = build_model(t.arch, t.weights, len(CLASSES), t.output_stride)
        frozen = freeze(model, t.freeze)
    except PipelineError as exc:  # name the params file for errors about a train.* value
        raise PipelineError(f"{args.params} {exc}" if str(exc).startswith("train.") else str(exc)) from None
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    pretrained = None if t.weights == "none" else str(imagenet_weights(t.arch, t.weights))
    for output in (paths.RESUME_POINT, paths.MODEL, paths.DVCLIVE, TRAIN_METRICS):
        remove_leftovers(output)  # what a SIGKILLed run left, before anything else can fail
    train_set = PreparedImages(paths.PREPARED / "train.npy", read_labels(paths.SPLIT / "train.csv"))
    val_set = PreparedImages(paths.PREPARED / "val.npy", read_labels(paths.SPLIT / "val.csv"))
    data = fingerprint([paths.PREPARED / "train.npy", paths.PREPARED / "val.npy", paths.SPLIT / "train.csv",
                        paths.SPLIT / "val.csv"])
    final = fit(model, frozen, train_set, val_set, t, device, paths.RESUME_POINT, data)
    state = final["state"]
    # Derived from the resume point in this order; a kill between two of them is undone by any re-run.
    save_checkpoint(paths.MODEL, best_checkpoint(final["best_model"], state, t, train_set.image_size, pretrained, data))
    write_log(state["history"], paths.DVCLIVE)
    write_json(TRAIN_METRICS, {
        "best_epoch": state["best_epoch"], "best_val_mean_auc": rounded(state["best_auc"]),
        "epochs_run": state["epoch"], "seconds": rounded(state["seconds"], 1),
        "images_per_second": rounded(state["images"] / max(state["seconds"], 1e-9), 1),
    })


if __name__ == "__main__":
    run_main(main)

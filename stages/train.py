"""Train stage: the seed's fine-tuning recipe with its bugs fixed, logged with dvclive, resumable.

Fixed against the seed: `pos_weight` (not `weight`) in the loss, frozen layers' BatchNorm kept in
eval mode, validation patients disjoint from training (split stage). The best epoch by validation
mean ROC-AUC goes to models/model.pt, every epoch to models/last.pt; `train.resume: true` continues
a killed run from there with the same result as an uninterrupted run.
"""

from __future__ import annotations

import argparse

import torch

from cxr14 import paths
from cxr14.common import PipelineError, cpu_count, cpu_kernels, rounded, run_main, write_json
from cxr14.data import PreparedImages, read_labels
from cxr14.engine import pick_device
from cxr14.model import build_model, freeze, imagenet_weights
from cxr14.nih import CLASSES
from cxr14.params import PARAMS_FILE, Train, load_section
from cxr14.training import fingerprint, fit


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
    train_set = PreparedImages(paths.PREPARED / "train.npy", read_labels(paths.SPLIT / "train.csv"))
    val_set = PreparedImages(paths.PREPARED / "val.npy", read_labels(paths.SPLIT / "val.csv"))
    from dvclive import Live  # imported here: it takes seconds, and a bad setting above should not wait for it

    def open_log(resumed: bool) -> Live:
        return Live(dir=str(paths.DVCLIVE), resume=resumed, save_dvc_exp=False, dvcyaml=None)

    data = fingerprint([paths.PREPARED / "train.npy", paths.PREPARED / "val.npy", paths.SPLIT / "train.csv",
                        paths.SPLIT / "val.csv"])
    state = fit(model, frozen, train_set, val_set, t, device, open_log, paths.MODELS, pretrained, data)
    write_json(paths.METRICS / "train.json", {
        "best_epoch": state["best_epoch"], "best_val_mean_auc": rounded(state["best_auc"]),
        "epochs_run": state["epoch"], "seconds": rounded(state["seconds"], 1),
        "images_per_second": rounded(state["images"] / max(state["seconds"], 1e-9), 1),
    })


if __name__ == "__main__":
    run_main(main)

"""GPU check: the library's CUDA paths run and measured in one command, on whatever GPU is at hand.

1. training steps with bf16 autocast + channels_last (what `train.device: auto` does on CUDA) against fp32:
   the losses after a few identical steps, and images/s of each (the demo's resnet18 at 96 px; ResNet50 at
   224 px with the NIH recipe's freeze);
2. evaluation on the GPU against the CPU, same weights: the largest probability difference;
3. predict (`cxr14.predict.predict_one`, Grad-CAM included) on the GPU against the CPU.
`--smoke` runs the same code on the CPU with tiny sizes (the test suite does, so this script never rots).

    python benchmarks/gpu_check.py [--smoke] [--json gpu_check.json]
    (where the project is not pip-installed, as on a bare GPU machine: PYTHONPATH=. before it)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr14.data import PreparedImages, make_loader
from cxr14.engine import Batches, evaluate, loss_function
from cxr14.model import build_model, freeze, gradcam_layer, param_groups, set_train_mode
from cxr14.predict import predict_one

NIH_FREEZE = ["conv1", "bn1", "layer1", "layer2", "layer3"]


def synthetic(folder: Path, images: int, size: int) -> PreparedImages:
    """Random prepared images and labels (every class two-sided), as the prepare stage would write them."""
    rng = np.random.default_rng(0)
    np.save(folder / f"{size}.npy", rng.integers(0, 256, (images, size, size), dtype=np.uint8))
    labels = (rng.random((images, 14)) < 0.3).astype(np.float32)
    labels[0], labels[1] = 1, 0
    return PreparedImages(folder / f"{size}.npy", labels)


def train_steps(arch: str, frozen_prefixes: list[str], data: PreparedImages, device: torch.device, batch: int,
                steps: int, bf16: bool) -> tuple[list[float], float, torch.nn.Module]:
    """`steps` optimisation steps from seed 0; (losses, images/s after one warm-up step, the model)."""
    torch.manual_seed(0)
    model = build_model(arch, "none")
    frozen = freeze(model, frozen_prefixes)
    model.to(device, memory_format=torch.channels_last if bf16 else torch.preserve_format)
    optimizer = torch.optim.AdamW(param_groups(model, arch, 1e-3, 1e-4), weight_decay=1e-4)
    criterion = loss_function(data.labels, 20.0).to(device)
    batches = Batches(device, reuse=True)
    batches.channels_last = bf16
    loader = make_loader(data, batch, shuffle=True, seed=0, drop_last=True)
    set_train_mode(model, frozen)
    losses, start = [], 0.0
    for i, (images, labels) in zip(range(steps + 1), loader, strict=False):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batches(images))
        loss = criterion(logits.float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # .item() waits for the GPU: the clock below counts finished steps
    seconds = time.perf_counter() - start
    return losses, (len(losses) - 1) * batch / max(seconds, 1e-9), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the code runs, measures nothing")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    gpu = torch.device("cpu" if args.smoke else "cuda")
    if gpu.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run with --smoke to check the code on the CPU")
    cpu = torch.device("cpu")
    n, steps = (8, 2) if args.smoke else (1024, 20)
    out: dict = {"device": torch.cuda.get_device_name() if gpu.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as tmp:
        small, large = (32, 32) if args.smoke else (96, 224)
        configs = (("resnet18", [], synthetic(Path(tmp), n, small), 4 if args.smoke else 32),
                   ("resnet50", NIH_FREEZE, synthetic(Path(tmp), n, large), 4 if args.smoke else 64))
        for arch, prefixes, data, batch in configs:
            fp32, fp32_speed, _ = train_steps(arch, prefixes, data, gpu, batch, steps, bf16=False)
            bf16, bf16_speed, model = train_steps(arch, prefixes, data, gpu, batch, steps, bf16=gpu.type == "cuda")
            gap = max(abs(a - b) for a, b in zip(fp32, bf16, strict=True))
            out[f"train_{arch}"] = {"batch": batch, "steps": steps, "fp32_images_per_s": round(fp32_speed, 1),
                                    "bf16_channels_last_images_per_s": round(bf16_speed, 1),
                                    "speedup": round(bf16_speed / fp32_speed, 2), "fp32_last_loss": round(fp32[-1], 5),
                                    "bf16_last_loss": round(bf16[-1], 5), "max_loss_difference": round(gap, 5)}
        # 2. evaluation, same weights on both devices (the last model: resnet50, trained above)
        loader = make_loader(data, 2 * batch, shuffle=False)
        on_gpu = evaluate(model.eval(), loader, torch.nn.BCEWithLogitsLoss(), Batches(gpu))["probs"]
        on_cpu = evaluate(model.to(cpu, memory_format=torch.contiguous_format), loader, torch.nn.BCEWithLogitsLoss(),
                          Batches(cpu))["probs"]
        out["evaluate_max_probability_difference"] = float(np.abs(on_gpu - on_cpu).max())
        # 3. predict one PNG with Grad-CAM on both devices
        size = data.image_size
        png = Path(tmp) / "image.png"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (2 * size, 2 * size), dtype=np.uint8)).save(png)
        ckpt = {"image_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                "classes": [f"c{k}" for k in range(14)]}
        rows = {}
        for device in (gpu, cpu):
            model.to(device)
            _, layer = gradcam_layer(model, "resnet50")
            start = time.perf_counter()
            result = predict_one(str(png), model, ckpt, layer, None, {}, Path(tmp) / device.type)
            rows[device.type] = (np.array([r["probability"] for r in result["predictions"]]),
                                 time.perf_counter() - start, len(result["gradcam"]))
        (p_gpu, s_gpu, maps), (p_cpu, s_cpu, _) = rows[gpu.type], rows["cpu"]
        out["predict"] = {"max_probability_difference": float(np.abs(p_gpu - p_cpu).max()), "heatmaps": maps,
                          "seconds_gpu": round(s_gpu, 3), "seconds_cpu": round(s_cpu, 3)}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

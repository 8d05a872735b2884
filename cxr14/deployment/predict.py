"""Predict: per-image probabilities, calibrated probabilities, thresholds, decisions and margins, plus Grad-CAM.

The seed's `inference.py`, done right and for many images: files, folders (searched recursively for PNG and
JPEG) and globs; images decoded exactly as the prepare stage decodes them (any PNG/JPEG, any size or mode, NIH's
RGBA files included), in threads, ahead of the model, and run in batches; decisions use the calibrated
probability against the val thresholds the calibrate stage chose; an unreadable file is reported in one line
while the other files are still processed (exit code 1 at the end).

Two engines. `onnx` (the default without --gradcam) runs the export stage's model with ONNX Runtime and never
imports PyTorch: the file carries its classes, image size, calibrator and thresholds. On a CPU that model is
models/model.int8.onnx (8-bit: about 3x faster than float32 here, at the same test AUC) where the CPU has 8-bit
dot products; `--precision fp32` for models/model.onnx, what a GPU runs. Which file ran is printed (stderr
with --csv, stdout before the tables, a `model` field with --json). `torch` runs the
train stage's checkpoint with calibrate's JSON files, and is the one that draws Grad-CAM heatmaps.

    cxr14-predict IMAGE|FOLDER|GLOB ... [--csv OUT] [--json] [--gradcam DIR] [--engine onnx|torch]
                  [--precision auto|int8|fp32]
    (or: python -m stages.predict ...)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cxr14 import paths
from cxr14.data.images import load_gray
from cxr14.data.nih import IMAGE_SUFFIXES
from cxr14.evaluation.calibration import (
    apply_calibrator,
    check_calibrator,
    check_pairing,
    load_calibrator,
    load_thresholds,
)
from cxr14.params import PARAMS_FILE, Explain, Train, load_section
from cxr14.runtime.devices import cpu_count
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import atomic_path
from cxr14.runtime.progress import progress
from cxr14.runtime.signals import run_main

ENGINES = ("onnx", "torch")
PRECISIONS = ("auto", "int8", "fp32")
CSV_COLUMNS = ("image", "class", "probability", "calibrated", "threshold", "decision", "margin", "relative_margin")
BAR_AFTER = 8  # a progress bar for more images than this


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


def expand_inputs(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """The image files that `items` name, in order and each once, and one error line per item that names none.

    A folder stands for its PNG and JPEG files, searched recursively and sorted; an item with glob characters
    that is not itself a file is expanded (`**` crosses folders); anything else is taken as a file, so that a
    missing one is reported like an unreadable one.
    """
    files: dict[str, str] = {}  # one file however it is spelled (a/x.png, ./a/x.png): its first spelling
    errors = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                errors.append(f"{item}: folder holds no PNG or JPEG file")
        elif not path.exists() and glob.has_magic(item):
            found = []
            for match in sorted(glob.glob(item, recursive=True)):
                if Path(match).is_dir():
                    found += sorted(str(p) for p in Path(match).rglob("*")
                                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
                elif Path(match).suffix.lower() in IMAGE_SUFFIXES:
                    found.append(match)
            if not found:
                errors.append(f"{item}: pattern matches no PNG or JPEG file")
        else:
            found = [item]
        for f in found:
            files.setdefault(os.path.normcase(os.path.abspath(f)), f)
    return list(files.values()), errors


def decoded(files: Sequence[str], size: int, threads: int, ahead: int = 0) -> Iterator[tuple[str, np.ndarray | str]]:
    """(file, uint8 (size, size) image or the reason it failed), in order, decoded by `threads` threads that stay
    up to `ahead` images ahead of the consumer (Pillow releases the GIL while it decodes, so the threads go on
    decoding while the model runs on the batch before: `ahead` should exceed a batch)."""

    def one(path: str) -> np.ndarray | str:
        try:
            return load_gray(path, size)
        except ValueError as exc:  # load_gray's reason: unreadable, not an image, truncated
            return str(exc)
        except Exception as exc:  # anything else a decoder may raise: this file is reported, the others go on
            return f"cannot decode image ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"

    if threads <= 1:
        for path in files:
            yield path, one(path)
        return
    pool = ThreadPoolExecutor(threads)
    try:
        window: collections.deque = collections.deque()
        it = iter(files)
        for path in it:  # keep a bounded window in flight: memory stays flat for any number of files
            window.append((path, pool.submit(one, path)))
            if len(window) >= max(4 * threads, ahead):
                break
        while window:
            path, future = window.popleft()
            nxt = next(it, None)
            if nxt is not None:
                window.append((nxt, pool.submit(one, nxt)))
            yield path, future.result()
    finally:  # an error or Ctrl-C downstream: drop the decodes not started rather than wait for the window
        pool.shutdown(wait=True, cancel_futures=True)


def int8_is_fast() -> bool:
    """Whether this CPU multiplies 8-bit numbers without saturating (Arm; x86-64 with VNNI, read from
    /proc/cpuinfo): only there is the int8 model what export checked. Elsewhere, or where it cannot tell
    (x86 macOS, Windows), predict's default is float32."""
    import platform

    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_vnni", "avx_vnni"} & set(line.split()))
    except OSError:
        pass
    return False


class OnnxEngine:
    """An exported model through ONNX Runtime; classes, image size, calibrator and thresholds from its metadata."""

    name = "onnx"

    def __init__(self, model: Path, device: str, device_key: str = "--device") -> None:
        import onnxruntime as ort

        from cxr14.deployment.onnx_file import INPUT_NAME, OUTPUT_NAME, read_metadata, session

        if not model.is_file():
            raise PipelineError(f"{model}: not found; run the export stage (dvc repro export), or use --engine torch "
                                "with the checkpoint")
        providers: list = ["CPUExecutionProvider"]  # cpu, and any device ONNX Runtime has no provider for (mps)
        cuda = device == "cuda" or device.startswith("cuda:")
        if cuda:
            index = device.partition(":")[2] or "0"
            if not index.isdigit():
                raise PipelineError(f"{device_key}: {device}; expected cpu, cuda or cuda:N")
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise PipelineError(f"{device_key} {device}: this ONNX Runtime has no CUDA provider (install "
                                    "onnxruntime-gpu), or use --device cpu or --engine torch")
            providers = [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
        try:
            # ONNX Runtime prints a provider that fails to start (and falls back to the CPU) on stdout, where it
            # would break --json: it goes to stderr, and a CUDA session that did not start is an error below
            with contextlib.redirect_stdout(sys.stderr):
                self.session = session(model, providers, spin=False)  # the decoding threads need the cores
        except Exception as exc:  # onnxruntime's own errors for a foreign or truncated file
            raise PipelineError(f"{model}: not a readable ONNX model ({' '.join(str(exc).split())[:300]})") from None
        if cuda and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise PipelineError(f"{device_key} {device}: ONNX Runtime could not start on that GPU (see above); use "
                                "--device cpu or --engine torch")
        self.meta = read_metadata(self.session)
        self.input, self.output = INPUT_NAME, OUTPUT_NAME
        self.classes, self.image_size = list(self.meta["classes"]), int(self.meta["image_size"])
        where = f"{model} metadata"
        self.calibrator = check_calibrator(self.meta["calibrator"], where, self.classes) \
            if self.meta.get("calibrator") else None
        self.thresholds = self.meta["thresholds"]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S) -> raw probabilities (B, C)."""
        return self.session.run([self.output], {self.input: images[:, None]})[0].astype(np.float64)


class TorchEngine:
    """The train stage's checkpoint in PyTorch: what draws Grad-CAM. Imported only when asked for."""

    name = "torch"

    def __init__(self, model: Path, device: str, device_key: str, cpu_kernels_kind: str | None, layer_name: str,
                 layer_key: str) -> None:
        import torch

        from cxr14.model.checkpoint import load_checkpoint
        from cxr14.model.factory import gradcam_layer
        from cxr14.runtime.devices import cpu_kernels, pick_device

        self.torch = torch
        torch.set_num_threads(cpu_count())
        if cpu_kernels_kind:
            cpu_kernels(cpu_kernels_kind)  # the kernels evaluate used for the probabilities thresholds were fitted on
        self.device = pick_device(device, device_key)
        self.model, self.ckpt = load_checkpoint(model, self.device)
        self.classes, self.image_size = list(self.ckpt["classes"]), int(self.ckpt["image_size"])
        try:
            _, self.layer = gradcam_layer(self.model, self.ckpt["arch"], layer_name)
        except PipelineError as exc:
            raise PipelineError(f"{layer_key}: {exc}") from None

    def inputs(self, images: np.ndarray) -> Any:
        from cxr14.data.loader import to_model_input

        x = self.torch.from_numpy(np.ascontiguousarray(images)[:, None]).to(self.device)
        return to_model_input(x.float(), tuple(self.ckpt["mean"]), tuple(self.ckpt["std"]))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        from cxr14.model.inference import forward

        with self.torch.no_grad():
            return self.torch.sigmoid(forward(self.model, self.inputs(images))).cpu().numpy().astype(np.float64)

    def gradcam(self, images: np.ndarray, chosen: list[list[int]]) -> list[list[np.ndarray]]:
        """Heatmaps of the chosen classes of each image (one backward pass per image and class)."""
        from cxr14.explanation.gradcam import GradCAM

        maps = []
        with GradCAM(self.model, self.layer) as cam:
            for i, classes in enumerate(chosen):
                _, m = cam(self.inputs(images[i:i + 1]), classes)
                maps.append([m[0, j].cpu().numpy() for j in range(len(classes))])
        return maps


def rows_for(raw: np.ndarray, cal: np.ndarray, classes: Sequence[str], thresholds: dict) -> list[dict]:
    """One image's table: per class probability, calibrated, threshold, decision and margins."""
    rows = []
    for k, name in enumerate(classes):
        decision, margin, rel = margins(float(cal[k]), thresholds.get(name))
        rows.append({"class": name, "probability": float(raw[k]), "calibrated": float(cal[k]),
                     "threshold": thresholds.get(name), "decision": decision, "margin": margin,
                     "relative_margin": rel})
    return rows


def heatmap_classes(rows: list[dict], cal: np.ndarray) -> list[int]:
    """The positive classes, or else the single closest to positive."""
    chosen = [k for k, r in enumerate(rows) if r["decision"] == "POS"]
    if not chosen:
        chosen = [max((k for k, r in enumerate(rows) if r["relative_margin"] is not None),
                      key=lambda k: rows[k]["relative_margin"], default=int(np.argmax(cal)))]
    return chosen


def draw_heatmaps(result: dict, gray: np.ndarray, maps: list[np.ndarray], chosen: list[int], folder: Path,
                  stem: str) -> None:
    from cxr14.explanation.gradcam import overlay

    folder.mkdir(parents=True, exist_ok=True)
    result["gradcam"] = []
    for m, k in zip(maps, chosen, strict=True):
        r = result["predictions"][k]
        out = folder / f"{stem}_{r['class']}.png"
        t = "n/a" if r["threshold"] is None else f"{r['threshold']:.3f}"
        overlay(gray, m, f"{Path(result['image']).name}: {r['class']}\np={r['calibrated']:.3f}, t={t}, "
                f"{r['decision']}", out)
        result["gradcam"].append(str(out))


def predict_one(path: str, model, ckpt, layer, calibrator, thresholds, gradcam_dir: Path | None,
                stem: str | None = None) -> dict:
    """One image through a PyTorch model (the library call the benchmarks and GPU checks use): its table rows,
    and heatmap files `<stem>_<Class>.png` when `gradcam_dir` is given."""
    import torch

    from cxr14.data.loader import to_model_input
    from cxr14.explanation.gradcam import GradCAM
    from cxr14.model.inference import forward

    gray = load_gray(path, ckpt["image_size"])  # ValueError with the reason for unreadable files
    device = next(model.parameters()).device
    x = to_model_input(torch.from_numpy(gray.copy())[None, None].to(device), tuple(ckpt["mean"]), tuple(ckpt["std"]))
    classes = list(ckpt["classes"])
    with torch.no_grad():
        raw = torch.sigmoid(forward(model, x))[0].cpu().numpy()
    cal = apply_calibrator(calibrator, raw[None], classes)[0] if calibrator else raw
    result = {"image": path, "predictions": rows_for(raw, cal, classes, thresholds)}
    if gradcam_dir is not None:
        chosen = heatmap_classes(result["predictions"], cal)
        with GradCAM(model, layer) as cam:
            _, maps = cam(x, chosen)
        draw_heatmaps(result, gray, [maps[0, j].cpu().numpy() for j in range(len(chosen))], chosen, gradcam_dir,
                      stem or Path(path).stem)
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


def csv_rows(result: dict) -> Iterator[list]:
    """Long format: one row per image and class; empty cells where a class has no threshold."""
    for r in result["predictions"]:
        yield [result["image"], *("" if r[c] is None else r[c] for c in CSV_COLUMNS[1:])]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cxr14-predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="PNG or JPEG files (any size or mode), folders (searched "
                        "recursively) or glob patterns (quote them: '**' crosses folders)")
    parser.add_argument("--engine", choices=ENGINES, help="onnx: the exported model through ONNX Runtime, no PyTorch "
                        "(the default); torch: the checkpoint (the default with --gradcam or a .pt --model)")
    parser.add_argument("--model", type=Path, help="the export stage's .onnx (onnx engine; default: see "
                        f"--precision) or the train stage's checkpoint (torch engine; default {paths.MODEL})")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=f"onnx engine's default model: "
                        f"int8 {paths.ONNX_INT8}, fp32 {paths.ONNX}; auto (the default): int8 on a CPU where the "
                        "export stage wrote it and found it within export.int8_max_auc_drop, and the CPU has 8-bit "
                        "dot products (VNNI, Arm), else fp32")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: train.device of --params, else cpu; the "
                        "onnx engine needs onnxruntime-gpu for CUDA)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--threads", type=int, help="decoding threads (default: the cores this process may use)")
    parser.add_argument("--thresholds", type=Path, help=f"torch engine: calibrate output (default {paths.THRESHOLDS}); "
                        "onnx engine: replaces the thresholds embedded in the model")
    parser.add_argument("--calibrator", type=Path, help=f"torch engine: calibrate output (default {paths.CALIBRATOR}; "
                        "a missing path means raw probabilities); onnx engine: replaces the embedded one")
    parser.add_argument("--csv", type=Path, metavar="OUT", help="write one row per image and class here (atomically)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--gradcam", type=Path, metavar="DIR", help="write heatmaps of positive classes here "
                        "(torch engine)")
    parser.add_argument("--layer", help="Grad-CAM layer, e.g. layer3 (default: explain.layer of --params, else the "
                        "last block)")
    parser.add_argument("--params", type=Path,
                        help="project params to read train.device, train.cpu_kernels and explain.layer from "
                        "(default: params.yaml when the working directory has one; else the CPU and the last block)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: expected a positive integer")
    if args.engine is None:
        pt = args.model is not None and args.model.suffix in (".pt", ".pth")
        args.engine = "torch" if args.gradcam is not None or pt else "onnx"
    if args.engine == "onnx" and args.gradcam is not None:
        parser.error("--gradcam needs --engine torch (an ONNX graph has no gradients to draw heatmaps from)")
    if args.precision != "auto" and (args.model is not None or args.engine != "onnx"):
        parser.error(f"--precision {args.precision} picks the onnx engine's default model; "
                     f"{'--model names the file' if args.model is not None else 'the torch engine runs float32'}")
    if args.model is None and args.engine == "torch":
        args.model = paths.MODEL
    return args


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = args.params or (PARAMS_FILE if PARAMS_FILE.is_file() else None)  # a named file must exist
    device, device_key, kernels, layer_name, layer_key = "cpu", "--device", None, "auto", "--layer"
    if params is not None:
        train = load_section(params, Train)
        device, device_key, kernels = train.device, f"{params} train.device", train.cpu_kernels
        layer_name, layer_key = load_section(params, Explain).layer, f"{params} explain.layer"
    if args.device:
        device, device_key = args.device, "--device"
    if args.layer:
        layer_name, layer_key = args.layer, "--layer"
    if args.gradcam is not None and args.gradcam.exists() and not args.gradcam.is_dir():
        raise PipelineError(f"--gradcam {args.gradcam}: is a file; expected a folder for the heatmaps")
    if args.csv is not None and args.csv.is_dir():
        raise PipelineError(f"--csv {args.csv}: is a folder; expected a file name for the table")
    files, missing = expand_inputs(args.images)
    for line in missing:
        print(f"error: {line}", file=sys.stderr)

    if args.engine == "onnx":
        if device == "auto":  # the project's default: a GPU when this ONNX Runtime can use one
            import onnxruntime as ort

            device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        cuda = device == "cuda" or device.startswith("cuda:")
        if args.precision == "int8" and cuda:
            raise PipelineError(f"--precision int8 with {device_key} {device}: the int8 model is for the CPU (a GPU "
                                "runs its 8-bit graph no faster than float32); use --precision fp32 or --device cpu")
        auto = args.model is None and args.precision == "auto"
        if args.model is None:
            int8 = args.precision == "int8" or (auto and not cuda and int8_is_fast() and paths.ONNX_INT8.is_file())
            args.model = paths.ONNX_INT8 if int8 else paths.ONNX
        engine: OnnxEngine | TorchEngine = OnnxEngine(args.model, device, device_key)
        if auto and engine.meta.get("int8_within_limit") is False:
            print(f"note: {args.model} scored more than export.int8_max_auc_drop below float32 at export; running "
                  f"{paths.ONNX} (--precision int8 to run it anyway)", file=sys.stderr)
            args.model = paths.ONNX
            engine = OnnxEngine(args.model, device, device_key)
        thresholds, calibrator, calibrator_where = engine.thresholds, engine.calibrator, f"{args.model} metadata"
        thresholds_where = calibrator_where
        applies_to = engine.calibrator["method"] if engine.calibrator else "none"  # what export embedded together
        if args.calibrator is not None:
            calibrator = load_calibrator(args.calibrator) if args.calibrator.is_file() else None
            calibrator_where = str(args.calibrator)
        if args.thresholds is not None:
            thresholds, applies_to = load_thresholds(args.thresholds, engine.classes)
            thresholds_where = str(args.thresholds)
        check_pairing(thresholds_where, applies_to, calibrator, calibrator_where)
    else:
        engine = TorchEngine(args.model, device, device_key, kernels, layer_name, layer_key)
        thresholds_path = args.thresholds or paths.THRESHOLDS
        calibrator_path = args.calibrator or paths.CALIBRATOR
        thresholds, applies_to = load_thresholds(thresholds_path, engine.classes)
        calibrator = load_calibrator(calibrator_path) if calibrator_path.is_file() else None
        check_pairing(thresholds_path, applies_to, calibrator, calibrator_path)

    stems = [Path(p).stem for p in files]
    repeated = {s for s, n in collections.Counter(stems).items() if n > 1}  # a/x.png and b/x.png: numbered overlays
    tables = not args.json and args.csv is None
    if tables:
        print(f"model: {args.model} ({engine.name} engine)")
    results, failed = [], len(missing)
    with contextlib.ExitStack() as stack:  # the CSV appears whole when every image is done, or not at all
        writer = None
        if args.csv is not None:
            writer = csv.writer(stack.enter_context(open(stack.enter_context(atomic_path(args.csv)), "w", newline="")))
            writer.writerow(CSV_COLUMNS)
        bar = stack.enter_context(progress(total=len(files), unit="image", desc="predict",
                                           **({"disable": True} if len(files) <= BAR_AFTER else {})))
        batch: list[tuple[int, str, np.ndarray]] = []

        def flush() -> None:
            if not batch:
                return
            images = np.stack([g for _, _, g in batch])
            raw = engine.probabilities(images)
            cal = apply_calibrator(calibrator, raw, engine.classes) if calibrator else raw
            tables_of = [rows_for(raw[i], cal[i], engine.classes, thresholds) for i in range(len(batch))]
            if args.gradcam is not None:
                chosen = [heatmap_classes(rows, cal[i]) for i, rows in enumerate(tables_of)]
                maps = engine.gradcam(images, chosen)  # type: ignore[union-attr]
            for i, (index, path, gray) in enumerate(batch):
                result = {"image": path, "model": str(args.model), "predictions": tables_of[i]}
                if args.gradcam is not None:
                    stem = f"{index + 1}_{stems[index]}" if stems[index] in repeated else stems[index]
                    draw_heatmaps(result, gray, maps[i], chosen[i], args.gradcam, stem)
                if writer is not None:
                    writer.writerows(csv_rows(result))
                if args.json:
                    results.append(result)
                elif tables:
                    bar.clear()
                    print_table(result)
            bar.update(len(batch))
            batch.clear()

        for index, (path, image) in enumerate(decoded(files, engine.image_size, args.threads or cpu_count(),
                                                            ahead=2 * args.batch_size)):
            if isinstance(image, str):
                bar.clear()
                print(f"error: {path}: {image}", file=sys.stderr)
                failed += 1
                bar.update(1)
                continue
            batch.append((index, path, image))
            if len(batch) >= args.batch_size:
                flush()
        flush()
    if args.json:
        print(json.dumps(results, indent=2))
    if args.csv is not None:
        print(f"predict ({engine.name}, {args.model}): {len(files) - failed + len(missing)} image(s) x "
              f"{len(engine.classes)} classes to {args.csv}; {failed} failed", file=sys.stderr)
    if failed:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """The `cxr14-predict` console command: one-line errors, exit code 1 when any image failed."""
    run_main(run, argv)


if __name__ == "__main__":
    main()

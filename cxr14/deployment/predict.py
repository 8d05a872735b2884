"""Predict's work: per-image probabilities, calibrated probabilities, thresholds, decisions and margins, and
Grad-CAM heatmaps, for the `cxr14-predict` command (`cxr14.cli`, which parses its arguments and prints).

What the original ChestX-ray14 scripts' `inference.py` did for one image, for many: files, folders (searched
recursively for PNG and JPEG) and globs; images decoded exactly as the prepare stage decodes them (any
PNG/JPEG, any size or mode, NIH's RGBA files included), in threads, ahead of the model, and run in batches;
decisions use the calibrated probability against the val thresholds the calibrate stage chose; an unreadable
file is reported (`Failed`) while the other files are still processed, and a warning about a file (`Notice`) is
passed on for the caller to print.

Two engines. `OnnxEngine` runs the export stage's model with ONNX Runtime and never imports PyTorch: the file
carries its classes, image size, calibrator and thresholds, and Grad-CAM of the last block as a second output
(`cam`), which it resamples and draws as the torch engine does. On a CPU with 8-bit dot products that is
models/model.int8.onnx, 8-bit for speed, within the test-AUC loss the export stage allowed; elsewhere
models/model.onnx, what a GPU runs. `TorchEngine` runs the train stage's checkpoint with calibrate's JSON
files, and draws Grad-CAM of any layer (`--layer`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr14 import paths
from cxr14.data.dicom import is_dicom
from cxr14.data.images import decode_image, load_gray
from cxr14.data.nih import IMAGE_SUFFIXES
from cxr14.evaluation.calibration import (
    apply_calibrator,
    check_pairing,
    load_calibrator,
    load_thresholds,
)
from cxr14.params import Explain, Params, Predict, Train, load_section
from cxr14.runtime.devices import cpu_count
from cxr14.runtime.errors import PipelineError

if TYPE_CHECKING:
    from cxr14.data.dicom import DicomTags

ENGINES = ("onnx", "torch")
PRECISIONS = ("auto", "int8", "fp32")


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

    A folder stands for its image files (`images_in`), searched recursively and sorted; an item with glob
    characters that is not itself a file is expanded (`**` crosses folders); anything else is taken as a file
    (decoded by its content, whatever its suffix), so that a missing one is reported like an unreadable one.
    """
    files: dict[str, str] = {}  # one file however it is spelled (a/x.png, ./a/x.png): its first spelling
    errors = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = images_in(path)
            if not found:
                errors.append(f"{item}: folder holds no PNG, JPEG or DICOM file")
        elif not path.exists() and glob.has_magic(item):
            found = []
            for match in sorted(glob.glob(item, recursive=True)):
                if Path(match).is_dir():
                    found += images_in(Path(match))
                elif is_image_file(Path(match)):
                    found.append(match)
            if not found:
                errors.append(f"{item}: pattern matches no PNG, JPEG or DICOM file")
        else:
            found = [item]
        for f in found:
            files.setdefault(os.path.normcase(os.path.abspath(f)), f)
    return list(files.values()), errors


def images_in(folder: Path) -> list[str]:
    """The image files below `folder`, sorted: PNG, JPEG and DICOM by suffix, and DICOM files by content too, as
    archives and PACS exports name them without one (IM0001, or a UID such as 1.2.840.113619.2.3)."""
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def is_image_file(path: Path) -> bool:
    """By suffix (PNG, JPEG, .dcm, .dicom), else by the DICOM magic (132 bytes read)."""
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)


def decoded(files: Sequence[str], size: int, threads: int, ahead: int = 0, voi: bool = True
            ) -> Iterator[tuple[str, np.ndarray | str, list[str], DicomTags | None]]:
    """(file, uint8 (size, size) image or the reason it failed, warnings, DICOM tags or None), in order, decoded
    by `threads` threads that stay up to `ahead` images ahead of the consumer (Pillow releases the GIL while it
    decodes, so the threads go on decoding while the model runs on the batch before: `ahead` should exceed a
    batch)."""

    def one(path: str) -> tuple[np.ndarray | str, list[str], DicomTags | None]:
        return decode_or_reason(path, size, voi)

    if threads <= 1:
        for path in files:
            yield path, *one(path)
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
            yield path, *future.result()
    finally:  # an error or Ctrl-C downstream: drop the decodes not started rather than wait for the window
        pool.shutdown(wait=True, cancel_futures=True)


def decode_or_reason(source: str | bytes, size: int, voi: bool = True
                     ) -> tuple[np.ndarray | str, list[str], DicomTags | None]:
    """`decode_image`'s (image, warnings, tags), or (the one-line reason it failed, [], None): one file's failure is
    reported while the others go on (predict's threads, serve's requests); warnings come back with the image for
    the caller to report (a thread printing would hit the progress bar)."""
    try:
        return decode_image(source, size, voi)
    except ValueError as exc:  # decode_image's reason: unreadable, not an image, truncated, a refused DICOM
        return str(exc), [], None
    except Exception as exc:  # anything else a decoder may raise
        return f"cannot decode image ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})", [], None


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
        from cxr14.deployment.onnx_file import INPUT_NAME, OOD_NAME, OUTPUT_NAME, read_metadata, session

        if not model.is_file():
            raise PipelineError(f"{model}: not found; run the export stage (dvc repro export), or use --engine torch "
                                "with the checkpoint")
        device = onnx_device(device, device_key)
        providers: list = ["CPUExecutionProvider"]
        cuda = device.startswith("cuda")
        if cuda:
            index = device.partition(":")[2] or "0"
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
        self.file, self.meta = model, read_metadata(model, self.session)  # checked against the graph
        self.input, self.output, self.ood_output = INPUT_NAME, OUTPUT_NAME, OOD_NAME
        self.classes, self.image_size = list(self.meta["classes"]), int(self.meta["image_size"])
        self.calibrator, self.thresholds = self.meta["calibrator"], self.meta["thresholds"]
        self.cam: dict | None = self.meta["cam"]  # the cam output's geometry; None: a file exported before it
        self.fetch_cam = False  # ask for the cam output with every batch's probabilities (`want_heatmaps`)
        self._cells: tuple[np.ndarray, np.ndarray] | None = None  # (images, cam cells) of the last batch
        # checked against the graph by read_metadata: a threshold exactly where the graph has the output
        self.ood_threshold = self.meta.get("ood_threshold")

    def want_heatmaps(self, layer: str, layer_key: str) -> None:
        """Fetch the `cam` output beside the probabilities from now on (one run per batch for both); refused in one
        line where the file has none, or where another layer than the one it carries (the last block) is asked
        for."""
        self.require_cam()
        if layer not in ("auto", self.cam["layer"]):
            raise PipelineError(f"{layer_key}: {layer}; the exported model carries Grad-CAM of {self.cam['layer']} "
                                "only (auto): use --engine torch for another layer")
        self.fetch_cam = True

    def require_cam(self) -> None:
        if self.cam is None:
            raise PipelineError(f"--gradcam: {self.file} has no 'cam' output (exported before heatmaps were); run "
                                "the export stage again (dvc repro export), or use --engine torch")

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S) -> raw probabilities (B, C)."""
        return self.run(images)[0]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (B, S, S) -> raw probabilities (B, C) and out-of-distribution scores (B,) (None: the model has
        no score), from one pass; the cam cells too, after `want_heatmaps` (without it ONNX Runtime is not asked
        for them). Outputs are asked for by name."""
        scored = self.ood_threshold is not None
        names = [self.output, *([self.ood_output] if scored else []), *([self.cam["output"]] if self.fetch_cam else [])]
        out = self.session.run(names, {self.input: images[:, None]})
        if self.fetch_cam:
            self._cells = (images, out[-1])
        return out[0].astype(np.float64), out[1].astype(np.float64) if scored else None

    def gradcam(self, images: np.ndarray, chosen: list[list[int]]) -> list[list[np.ndarray]]:
        """Heatmaps of the chosen classes of each image: the `cam` cells (those fetched with the probabilities of
        the same batch, else a run of their own) resampled onto the input and normalised as `GradCAM` does, in
        numpy."""
        from cxr14.explanation.heatmaps import normalise, resample

        self.require_cam()
        if self._cells is not None and self._cells[0] is images:
            cells = self._cells[1]
        else:
            cells = self.session.run([self.cam["output"]], {self.input: images[:, None]})[0]
        size = (self.image_size, self.image_size)
        return [list(normalise(resample(cells[i, classes], size, self.cam["stride"], self.cam["offset"])))
                for i, classes in enumerate(chosen)]


class TorchEngine:
    """The train stage's checkpoint in PyTorch, Grad-CAM of any layer by autograd. Imported only when asked for."""

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
        self.file = model
        self.model, self.ckpt = load_checkpoint(model, self.device)
        self.classes, self.image_size = list(self.ckpt["classes"]), int(self.ckpt["image_size"])
        self.ood, self.ood_threshold = None, None
        if self.ckpt.get("ood") is not None:  # checkpoints from before the out-of-distribution fit have none
            from cxr14.model.ood import OodScore, check_ood

            fit = check_ood(self.ckpt["ood"], str(model))
            self.ood, self.ood_threshold = OodScore(fit).to(self.device), float(fit["threshold"])
        try:
            _, self.layer = gradcam_layer(self.model, self.ckpt["arch"], layer_name)
        except PipelineError as exc:
            raise PipelineError(f"{layer_key}: {exc}") from None

    def inputs(self, images: np.ndarray) -> Any:
        from cxr14.data.loader import to_model_input

        x = self.torch.from_numpy(np.ascontiguousarray(images)[:, None]).to(self.device)
        return to_model_input(x.float(), tuple(self.ckpt["mean"]), tuple(self.ckpt["std"]))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)[0]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw probabilities (B, C) and out-of-distribution scores (B,) (None without the fit), from one pass."""
        from cxr14.model.inference import forward
        from cxr14.model.ood import captured_features

        with self.torch.no_grad(), captured_features(self.model, self.ckpt["arch"]) as found:
            probs = self.torch.sigmoid(forward(self.model, self.inputs(images))).cpu().numpy().astype(np.float64)
            ood = None if self.ood is None else self.ood(found[-1]).cpu().numpy().astype(np.float64)
        return probs, ood

    def want_heatmaps(self, layer: str, layer_key: str) -> None:
        """Nothing to prepare: the layer was checked when the engine opened."""

    def gradcam(self, images: np.ndarray, chosen: list[list[int]]) -> list[list[np.ndarray]]:
        """Heatmaps of the chosen classes of each image (one backward pass per image and class)."""
        from cxr14.explanation.gradcam import GradCAM

        maps = []
        with GradCAM(self.model, self.layer) as cam:
            for i, classes in enumerate(chosen):
                _, m = cam(self.inputs(images[i:i + 1]), classes)
                maps.append([m[0, j].cpu().numpy() for j in range(len(classes))])
        return maps


@dataclass(frozen=True)
class Settings:
    """Where predict runs and which layer Grad-CAM draws; each `*_key` names the value's source in errors."""

    device: str = "cpu"
    device_key: str = "--device"
    cpu_kernels: str | None = None
    layer: str = "auto"
    layer_key: str = "--layer"
    dicom_voi: bool = True


def settings(params: Path | None, device: str | None = None, layer: str | None = None) -> Settings:
    """train.device, train.cpu_kernels and explain.layer of `params` (none: the CPU and the last block), with
    `device` and `layer` given on the command line taking precedence: predict then runs as evaluate ran; and
    predict.dicom_voi, whether DICOM files are read through their VOI LUT or window."""
    found = Settings()
    if params is not None:
        train = load_section(params, Train)
        found = Settings(train.device, f"{params} train.device", train.cpu_kernels,
                         load_section(params, Explain).layer, f"{params} explain.layer", dicom_voi(params))
    if device:
        found = dataclasses.replace(found, device=device, device_key="--device")
    if layer:
        found = dataclasses.replace(found, layer=layer, layer_key="--layer")
    return found


def dicom_voi(params: Path) -> bool:
    """predict.dicom_voi of `params`; true where the file predates the section (it is checked when present)."""
    found = Params(params)
    return found.section(Predict).dicom_voi if Predict.SECTION in found._raw else True


def open_engine(kind: str, model: Path | None, precision: str, where: Settings) -> OnnxEngine | TorchEngine:
    """The `kind` engine (ENGINES) on `model`; for onnx without one, the export stage's model `precision` picks
    (`open_onnx`); for torch without one, the train stage's checkpoint."""
    if kind == "torch":
        return TorchEngine(model or paths.MODEL, where.device, where.device_key, where.cpu_kernels, where.layer,
                           where.layer_key)
    return open_onnx(model, precision, where.device, where.device_key)


ONNX_DEVICES = "auto, cpu, cuda or cuda:N"


def onnx_device(device: str, device_key: str) -> str:
    """The device the onnx engine runs on: the CPU, or a GPU where this ONNX Runtime has the CUDA provider; `auto`
    (the project's default) takes the GPU when it can. A device named on the command line that ONNX Runtime cannot
    use (mps, a typo) is refused rather than quietly run on the CPU; train.device mps, a training setting read
    from the params, runs on the CPU."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device == "cpu" or (device == "mps" and device_key != "--device"):
        return "cpu"
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        torch = "; --engine torch runs on mps" if device == "mps" else ""
        raise PipelineError(f"{device_key}: {device}; expected {ONNX_DEVICES} with the onnx engine{torch}")
    if not has_cuda:
        raise PipelineError(f"{device_key} {device}: this ONNX Runtime has no CUDA provider (install "
                            "onnxruntime-gpu), or use --device cpu or --engine torch")
    return device


def int8_on_cpu(precision: str, device: str, device_key: str) -> None:
    """Refuse --precision int8 on a GPU, which runs the 8-bit graph no faster than float32."""
    if precision == "int8" and (device == "cuda" or device.startswith("cuda:")):
        raise PipelineError(f"--precision int8 with {device_key} {device}: the int8 model is for the CPU (a GPU "
                            "runs its 8-bit graph no faster than float32); use --precision fp32 or --device cpu")


def open_onnx(model: Path | None, precision: str, device: str, device_key: str) -> OnnxEngine:
    """ONNX Runtime on `model`, else on the export stage's int8 or float32 model per `precision` (PRECISIONS).

    `auto` takes the int8 model only on a CPU where 8-bit products do not saturate (`int8_is_fast`), where the
    export stage wrote it, and where it found it within export.int8_max_auc_drop; float32 otherwise.
    """
    int8_on_cpu(precision, device, device_key)  # before asking whether this ONNX Runtime has a GPU
    device = onnx_device(device, device_key)
    cuda = device.startswith("cuda")
    int8_on_cpu(precision, device, device_key)  # auto, resolved
    auto = model is None and precision == "auto"
    if model is None:
        int8 = precision == "int8" or (auto and not cuda and int8_is_fast() and paths.ONNX_INT8.is_file())
        model = paths.ONNX_INT8 if int8 else paths.ONNX
    engine = OnnxEngine(model, device, device_key)
    if auto and engine.meta.get("int8_within_limit") is False:
        print(f"note: {model} scored more than export.int8_max_auc_drop below float32 at export; running "
              f"{paths.ONNX} (--precision int8 to run it anyway)", file=sys.stderr)
        engine = OnnxEngine(paths.ONNX, device, device_key)
    return engine


def calibration(engine: OnnxEngine | TorchEngine, thresholds_file: Path | None,
                calibrator_file: Path | None) -> tuple[dict, dict | None]:
    """The thresholds and calibrator (None: raw probabilities) the engine's decisions use, checked to belong
    together: thresholds fitted on one calibration's output mean nothing on another's.

    The onnx engine carries both in its metadata, and a file given replaces its part; the torch engine reads
    the calibrate stage's files (a missing calibrator file means raw probabilities).
    """
    if isinstance(engine, OnnxEngine):
        thresholds, calibrator, calibrator_where = engine.thresholds, engine.calibrator, f"{engine.file} metadata"
        thresholds_where = calibrator_where
        applies_to = engine.calibrator["method"] if engine.calibrator else "none"  # what export embedded together
        if calibrator_file is not None:
            calibrator = load_calibrator(calibrator_file) if calibrator_file.is_file() else None
            calibrator_where = str(calibrator_file)
        if thresholds_file is not None:
            thresholds, applies_to = load_thresholds(thresholds_file, engine.classes)
            thresholds_where = str(thresholds_file)
        check_pairing(thresholds_where, applies_to, calibrator, calibrator_where)
        return thresholds, calibrator
    thresholds_file = thresholds_file or paths.THRESHOLDS
    calibrator_file = calibrator_file or paths.CALIBRATOR
    thresholds, applies_to = load_thresholds(thresholds_file, engine.classes)
    calibrator = load_calibrator(calibrator_file) if calibrator_file.is_file() else None
    check_pairing(thresholds_file, applies_to, calibrator, calibrator_file)
    return thresholds, calibrator


@dataclass(frozen=True)
class Notice:
    """A warning about an image that was predicted (a very large file), for the caller to print."""

    image: str
    message: str


@dataclass(frozen=True)
class Failed:
    """An image that could not be predicted, and why (missing, unreadable, not an image, truncated)."""

    image: str
    reason: str


def predict_images(engine: OnnxEngine | TorchEngine, files: Sequence[str], calibrator: dict | None,
                   thresholds: dict, batch_size: int, threads: int | None = None,
                   gradcam: Path | None = None, voi: bool = True) -> Iterator[dict | Failed | Notice]:
    """Each file's result in order, or a `Failed` for it: a result is {"image", "model", "predictions" (rows_for's
    table), "dicom" (the DICOM tags, `DicomTags.as_dict`; None for PNG/JPEG)}, and "gradcam" (the heatmap files
    written into `gradcam`) when asked for (the engine's `want_heatmaps` called first). `voi`: see
    `cxr14.data.dicom.read_dicom`.

    A failure, or a `Notice` (a warning about a file), is yielded as soon as decoding meets it; results come a
    batch at a time.
    """
    stems = heatmap_stems(files)
    batch: list[tuple[int, str, np.ndarray, DicomTags | None]] = []
    with contextlib.closing(decoded(files, engine.image_size, threads or cpu_count(), 2 * batch_size, voi)) as it:
        for index, (path, image, notes, tags) in enumerate(it):
            yield from (Notice(path, note) for note in notes)
            if isinstance(image, str):
                yield Failed(path, image)
                continue
            batch.append((index, path, image, tags))
            if len(batch) >= batch_size:
                yield from predict_batch(engine, batch, calibrator, thresholds, gradcam, stems)
                batch = []
    if batch:
        yield from predict_batch(engine, batch, calibrator, thresholds, gradcam, stems)


def check_heatmap_names(folder: Path, files: Sequence[str], classes: Sequence[str], inputs: Sequence) -> None:
    """Refuse a run whose heatmaps (`<stem>_<Class>.png` in `folder`) would replace one of its inputs: predicting
    into the images' own folder twice takes the first run's heatmaps as images."""
    from cxr14.runtime.outputs import same_file

    if not folder.is_dir():
        return
    stems, endings = set(heatmap_stems(files)), [f"_{c}.png" for c in classes]
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):  # the first clash, the same each run
        if any(entry.name.endswith(e) and entry.name[:-len(e)] in stems for e in endings):
            clash = next((i for i in inputs if same_file(Path(entry.path), Path(i))), None)
            if clash is not None:
                raise PipelineError(f"--gradcam {folder}: its heatmap {entry.name} would replace the input {clash}; "
                                    "write the heatmaps to another folder")


def heatmap_stems(files: Sequence[str]) -> list[str]:
    """Each file's heatmap name stem: its own, numbered by position where two share one (a/x.png, b/x.png)."""
    stems = [Path(p).stem for p in files]
    repeated = {s for s, n in collections.Counter(stems).items() if n > 1}
    return [f"{i + 1}_{s}" if s in repeated else s for i, s in enumerate(stems)]


def predict_batch(engine: OnnxEngine | TorchEngine, batch: list[tuple[int, str, np.ndarray, DicomTags | None]],
                  calibrator: dict | None, thresholds: dict, gradcam: Path | None,
                  stems: list[str]) -> Iterator[dict]:
    """One forward pass over decoded (position, file, image, tags) rows; their results in order (`predict_images`)."""
    images = np.stack([row[2] for row in batch])
    raw, ood = engine.run(images)
    cal = apply_calibrator(calibrator, raw, engine.classes) if calibrator else raw
    tables = [rows_for(raw[i], cal[i], engine.classes, thresholds) for i in range(len(batch))]
    if gradcam is not None:
        chosen = [heatmap_classes(rows, cal[i]) for i, rows in enumerate(tables)]
        maps = engine.gradcam(images, chosen)
    for i, (index, path, gray, tags) in enumerate(batch):
        result = image_result(path, engine, tables[i], tags, None if ood is None else float(ood[i]))
        if gradcam is not None:
            draw_heatmaps(result, gray, maps[i], chosen[i], gradcam, stems[index])
        if result["in_distribution"] is False:
            yield Notice(path, ood_warning(result["ood_score"], engine.ood_threshold))
        yield result


def image_result(image: str, engine: OnnxEngine | TorchEngine, table: list[dict], tags: DicomTags | None,
                 ood_score: float | None) -> dict:
    """One image's result as `cxr14-predict --json` prints it (and `cxr14-serve` returns it)."""
    return {"image": image, "model": str(engine.file), "predictions": table,
            "dicom": tags.as_dict() if tags is not None else None,
            **in_distribution(ood_score, engine.ood_threshold)}


def in_distribution(score: float | None, threshold: float | None) -> dict[str, Any]:
    """A result's `in_distribution` (score at or below the threshold) and `ood_score`; both None for a model
    exported before the out-of-distribution score."""
    if score is None or threshold is None:
        return {"in_distribution": None, "ood_score": None}
    return {"in_distribution": bool(score <= threshold), "ood_score": score}


def ood_warning(score: float, threshold: float) -> str:
    """The warning line of an image the model should not judge."""
    return (f"out of distribution (score {score:.3g} above the model's threshold {threshold:.3g}): unlike the images "
            "this model was trained on (a photograph, another modality, an inverted or rotated radiograph?); its "
            "findings are not to be trusted")


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
    from cxr14.explanation.heatmaps import overlay

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

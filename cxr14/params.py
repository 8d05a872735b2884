"""The one params schema: a frozen dataclass per `params.yaml` section, built and checked by one loader.

Defaults live in `params.yaml` only, so every key must be there: a key this schema does not know is
refused with the closest valid name (a mistyped `lr_haed:` would otherwise be ignored and the run go on
as if it were not there), and every value is checked for type and range, nested ones included. Every
message is one line naming the file actually read, `section.key`, the value and what was expected.

    params = load_params("params.yaml")    # every section, each checked when first used
    params.train.lr_head                   # a Train's field, or a PipelineError naming train.lr_head
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from cxr14.runtime.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


def rule(low: float | None = None, high: float | None = None, *, open_low: bool = False,
         open_high: bool = False, length: int | None = None, doc: str = "", help: str = "") -> dict[str, Any]:
    """Field metadata: an inclusive range (or exclusive where `open_*`), a list's length, `doc` (what the key
    expects, in the words of the error messages) and `help` (what the key means: the column of docs/params.md
    that tools/params_doc.py generates; never part of a message)."""
    return {"low": low, "high": high, "open_low": open_low, "open_high": open_high, "length": length, "doc": doc,
            "help": help}


def field(**kwargs: Any) -> Any:
    return dataclasses.field(metadata=rule(**kwargs))


class Section:
    """Base of the section classes: `SECTION` is the key in params.yaml; `check` holds rules across keys."""

    SECTION: ClassVar[str] = ""

    def check(self, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
        """Rules that involve several keys; `fail(key, expected)` raises the one-line error."""


@dataclasses.dataclass(frozen=True)
class Data(Section):
    SECTION: ClassVar[str] = "data"
    format: Literal["nih", "table"] = field(
        help="`nih`: `data.root` in NIH's layout; `table`: your own labelled images, listed in the CSV `data.table` "
             "([docs/datasets.md](datasets.md))")
    root: str = field(doc="a folder in NIH layout (the demo: data/demo), or the folder of an own-data table",
        help="dataset root: NIH layout (label table, split lists, images), the real download e.g. `/mnt/nih`; with "
             "`data.format: table` the folder holding the table and its images (a DVC dependency: what changes "
             "there re-runs the stages that read it)")
    table: str | None = field(doc="null, or the CSV of an own-data table, relative to data.root or absolute",
        help="`data.format: table`: the CSV listing the images (path, patient, findings 0/1/empty, ...), relative "
             "to `data.root` or absolute; `null` with `data.format: nih`")
    missing: Literal["error", "skip"] = field(
        help="images listed (split lists, or the table) but not on disk: `error` names them, `skip` leaves them out "
             "and counts them in `metrics/split.json`")

    def check(self, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
        if self.format == "table" and self.table is None:
            fail("table", "the CSV of your labelled images (relative to data.root or absolute) with data.format: "
                 "table")


@dataclasses.dataclass(frozen=True)
class Predict(Section):
    """Read by cxr14-predict only (no stage depends on it): a section of its own, so no stage re-runs for it."""

    SECTION: ClassVar[str] = "predict"
    dicom_voi: bool = field(
        help="DICOM files: apply their VOI LUT or first window (Window Center/Width) before the 8-bit scaling, as "
             "radiology viewers display them; `false` scales the stored-bit range instead (prepare always applies "
             "the VOI)")


@dataclasses.dataclass(frozen=True)
class Demo(Section):
    SECTION: ClassVar[str] = "demo"
    patients: int = field(low=2, high=10**6,
        help="patients in the phantom dataset (used while `data.root` is `data/demo`)")
    images: int = field(low=2, high=10**7, help="images in the phantom dataset, follow-ups included")
    image_size: int = field(low=64, high=2048, help="side of the phantom PNGs in pixels")
    label_noise: float = field(low=0.0, high=0.5,
        help="rate at which a planted finding is missing from the report-mined label (and, scaled by prevalence, a "
             "spurious one added)")
    class_floor: float = field(low=0.0, high=0.2, help="every finding on at least this fraction of phantom images")
    test_fraction: float = field(low=0.01, high=0.99, help="share of patients in the demo's official test list")
    seed: int = field(low=0, high=2**32 - 1, help="seed of the phantom generator")

    def check(self, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
        if self.images < self.patients:
            fail("images", f">= demo.patients ({self.patients}): every patient has an image")


@dataclasses.dataclass(frozen=True)
class Split(Section):
    SECTION: ClassVar[str] = "split"
    val_fraction: float = field(low=0.0, high=1.0, open_low=True, open_high=True,
        help="share of train_val (by images and per class) in the patient-disjoint val split")
    seed: int = field(low=0, high=2**32 - 1, help="seed of the train/val split")
    test_fraction: float = field(low=0.0, high=1.0, open_low=True, open_high=True,
        help="`data.format: table` without a `test` column: share of the images (whole patients, per class) drawn "
             "as the test split, with `split.seed`; NIH and tables with a `test` column ignore it")


@dataclasses.dataclass(frozen=True)
class Prepare(Section):
    SECTION: ClassVar[str] = "prepare"
    image_size: int = field(low=8, high=4096, help="side of the prepared square images (224 for the NIH recipe)")
    workers: int = field(low=0, doc="0 (all cores) or a positive integer",
        help="decoding processes; 0 = all cores (or `OMP_NUM_THREADS`); does not change the arrays")


@dataclasses.dataclass(frozen=True)
class Augment(Section):
    SECTION: ClassVar[str] = "train.augment"
    hflip: float = field(low=0.0, high=1.0, doc="a probability in [0, 1]", help="probability of a horizontal flip")
    rotate: float = field(low=0.0, high=180.0, doc="degrees in [0, 180]",
        help="largest random rotation in degrees (the NIH recipe: 5)")
    crop_scale: tuple[float, float] = field(low=0.0, high=1.0, open_low=True, length=2,
                                           doc="[low, high]: area fractions in (0, 1], low <= high",
        help="random resized crop: range of the area kept; `[1.0, 1.0]` = off (e.g. `[0.85, 1.0]`)")

    def check(self, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
        if self.crop_scale[0] > self.crop_scale[1]:
            fail("crop_scale", "[low, high] with low <= high")


@dataclasses.dataclass(frozen=True)
class Train(Section):
    SECTION: ClassVar[str] = "train"
    arch: Literal["resnet10", "resnet18", "resnet34", "resnet50", "densenet121"] = field(
        help="network: `resnet10` (ResNet18 with one block per stage, no ImageNet weights: the demo's), `resnet18`, "
             "`resnet34`, `resnet50` (the original recipe's), `densenet121` (CheXNet)")
    output_stride: Literal[32, 16, 8] = field(
        help="ResNets: 16 dilates `layer4`, 8 also `layer3` (same weights), for a Grad-CAM map 2x or 4x finer; "
             "`layer4` then costs 4x (16)")
    weights: Literal["none", "imagenet", "IMAGENET1K_V1", "IMAGENET1K_V2"] = field(
        help="`none`; `imagenet` = torchvision's best for the arch (ResNet50: `IMAGENET1K_V2`, as the original "
             "recipe); or a named set; downloaded by torchvision into `TORCH_HOME` on first use")
    freeze: list[str] = field(doc="a list of module-name prefixes, e.g. [conv1, bn1, layer1]",
        help="module-name prefixes to freeze (their BatchNorm stays in eval mode); NIH recipe `[conv1, bn1, layer1, "
             "layer2, layer3]`")
    epochs: int = field(low=0, doc="an integer >= 1, or 0 with train.init (no training)",
        help="most epochs; 0 with `train.init`: the start checkpoint becomes `models/model.pt` unchanged (external "
             "validation)")
    init: str | None = field(doc="null, or a checkpoint the train stage wrote (its arch and classes)",
        help="`null`, or a train-stage checkpoint to start from (fine-tuning; with `train.epochs: 0` it is the model "
             "itself); its arch, output stride and classes must match. DVC sees this path, not the file's bytes: "
             "give each checkpoint its own name ([docs/datasets.md](datasets.md))")
    batch_size: int = field(low=1,
        help="images per optimisation step, over all processes (`train.nproc` must divide it)")
    lr_head: float = field(low=0.0, open_low=True, help="AdamW learning rate of the new classification head")
    lr_backbone: float = field(low=0.0, open_low=True,
        help="AdamW learning rate of the rest of the network (the NIH recipe: 1e-4)")
    weight_decay: float = field(low=0.0, help="AdamW weight decay")
    scheduler: Literal["none", "cosine", "plateau", "onecycle"] = field(
        help="`none`, `cosine` (over `train.epochs`), `plateau` (x0.1 when val AUC stalls), `onecycle` (stepped "
             "every batch: warm up over the first quarter, then anneal)")
    pos_weight_cap: float | None = field(low=1.0, doc="null (no cap) or a number >= 1",
        help="cap on negatives/positives per class in the loss's `pos_weight`; `null` = no cap")
    label_smoothing: float = field(low=0.0, high=0.5, open_high=True,
        help="BCE targets pulled this / 2 toward 0.5 (1 -> 0.95, 0 -> 0.05): less trust in report-mined labels; 0 = "
             "plain BCE, as the original recipe")
    patience: int = field(low=1, help="stop after this many epochs without a better val mean AUC")
    ema: float = field(low=0.0, high=1.0, open_high=True, doc="0 (off) or a decay in (0, 1), e.g. 0.99",
        help="decay of an exponential moving average of the weights (and BatchNorm statistics), updated every step; "
             "the average is validated and saved; 0 = off")
    augment: Augment = field(
        help="augmentation, applied to whole batches as one affine resampling (the demo trains best with flips only: "
             "measured)")
    device: str = field(doc="auto, cpu, cuda, cuda:N (one GPU of several) or mps",
        help="`auto` (CUDA, then MPS, then CPU), `cpu`, `cuda`, `cuda:N` (one GPU of several, e.g. one per queued "
             "experiment), `mps`; evaluate, explain and predict follow it")
    nproc: int = field(low=1, high=1024, doc="processes on this machine (DDP): 1, or one per GPU",
        help="training processes on this machine (DDP through torchrun's engine, one per GPU; gloo processes on a "
             "CPU)")
    compile: bool = field(
        help="`torch.compile` the model for training (GPUs: faster steps after the first ones compile)")
    cpu_kernels: Literal["avx2", "native"] = field(
        help="`avx2`: oneDNN's CPU convolutions capped at AVX2, the same numbers on every x86-64 CPU with AVX2; "
             "`native`: its best kernels for this CPU (faster on AVX-512, numbers vary by machine)")
    workers: int = field(low=0, help="DataLoader processes (batches come from a memory map: 0 is usually fastest)")
    seed: int = field(low=0, high=2**32 - 1, help="seeds initialisation, shuffling and augmentation")
    resume: bool = field(
        help="continue from `models/resume/last.pt` after a killed run (refused if the params or the data differ)")

    def check(self, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
        if self.epochs == 0 and self.init is None:
            fail("epochs", "an integer >= 1, or 0 with train.init naming the checkpoint to use unchanged")
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", self.device):
            fail("device", "auto, cpu, cuda, cuda:N (a GPU index) or mps")
        if self.batch_size % self.nproc:
            fail("batch_size", f"a multiple of train.nproc ({self.nproc}): the batch is global, each process "
                 "takes an equal share")
        if self.nproc > 1 and self.device.startswith("cuda:"):
            fail("device", f"cuda or cpu with train.nproc {self.nproc} (each process takes its own GPU; "
                 "CUDA_VISIBLE_DEVICES chooses which)")
        if self.nproc > 1 and self.device == "mps":
            fail("device", f"cuda or cpu with train.nproc {self.nproc}: MPS runs one process")

    # What shapes the model: a resumed run must have been started with the same values.
    RECIPE: ClassVar[tuple[str, ...]] = (
        "arch", "output_stride", "weights", "freeze", "epochs", "batch_size", "lr_head", "lr_backbone",
        "weight_decay", "scheduler", "pos_weight_cap", "label_smoothing", "patience", "ema", "augment", "seed",
        "cpu_kernels")

    def recipe(self) -> dict[str, Any]:
        """The recipe as plain data (lists, dicts), as stored in checkpoints; `init` only when set, so that a run
        from scratch stores what it stored before train.init existed (the same model.pt bytes)."""
        out = {k: plain(getattr(self, k)) for k in self.RECIPE}
        return out if self.init is None else {**out, "init": self.init}


@dataclasses.dataclass(frozen=True)
class Evaluate(Section):
    SECTION: ClassVar[str] = "evaluate"
    bootstrap: int = field(low=10, help="patient resamples for the 95% AUC intervals")
    seed: int = field(low=0, high=2**32 - 1, help="seed of the bootstrap")
    batch_size: int = field(low=1, help="inference batch size")
    subgroup_min_images: int = field(low=1,
        help="subgroups (sex, age band, view) smaller than this get their size and no number, in evaluate and "
             "calibrate")


@dataclasses.dataclass(frozen=True)
class Calibrate(Section):
    SECTION: ClassVar[str] = "calibrate"
    policy: Literal["max_f1", "youden", "target_recall"] = field(
        help="per-class threshold policy on val: `max_f1` (the original recipe's), `youden`, `target_recall`")
    target_recall: float = field(low=0.0, high=1.0, open_low=True,
        help="policy `target_recall`: the highest threshold with val recall at least this (screening)")
    method: Literal["none", "temperature", "platt", "isotonic"] = field(
        help="probability calibration fitted on val: `none`, `temperature`, `platt`, `isotonic`")
    ece_bins: int = field(low=1, help="equal-width bins for ECE and the reliability curves")


@dataclasses.dataclass(frozen=True)
class Explain(Section):
    SECTION: ClassVar[str] = "explain"
    per_class: int = field(low=0,
        help="overlays per class of each kind: most confident true positive, false positive, false negative")
    layer: str = field(doc="'auto' or a module name such as layer3",
        help="Grad-CAM layer: `auto` = the last block (`layer4`, `features.denseblock4`), or a module name such as "
             "`layer3` (finer map, shallower features)")
    cam_threshold: float = field(low=0.0, high=1.0, open_low=True, open_high=True,
                                 doc="a number in (0, 1): the fraction of the heatmap's maximum that outlines regions",
        help="T(IoBB): heatmap regions are where it reaches this fraction of its maximum")
    iobb_thresholds: list[float] = field(low=0.0, high=1.0, open_high=True, doc="a non-empty list of numbers in [0, 1)",
        help="the T values of T(IoBB), as in Wang et al. (2017)")
    batch_size: int = field(low=1, help="images per Grad-CAM pass and per deletion-test forward")
    sanity_images: int = field(low=0, doc="0 (no sanity checks) or a positive integer: images per class",
        help="sanity checks (randomised model, deletion) on each class's most confident positive test images; 0 = "
             "off")
    deletion_steps: int = field(low=1,
        help="deletion test: the cells are blanked (most salient first, or in random order) in this many steps")
    deletion_grid: int = field(low=1, high=4096,
        help="deletion test: the image is cut into `deletion_grid` x `deletion_grid` cells, blanked to its mean grey")
    sanity_seed: int = field(low=0, high=2**32 - 1,
        help="the randomised model's weights and the random deletion orders")

    def check(self, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
        if not self.iobb_thresholds:
            fail("iobb_thresholds", "a non-empty list of numbers in [0, 1)")
        if self.deletion_steps > self.deletion_grid ** 2:
            fail("deletion_steps", f"at most explain.deletion_grid squared ({self.deletion_grid ** 2}): each step "
                 "blanks one cell or more")


@dataclasses.dataclass(frozen=True)
class Export(Section):
    SECTION: ClassVar[str] = "export"
    opset: int = field(low=18, doc="an ONNX opset from 18 (the exporter's oldest) to the newest the installed onnx "
                                   "defines (28 with onnx 1.23; checked when export starts)",
        help="ONNX opset of `models/model.onnx` (ONNX Runtime 1.17+ runs 20)")
    tolerance: float = field(low=0.0, open_low=True, doc="a positive number: the largest |ONNX - PyTorch| accepted",
        help="largest accepted difference between ONNX Runtime's and PyTorch's probabilities over the test array; "
             "above it export fails and writes no new file (the previous ones stay)")
    batch_size: int = field(low=1, help="images per batch of export's check")
    int8_calibration_images: int = field(low=1,
        help="val images (at most) whose activations set the ranges of `models/model.int8.onnx`")
    int8_max_auc_drop: float = field(low=0.0, high=1.0,
        help="the int8 model's val mean AUC may be at most this below float32's; past that, export flags it and "
             "warns, and predict's default runs `model.onnx`")


@dataclasses.dataclass(frozen=True)
class Ood(Section):
    SECTION: ClassVar[str] = "ood"
    images: int = field(low=1, high=100_000,
        help="images generated per out-of-distribution variant (photographs, blank, noise, checkerboard, CT/MR); "
             "the misread radiographs are every test image inverted, rotated and upside down")
    seed: int = field(low=0, high=2**32 - 1, help="crops, noise and checkerboard sizes of the generated images")
    batch_size: int = field(low=1, help="inference batch size")


SECTIONS: tuple[type[Section], ...] = (Data, Demo, Split, Prepare, Train, Evaluate, Calibrate, Explain, Export,
                                       Ood, Predict)
S = TypeVar("S", bound=Section)


def plain(value: Any) -> Any:
    """A section value as YAML/JSON-ready data: nested sections as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def read_yaml(path: Path | str) -> dict[str, Any]:
    """The whole params file as a mapping; its sections must be ones this schema knows."""
    path = Path(path)
    try:
        # libyaml's loader where PyYAML has it: the same mapping; predict's two reads of params.yaml, import
        # included, took 9.9 ms in a fresh process against 15.2 ms
        params = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run stages from the project root or pass --params") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read ({exc})") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if params is None:
        raise PipelineError(f"{path}: empty; expected the sections {', '.join(s.SECTION for s in SECTIONS)}")
    if not isinstance(params, dict):
        raise PipelineError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    known = [s.SECTION for s in SECTIONS]
    for name in params:
        if name not in known:
            raise PipelineError(f"{path} {name}: unknown section{suggest(str(name), known)}")
    return params


def suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; expected one of {', '.join(valid)}"


def load_section(path: Path | str, cls: type[S]) -> S:
    """Section `cls.SECTION` of the params file at `path`, typed and checked (one section: `load_params` for more)."""
    return Params(path).section(cls)


class Params:
    """Every section of one params file, read once. Each section is built and checked when first asked for, so a
    stage is never stopped by a section it does not read (DVC re-runs a stage only for the sections it lists).

        params = load_params("params.yaml"); params.train.lr_head
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._raw = read_yaml(self.path)
        self._built: dict[str, Section] = {}

    def section(self, cls: type[S]) -> S:
        if cls.SECTION not in self._built:
            if cls.SECTION not in self._raw:
                raise PipelineError(f"{self.path}: missing section '{cls.SECTION}'; expected keys "
                                    f"{', '.join(names(cls))}")
            self._built[cls.SECTION] = build(cls, self._raw[cls.SECTION], str(self.path))
        return self._built[cls.SECTION]  # type: ignore[return-value]

    @property
    def data(self) -> Data:
        return self.section(Data)

    @property
    def demo(self) -> Demo:
        return self.section(Demo)

    @property
    def split(self) -> Split:
        return self.section(Split)

    @property
    def prepare(self) -> Prepare:
        return self.section(Prepare)

    @property
    def train(self) -> Train:
        return self.section(Train)

    @property
    def evaluate(self) -> Evaluate:
        return self.section(Evaluate)

    @property
    def calibrate(self) -> Calibrate:
        return self.section(Calibrate)

    @property
    def explain(self) -> Explain:
        return self.section(Explain)

    @property
    def export(self) -> Export:
        return self.section(Export)

    @property
    def ood(self) -> Ood:
        return self.section(Ood)


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """The params file at `path`, read once; its sections typed and checked on first use."""
    return Params(path)


def names(cls: type[Section]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def build(cls: type[S], values: Any, where: str) -> S:
    """Check `values` (one section's mapping) against `cls` and return the frozen instance."""
    section = cls.SECTION
    if values is None:
        raise PipelineError(f"{where} {section}: empty section; expected keys {', '.join(names(cls))}")
    if not isinstance(values, dict):
        raise PipelineError(f"{where} {section}: {values!r}; expected a mapping of keys {', '.join(names(cls))}")
    for key in values:
        if key not in names(cls):
            raise PipelineError(f"{where} {section}.{key}: unknown key{suggest(str(key), names(cls))}")
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in values:
            raise PipelineError(f"{where} {section}.{f.name}: missing; expected {describe(hints[f.name], f.metadata)} "
                                "(the defaults live in params.yaml)")
        out[f.name] = convert(hints[f.name], f.metadata, values[f.name], f"{section}.{f.name}", where)
    obj = cls(**out)

    def fail(key: str, expected: str) -> typing.NoReturn:
        raise PipelineError(f"{where} {section}.{key}: {values[key]!r}; expected {expected}")

    obj.check(fail)
    return obj


def convert(kind: Any, meta: Any, value: Any, key: str, where: str) -> Any:
    """`value` as `kind` (checked against `meta`'s range), or a PipelineError naming `key`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    raw = value  # as written, for the message

    def fail() -> typing.NoReturn:
        hint = ""
        if isinstance(value, str) and kind is float and "e" in value.lower():
            with contextlib.suppress(ValueError):
                float(value)
                hint = f" (YAML reads {value} as text: write it with a decimal point, e.g. 1.0e-3)"
        raise PipelineError(f"{where} {key}: {raw!r}; expected {describe(kind, meta)}{hint}")

    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(inner, meta, value, key, where) if value is not None else fail()
    if origin is Literal:  # 32.0 is not the choice 32, nor True the choice 1
        if not any(type(value) is type(choice) and value == choice for choice in args):
            fail()
        return value
    if isinstance(kind, type) and issubclass(kind, Section):
        return build(kind, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list) or (meta["length"] is not None and len(value) != meta["length"]):
            fail()
        try:
            items = [convert(args[0], meta, v, key, where) for v in value]
        except PipelineError:
            fail()  # name the whole list, not the item
        return tuple(items) if origin is tuple else items
    if kind is bool:
        return value if isinstance(value, bool) else fail()
    if kind is str:
        return value if isinstance(value, str) and value else fail()
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        fail()
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            fail()
        value = float(value)
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["open_low"] and value == low)):
        fail()
    if high is not None and (value > high or (meta["open_high"] and value == high)):
        fail()
    return value


def describe(kind: Any, meta: Any) -> str:
    """What a key expects, in words: 'an integer >= 1', 'one of cosine, none', 'a list of numbers in [0, 1)'."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if meta.get("doc"):
        return meta["doc"]
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return f"null or {describe(inner, meta)}"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if isinstance(kind, type) and issubclass(kind, Section):
        return f"a mapping of keys {', '.join(names(kind))}"
    if origin in (list, tuple):
        item = describe(args[0], meta)
        item = item.replace("an integer", "integers").replace("a number", "numbers").replace("a non-empty", "")
        return f"a list of {meta['length'] or ''} {item}".replace("  ", " ")
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a non-empty string"
    words = "an integer" if kind is int else "a number"
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        return f"{words} in {'(' if meta['open_low'] else '['}{low}, {high}{')' if meta['open_high'] else ']'}"
    if low is not None:
        return f"{words} {'>' if meta['open_low'] else '>='} {low}"
    if high is not None:
        return f"{words} {'<' if meta['open_high'] else '<='} {high}"
    return words

"""The console commands: argument parsing and output here, the work in the library.

    cxr14-predict IMAGE|FOLDER|GLOB ... [--csv OUT] [--json] [--gradcam DIR] [--engine onnx|torch]
                  [--precision auto|int8|fp32]
    cxr14-compare [A] [B] [--json] [--bootstrap N] [--seed S]
    cxr14-serve [--host H] [--port P] [--workers N] [--max-batch B] [--max-wait-ms W] [predict's model options]

`cxr14-predict` (`cxr14.deployment.predict`) prints a table per image, or writes a CSV (one row per image and
class), or prints one JSON document; which model ran is printed too (stderr with --csv, stdout before the
tables, a `model` field with --json). An unreadable file is one error line while the others go on, and the
exit status is 1 at the end. `cxr14-serve` (`cxr14.deployment.serve`) answers the same over HTTP.
`cxr14-compare` (`cxr14.evaluation.compare`) prints whether two runs' test
ROC-AUC differ beyond the luck of the test sample. Errors are one line (`run_main`).

Imports stay inside the commands: predict's ONNX engine must start without PyTorch or pandas, and compare
needs neither ONNX Runtime nor PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cxr14 import paths
from cxr14.params import PARAMS_FILE
from cxr14.runtime.errors import warn
from cxr14.runtime.signals import run_main

if TYPE_CHECKING:
    from cxr14.deployment.predict import Failed, Notice

CSV_COLUMNS = ("image", "class", "probability", "calibrated", "threshold", "decision", "margin", "relative_margin",
               "view", "sex", "age", "in_distribution", "ood_score")  # the DICOM tags, then the out-of-distribution
# score, last (empty where there is none): older readers keep their columns
DICOM_COLUMNS = ("view", "sex", "age")
OOD_COLUMNS = ("in_distribution", "ood_score")
BAR_AFTER = 8  # a progress bar for more images than this
PREDICT_DOC = ("Predict: per-image probabilities, calibrated probabilities, thresholds, decisions and margins, plus "
               "Grad-CAM.")
COMPARE_DOC = ("Compare two runs' test ROC-AUC: paired patient-bootstrap interval and p-value, DeLong's test per "
               "class. A and B are git revisions (commit, branch, tag), experiment names as `dvc exp show` lists "
               "them, or `workspace`; their test predictions are read through DVC at those revisions, so nothing "
               "is checked out. The difference reported is B - A; nothing is written.")


def parse_predict_args(argv: list[str] | None) -> argparse.Namespace:
    """cxr14-predict's arguments, with the engine and (torch) model they imply filled in."""
    from cxr14.deployment.predict import ENGINES, PRECISIONS

    parser = argparse.ArgumentParser(prog="cxr14-predict", description=PREDICT_DOC)
    parser.add_argument("images", nargs="+", help="PNG, JPEG or DICOM files (any size or mode; DICOM "
                        "found by content), folders (searched recursively) or glob patterns (quote them: '**' crosses "
                        "folders)")
    parser.add_argument("--engine", choices=ENGINES, help="onnx: the exported model through ONNX Runtime, no PyTorch "
                        "(the default); torch: the checkpoint (the default with a .pt --model)")
    parser.add_argument("--model", type=Path, help="the export stage's .onnx (onnx engine; default: see "
                        f"--precision) or the train stage's checkpoint (torch engine; default {paths.MODEL})")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=f"onnx engine's default model: "
                        f"int8 {paths.ONNX_INT8}, fp32 {paths.ONNX}; auto (the default): int8 on a CPU where the "
                        "export stage wrote it and found it within export.int8_max_auc_drop, and the CPU has 8-bit "
                        "dot products (VNNI, Arm), else fp32")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N; mps with --engine torch (default: train.device "
                        "of --params, else cpu; the onnx engine needs onnxruntime-gpu for CUDA)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--threads", type=int, help="decoding threads (default: the cores this process may use)")
    parser.add_argument("--thresholds", type=Path, help=f"torch engine: calibrate output (default {paths.THRESHOLDS}); "
                        "onnx engine: replaces the thresholds embedded in the model")
    parser.add_argument("--calibrator", type=Path, help=f"torch engine: calibrate output (default {paths.CALIBRATOR}; "
                        "a missing path means raw probabilities); onnx engine: replaces the embedded one")
    parser.add_argument("--csv", type=Path, metavar="OUT", help="write one row per image and class here (atomically)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--gradcam", type=Path, metavar="DIR", help="write heatmaps of positive classes here (either "
                        "engine: the exported model carries the last block's Grad-CAM)")
    parser.add_argument("--layer", help="Grad-CAM layer, e.g. layer3 (torch engine; default: explain.layer of "
                        "--params, else the last block, the onnx engine's only one)")
    parser.add_argument("--params", type=Path,
                        help="project params to read train.device, train.cpu_kernels and explain.layer from "
                        "(default: params.yaml when the working directory has one; else the CPU and the last block)")
    args = parser.parse_args(argv)
    check_predict_args(parser, args)
    return args


def check_predict_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (argparse's exit status 2), and the engine a .pt model implies."""
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: expected a positive integer")
    if args.engine is None:
        pt = args.model is not None and args.model.suffix in (".pt", ".pth")
        args.engine = "torch" if pt else "onnx"
    if args.precision != "auto" and (args.model is not None or args.engine != "onnx"):
        parser.error(f"--precision {args.precision} picks the onnx engine's default model; "
                     f"{'--model names the file' if args.model is not None else 'the torch engine runs float32'}")
    if args.model is None and args.engine == "torch":
        args.model = paths.MODEL


def predict(argv: list[str] | None = None) -> None:
    """cxr14-predict: the images through the chosen engine; SystemExit(1) when any image failed."""
    from cxr14.deployment import predict as work

    args = parse_predict_args(argv)
    params = args.params or (PARAMS_FILE if PARAMS_FILE.is_file() else None)  # a named file must exist
    where = work.settings(params, args.device, args.layer)
    files, missing = work.expand_inputs(args.images)
    inputs = [*files, *(p for p in (args.model, args.thresholds, args.calibrator, params) if p is not None),
              paths.MODEL, paths.ONNX, paths.ONNX_INT8, paths.THRESHOLDS, paths.CALIBRATOR]
    check_outputs(args, inputs)
    for line in missing:
        print(f"error: {line}", file=sys.stderr)
    engine = work.open_engine(args.engine, args.model, args.precision, where)
    if args.gradcam is not None:
        engine.want_heatmaps(where.layer, where.layer_key)
        work.check_heatmap_names(args.gradcam, files, engine.classes, inputs)
    thresholds, calibrator = work.calibration(engine, args.thresholds, args.calibrator)
    results = work.predict_images(engine, files, calibrator, thresholds, args.batch_size, args.threads, args.gradcam,
                                  where.dicom_voi)
    failed = len(missing) + show(results, args, f"model: {engine.file} ({engine.name} engine)", len(files))
    if args.csv is not None:
        print(f"predict ({engine.name}, {engine.file}): {len(files) - failed + len(missing)} image(s) x "
              f"{len(engine.classes)} classes to {args.csv}; {failed} failed", file=sys.stderr)
    if failed:
        raise SystemExit(1)


def check_outputs(args: argparse.Namespace, inputs: list) -> None:
    """--csv and --gradcam checked before any work (`check_output`): nothing a rename would destroy (a device, a
    FIFO, a folder, one of the inputs), and a place where a file can be made."""
    from cxr14.runtime.outputs import check_output

    if args.gradcam is not None:
        check_output(args.gradcam, folder=True, option="--gradcam", purpose=" for the heatmaps", inputs=inputs)
    if args.csv is not None:
        check_output(args.csv, option="--csv", purpose=" for the table", inputs=inputs)


def show(results: Iterable[dict | Failed | Notice], args: argparse.Namespace, heading: str, total: int) -> int:
    """Tables on stdout, or the CSV file (whole when every image is done, or not at all), or one JSON document;
    an error line per failed image; the tables under `heading`. Returns the number that failed."""
    from cxr14.deployment.predict import Failed, Notice
    from cxr14.runtime.outputs import atomic_path
    from cxr14.runtime.progress import progress

    tables = not args.json and args.csv is None
    if tables:
        print(heading)
    collected, failed = [], 0
    with contextlib.ExitStack() as stack:
        writer = None
        if args.csv is not None:
            writer = csv.writer(stack.enter_context(open(stack.enter_context(atomic_path(args.csv)), "w", newline="")))
            writer.writerow(CSV_COLUMNS)
        bar = stack.enter_context(progress(total=total, unit="image", desc="predict",
                                           **({"disable": True} if total <= BAR_AFTER else {})))
        for result in results:
            if isinstance(result, Notice):  # about an image still to come: no step of the bar
                bar.clear()
                warn(f"{result.image}: {result.message}")
                continue
            if isinstance(result, Failed):
                bar.clear()
                print(f"error: {result.image}: {result.reason}", file=sys.stderr)
                failed += 1
            else:
                if writer is not None:
                    writer.writerows(csv_rows(result))
                if args.json:
                    collected.append(result)
                elif tables:
                    bar.clear()
                    print_table(result)
            bar.update(1)
    if args.json:
        print(json.dumps(collected, indent=2))
    return failed


def print_table(result: dict) -> None:
    """One image's rows as a fixed-width table, and its heatmap files."""
    print(f"\n{result['image']}")
    if result.get("dicom"):
        d = result["dicom"]
        age = "-" if d["age"] is None else f"{d['age']:g}"
        print(f"DICOM {d['modality'] or '-'}, view {d['view'] or '-'}, sex {d['sex'] or '-'}, age {age}, "
              f"{d['transfer_syntax']}")
    if result.get("in_distribution") is not None:
        verdict = "yes" if result["in_distribution"] else "NO, the findings below are not to be trusted"
        print(f"in distribution: {verdict} (out-of-distribution score {result['ood_score']:.3f})")
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
    tags = result.get("dicom") or {}
    extra = ["" if tags.get(c) is None else tags[c] for c in DICOM_COLUMNS]
    extra += ["" if result.get(c) is None else result[c] for c in OOD_COLUMNS]
    own = CSV_COLUMNS[1:-len(DICOM_COLUMNS) - len(OOD_COLUMNS)]
    for r in result["predictions"]:
        yield [result["image"], *("" if r[c] is None else r[c] for c in own), *extra]


def predict_main(argv: list[str] | None = None) -> None:
    """The `cxr14-predict` console command: one-line errors, exit status 1 when any image failed."""
    run_main(predict, argv)


SERVE_DOC = ("Serve the exported model over HTTP: the Open Inference Protocol v2 REST API (/v2/...), POST /predict "
             "(cxr14-predict --json's result per uploaded image, heatmaps on request) and a page at /. Set "
             "CXR14_SERVE_TOKEN to require 'Authorization: Bearer TOKEN' on every request. SIGTERM or Ctrl-C: stop "
             "listening, answer the requests accepted, exit.")


def parse_serve_args(argv: list[str] | None) -> argparse.Namespace:
    """cxr14-serve's arguments: predict's model options, the address, and the batching and size limits."""
    from cxr14.deployment.predict import ENGINES, PRECISIONS

    parser = argparse.ArgumentParser(prog="cxr14-serve", description=SERVE_DOC)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                        "only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model "
                        "(default 1; more for more cores: the service is stateless)")
    parser.add_argument("--engine", choices=ENGINES, default="onnx", help="onnx (default): the exported model; "
                        "torch: the checkpoint, which also draws heatmaps")
    parser.add_argument("--model", type=Path, help="as cxr14-predict --model")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="as cxr14-predict --precision")
    parser.add_argument("--device", help="as cxr14-predict --device")
    parser.add_argument("--thresholds", type=Path, help="as cxr14-predict --thresholds")
    parser.add_argument("--calibrator", type=Path, help="as cxr14-predict --calibrator")
    parser.add_argument("--params", type=Path, help="as cxr14-predict --params")
    parser.add_argument("--max-batch", type=int, default=16, help="images per model call at most (default 16)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a model call waits for images of "
                        "requests still being decoded (default 10; a lone request never waits)")
    parser.add_argument("--threads", type=int, help="decoding threads (default: the cores this process may use)")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32 MB)")
    parser.add_argument("--max-pixels", type=int, default=50_000_000, help="largest image, in pixels, read from its "
                        "header before decoding: decompression bombs are refused (default 50,000,000)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="log level (default info: one line per request)")
    args = parser.parse_args(argv)
    for name in ("port", "workers", "max_batch", "threads", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "port" else 1):
            parser.error(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    for name in ("max_wait_ms", "max_body_mb"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a number >= 0")
    if args.precision != "auto" and (args.model is not None or args.engine != "onnx"):
        parser.error(f"--precision {args.precision} picks the onnx engine's default model")
    return args


def serve(argv: list[str] | None = None) -> None:
    """cxr14-serve: check the model, then serve until SIGTERM or Ctrl-C."""
    from cxr14.deployment.serve import Options
    from cxr14.deployment.serve import serve as run

    args = parse_serve_args(argv)
    text = {k: None if getattr(args, k) is None else str(getattr(args, k))
            for k in ("model", "device", "thresholds", "calibrator", "params")}
    options = Options(engine=args.engine, precision=args.precision, max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms, threads=args.threads, max_body_mb=args.max_body_mb,
                      max_pixels=args.max_pixels, **text)
    run(options, args.host, args.port, args.workers, args.log_level)


def serve_main(argv: list[str] | None = None) -> None:
    """The `cxr14-serve` console command: one-line errors (a foreign or stale model stops start-up)."""
    run_main(serve, argv)


def compare(argv: list[str] | None = None) -> None:
    """cxr14-compare: run B against run A on the same test images, as a table or JSON."""
    from cxr14.evaluation import compare as stats
    from cxr14.evaluation.compare import WORKSPACE
    from cxr14.params import Evaluate, load_section

    parser = argparse.ArgumentParser(prog="cxr14-compare", description=COMPARE_DOC)
    parser.add_argument("a", nargs="?", default="HEAD", help="baseline run: git revision, experiment name or "
                        f"{WORKSPACE} (default HEAD)")
    parser.add_argument("b", nargs="?", default=WORKSPACE, help=f"run compared with it (default {WORKSPACE})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--bootstrap", type=int, help="paired patient resamples (default: evaluate.bootstrap)")
    parser.add_argument("--seed", type=int, help="resampling seed (default: evaluate.seed)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project (default: this folder)")
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file for the defaults (section evaluate)")
    args = parser.parse_args(argv)
    e = load_section(args.repo / args.params, Evaluate)
    resamples = args.bootstrap if args.bootstrap is not None else e.bootstrap
    if resamples < 10:
        parser.error(f"--bootstrap {resamples}: expected at least 10 resamples")
    runs = (stats.read_run(args.repo, args.a), stats.read_run(args.repo, args.b))
    stats.paired(*runs, (args.a, args.b))
    result = stats.compare(*runs, resamples, args.seed if args.seed is not None else e.seed)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **result}, indent=2))
    else:
        print(compare_table(result, (args.a, args.b)))


def compare_table(result: dict, names: tuple[str, str]) -> str:
    """`cxr14.evaluation.compare.compare`'s result as a fixed-width text table, the mean first, and a verdict."""
    def cell(v: float | None, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    head = f"{'class':<20}{'A':>8}{'B':>8}{'B - A':>9}{'95% interval':>20}{'p boot':>8}{'p DeLong':>10}"
    lines = [f"A = {names[0]}, B = {names[1]}: test ROC-AUC on {result['images']} images, {result['patients']} "
             f"patients, {result['bootstrap_resamples']} paired patient resamples", head, "-" * len(head)]
    r = result
    lines.append(f"{'mean':<20}{cell(r['mean_auc_a']):>8}{cell(r['mean_auc_b']):>8}{cell(r['difference'], '+.4f'):>9}"
                 f"{'[' + cell(r['ci_low'], '+.4f') + ', ' + cell(r['ci_high'], '+.4f') + ']':>20}"
                 f"{cell(r['p_bootstrap'], '.3f'):>8}{'':>10}")
    for name, v in r["per_class"].items():
        if v["auc_a"] is None:
            lines.append(f"{name:<20}{'-':>8}{'-':>8}   {v['note']}")
            continue
        interval = "[" + cell(v["ci_low"], "+.4f") + ", " + cell(v["ci_high"], "+.4f") + "]"
        lines.append(f"{name:<20}{cell(v['auc_a']):>8}{cell(v['auc_b']):>8}{cell(v['difference'], '+.4f'):>9}"
                     f"{interval:>20}{cell(v['p_bootstrap'], '.3f'):>8}{cell(v['p_delong'], '.3f'):>10}")
    excludes = r["ci_low"] > 0 or r["ci_high"] < 0
    verdict = ("the interval excludes 0: B differs from A beyond test-sample luck" if excludes
               else "the interval covers 0: this test set cannot tell A and B apart")
    lines.append(f"mean difference: {verdict}")
    return "\n".join(lines)


def compare_main(argv: list[str] | None = None) -> None:
    """The `cxr14-compare` console command: one-line errors."""
    run_main(compare, argv)

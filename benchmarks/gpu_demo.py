"""The demo's whole DAG on a bare GPU machine, without DVC: what Grad-CAM localisation reaches at 224 px.

At the demo's 96 px, a ResNet's last block (resnet10's or resnet18's) is a 3x3 map, which caps the pointing
game at about 0.36. This runs the stages in order (demo, split, prepare, train, evaluate, calibrate, explain,
and export when ONNX is installed), each through its own `main(["--params", F])`, in a scratch folder, with
`--set section.key=value` overrides of the repo's params.yaml (for example ResNet50 at 224 px), and prints per
stage the seconds and the figures that matter: val and test mean AUC, the pointing game and its ceiling,
T(IoBB), the sanity checks.

A bare GPU machine has neither DVC nor dvclive: without dvclive the train stage's per-epoch log (dvclive/) is
not written; every other output is the stage's own. Nothing here downloads: `train.weights` must stay `none`
unless the ImageNet file is in place.

    PYTHONPATH=. python benchmarks/gpu_demo.py --work DIR [--set prepare.image_size=224 ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("demo", "split", "prepare", "train", "evaluate", "calibrate", "explain", "export")


def overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` (value as YAML) -> {section: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"error: --set {pair!r}: expected section.key=value")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def has_dvclive() -> bool:
    """dvclive itself, not the project's dvclive/ output folder (a namespace package when the repo is on the path)."""
    try:
        from dvclive import Live  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (created; outputs go there)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.json = args.json.resolve() if args.json else None
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides(args.set).items():
        if section not in params:
            raise SystemExit(f"error: --set {section}.*: no such section in params.yaml")
        params[section].update(values)
    args.work.mkdir(parents=True, exist_ok=True)
    params_file = args.work / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    os.chdir(args.work)  # the stages read and write paths relative to the project root
    seconds: dict[str, float] = {}
    for name in STAGES:
        if name == "export" and importlib.util.find_spec("onnxscript") is None:
            seconds[name] = None  # type: ignore[assignment]
            continue
        module = importlib.import_module(f"stages.{name}")
        if name == "train" and not has_dvclive():
            module.write_log = lambda history, folder: None  # no dvclive here: the per-epoch log is skipped
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        module.main(["--params", str(params_file)])
        seconds[name] = round(time.perf_counter() - start, 1)
    metrics = {n: json.loads(Path(f"reports/{n}.json").read_text())  # the full figures, as the stages report them
               for n in ("train", "evaluate", "calibrate", "explain", "export") if Path(f"reports/{n}.json").is_file()}
    import torch

    explain = metrics["explain"]
    figures = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "overrides": args.set, "seconds": seconds,
               "best_val_mean_auc": metrics["train"]["best_val_mean_auc"],
               "test_mean_auc": metrics["evaluate"]["mean_auc"], "oracle_mean_auc": metrics["evaluate"].get(
                   "oracle_mean_auc"), "train_images_per_second": metrics["train"]["images_per_second"],
               "explain": {"layer": explain["layer"], "overall": explain["overall"],
                           "per_class": explain["per_class"], "sanity": explain.get("sanity")},
               "export": metrics.get("export")}
    o = explain["overall"]
    print(f"gpu_demo on {figures['device']} ({' '.join(args.set)}): val mean AUC {figures['best_val_mean_auc']}, "
          f"test {figures['test_mean_auc']} (oracle {figures['oracle_mean_auc']}); pointing game "
          f"{o['pointing_game']} (ceiling {o.get('pointing_game_ceiling')}), T(IoBB>0.1) {o.get('iobb_0.1')}; "
          f"seconds {seconds}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

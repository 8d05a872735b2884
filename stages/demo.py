"""Demo stage: a deterministic phantom of ChestX-ray14 in NIH's exact file layout, in data/demo.

Label table, split lists, box list, 8-bit grayscale PNGs and the clean labels, from params `demo`.

    python -m stages.demo [--out data/demo] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cxr14 import paths
from cxr14.data.demo import generate
from cxr14.data.nih import CLASSES
from cxr14.params import PARAMS_FILE, load_params
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.signals import run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=paths.DEMO, help="dataset folder (replaced as a whole)")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file with a `demo` section")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    start = time.perf_counter()
    try:
        stats = generate(params.demo, args.out)
    except PipelineError as exc:  # name the params file for errors about a demo.* value
        raise PipelineError(f"{args.params} {exc}" if str(exc).startswith("demo.") else str(exc)) from None
    seconds = time.perf_counter() - start
    print(f"demo: {stats['images']} images of {stats['patients']} patients -> {args.out} in {seconds:.1f} s; "
          f"test: {stats['test_images']} images of {stats['test_patients']} patients, {stats['boxes']} boxes")
    print(f"{'finding':<20}{'clean':>7}{'noisy':>7}")
    for name in CLASSES:
        print(f"{name:<20}{stats['clean'][name]:>7}{stats['noisy'][name]:>7}")


if __name__ == "__main__":
    run_main(main)

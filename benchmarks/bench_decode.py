"""PNG decoding of the NIH sample: libpng through imagecodecs (`gray8_png`, what prepare, predict and serve use)
against Pillow's decoder, pixels compared, in one run.

    python benchmarks/bench_decode.py [--nih ../shared/nih] [--rounds 3]

Decoders, each to the full-size 8-bit gray image: Pillow as `Image.open(...).load()` reads a file (one IDAT chunk
at a time); Pillow in one call on all the IDAT data (`Image.frombytes(..., "zip")`, this project's decoder before
imagecodecs); libpng. Each file's bytes are read once; then for each round and file the decoders run back to back
(alternated, so all see the machine at the same moments). Prints the median ms per file by colour type (NIH's 308:
304 gray, 4 RGBA) and the ratios to libpng; then images/s with 1 and 2 threads for each decoder, the two-thread
gain saying how much of the decode runs without the GIL.
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cxr14.data.images import gray8_png, to_gray8

ROOT = Path(__file__).resolve().parents[1]


def with_pillow(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_gray8(image)


def with_pillow_one_call(data: bytes) -> Image.Image:
    width, height, colour = *struct.unpack(">II", data[16:24]), data[25]
    mode, idat, at = {0: "L", 2: "RGB", 6: "RGBA"}[colour], [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            idat.append(data[at + 8:at + 8 + length])
        at += 12 + length
    image = Image.frombytes(mode, (width, height), b"".join(idat), "zip", mode, 0)
    return image if mode == "L" else image.convert("L")


def with_libpng(data: bytes) -> Image.Image:
    image = gray8_png(data)
    assert image is not None, "not an 8-bit gray/RGB/RGBA PNG"
    return image


def images_per_s(decode: object, datas: list[bytes], threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(decode, datas))
        return len(datas) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=ROOT.parent / "shared" / "nih")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = sorted((args.nih / "images").glob("*.png"))
    if not files:
        raise SystemExit(f"{args.nih / 'images'}: no PNG files")
    datas = [f.read_bytes() for f in files]
    kinds = ["gray" if d[25] == 0 else "RGBA" if d[25] == 6 else "RGB" for d in datas]
    decoders = {"Pillow": with_pillow, "Pillow, one call": with_pillow_one_call, "libpng": with_libpng}
    for data, file in zip(datas, files, strict=True):
        pixels = [np.asarray(decode(data)) for decode in decoders.values()]
        if not all(np.array_equal(p, pixels[-1]) for p in pixels):
            raise SystemExit(f"{file}: the decoders disagree")
    print(f"{len(files)} files, pixels identical with the {len(decoders)} decoders")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for data, kind in zip(datas, kinds, strict=True):
            for name, decode in decoders.items():
                start = time.perf_counter()
                decode(data)
                times.setdefault((name, kind), []).append(time.perf_counter() - start)
    for kind in sorted(set(kinds)):
        ms = {name: 1000 * statistics.median(times[(name, kind)]) for name in decoders}
        print(f"{kind} ({kinds.count(kind)} files), median ms per file: "
              + ", ".join(f"{name} {t:.2f} (libpng {ms['libpng'] / t:.2f}x)" for name, t in ms.items()))
    for name, decode in decoders.items():
        one, two = images_per_s(decode, datas, 1), images_per_s(decode, datas, 2)
        print(f"{name}: 1 thread {one:.1f} images/s, 2 threads {two:.1f} images/s ({two / one:.2f}x)")


if __name__ == "__main__":
    main()

"""Image decoding, one way for prepare, explain and predict: any PNG/JPEG/DICOM to 8-bit grayscale, resized.

The model must see at prediction time exactly the pixels it was trained on, so prepare and predict
share this function rather than each decoding in its own way (explain reads prepare's arrays, and opens
image files for their size only through `open_image`).
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

import imagecodecs
import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr14.data.dicom import DICOM_SUFFIXES, DicomTags, is_dicom, parses_as_dicom, read_dicom
from cxr14.runtime.errors import warn

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_8BIT_MODES = {0: "L", 2: "RGB", 6: "RGBA"}  # PNG colour type -> Pillow mode, for `gray8_png`
_QUIET = ("ignore", None, Image.DecompressionBombWarning, None, 0)
# libpng's warnings (imagecodecs' logger, "PNG warning: ...") are about what Pillow's decoder passes over in silence:
# ancillary chunks ("iCCP: Gray color space not permitted on RGB PNG", NIH's RGBA files), extra compressed data,
# an invalid tRNS. Without this, one line per such image inside predict's bar; other imagecodecs records pass.
logging.getLogger("imagecodecs").addFilter(lambda record: not str(record.msg).startswith("PNG warning"))


Source = Path | str | bytes  # a file, or an image's bytes as the serve command receives them (never written to disk)


def binary(source: Source) -> BinaryIO:
    """The source opened for reading: the file, or its bytes in memory."""
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def open_image(path: Source) -> Image.Image:
    """Image.open (lazy: reads the header) without Pillow's two-line DecompressionBombWarning, which would land
    inside a progress bar: `decode_gray` says it in one line instead. The filter is checked on every call, not
    set once at import, as a catch_warnings block elsewhere (pytest wraps each test in one) restores the
    filters it found; it is a filter, not catch_warnings, because that is not thread-safe (predict's threads)."""
    first = next((f for f in warnings.filters if issubclass(Image.DecompressionBombWarning, f[2])), None)
    if first != _QUIET:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)


def png_significant_bits(path: Source) -> int | None:
    """The gray channel's significant bits from a PNG's sBIT chunk (Pillow does not expose it), else None.

    Reads chunk headers up to the first IDAT only; a chunk that is short, oversized or fails its CRC, or an
    sBIT value outside 1-16, counts as no sBIT (the pixel range decides instead)."""
    with binary(path) as f:
        if f.read(8) != PNG_SIGNATURE:
            return None
        for _ in range(1000):  # a bound: ancillary chunks before IDAT are a handful
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND") or length > 2**31 - 1:
                return None
            if kind != b"sBIT":
                f.seek(length + 4, 1)  # data and CRC
                continue
            data, crc = f.read(length), f.read(4)
            if len(data) != length or length < 1 or crc != struct.pack(">I", zlib.crc32(kind + data)):
                return None
            return data[0] if 1 <= data[0] <= 16 else None
    return None


def stored_bits(data: np.ndarray, sbit: int | None) -> int:
    """Bits per pixel actually used by 16-bit data, which `to_gray8` scales to 0-255 by 255 / (2**bits - 1).

    DICOM exports often store 10-16 significant bits unshifted in a 16-bit PNG, so dividing every file by 257
    (16 bits) turns a 12-bit radiograph (0-4095) nearly black and changes the model's findings. The rule:
    - an sBIT chunk of b bits, when the data fit in b bits (max <= 2**b - 1): b bits;
    - an sBIT chunk the data exceed (a PNG written as the spec says, samples scaled up to 16 bits): 16 bits;
    - no sBIT: the pixel range decides, max <= 255 -> 8, <= 1023 -> 10, <= 4095 -> 12, <= 16383 -> 14 bits,
      else 16 bits. A genuine 16-bit radiograph spans far more than its lowest 14 bits, so only data
      stored in fewer bits fall below 16384.
    """
    top = int(data.max(initial=0))
    if sbit is not None:
        return sbit if top <= 2**sbit - 1 else 16
    return next(b for b in (8, 10, 12, 14, 16) if top <= 2**b - 1)


def to_gray8(image: Image.Image, sbit: int | None = None) -> Image.Image:
    """Any PIL image as 8-bit grayscale; 16-bit data scaled from the bits they use (`stored_bits`, with the
    PNG's sBIT when given), never clipped at 255. Other modes (8-bit L, NIH's RGB/RGBA) convert as Pillow does."""
    if image.mode in WIDE_MODES or image.mode == "F":
        data = np.asarray(image, dtype=np.float64)
        if image.mode == "F" or data.max(initial=0) > 65535:
            raise ValueError(f"unsupported pixel mode {image.mode} with values above 16 bits")
        if data.min(initial=0) < 0:  # would wrap around in uint8
            raise ValueError(f"unsupported pixel mode {image.mode} with negative values")
        bits = stored_bits(data, sbit)
        return Image.fromarray(np.rint(data * 255.0 / (2**bits - 1)).astype(np.uint8), mode="L")
    # NIH's RGBA files carry an opaque alpha; convert("L") reads the colour channels, as wanted.
    return image.convert("L")


def fit(gray: Image.Image, size: int | None) -> np.ndarray:
    """The one resize of every decoder (PNG, JPEG, DICOM): the model sees pixels resampled one way only."""
    if size is not None and gray.size != (size, size):
        # Box-reduce first (reducing_gap), then bilinear with an antialias kernel: fast and alias-free.
        gray = gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(gray, dtype=np.uint8)


def decode_image(path: Source, size: int | None = None, voi: bool = True
                 ) -> tuple[np.ndarray, list[str], DicomTags | None]:
    """`decode_gray`'s pixels and warnings, and the DICOM tags (None for PNG/JPEG), for predict's report.

    DICOM is recognised by content (the 'DICM' magic), by a .dcm/.dicom suffix, or, for a file Pillow cannot
    open, by parsing as a dataset with pixel data; `voi=False` ignores its VOI LUT/window (`read_dicom`).
    """
    if is_dicom(path) or (not isinstance(path, bytes) and Path(path).suffix.lower() in DICOM_SUFFIXES):
        return _decode_dicom(path, size, voi)
    try:
        gray, notes = _decode_pillow(path, size)
    except ValueError:
        if parses_as_dicom(path):  # False for a file it may not read: Pillow's reason stands
            return _decode_dicom(path, size, voi)
        raise
    return gray, notes, None


def _decode_dicom(path: Source, size: int | None, voi: bool) -> tuple[np.ndarray, list[str], DicomTags]:
    pixels, tags = read_dicom(path, voi)
    notes = []
    if tags.lateral:
        notes.append(f"lateral view (ViewPosition {tags.view}): this model was trained on frontal (PA/AP) chest "
                     "radiographs; its findings may not apply")
    return fit(Image.fromarray(pixels, mode="L"), size), notes, tags


def gray8_png(head: bytes, rest: BinaryIO | None = None) -> Image.Image | None:
    """An 8-bit gray, RGB or RGBA non-interlaced PNG (the NIH layout: of the 308 sample files 304 gray, 4 RGBA
    with an opaque alpha) decoded by libpng through imagecodecs and made gray as `to_gray8` does, bit-identical
    to `to_gray8(Image.open(...))` wherever Pillow decodes the file; None for any other file (and for a colour
    one with a transparent colour, tRNS), which Pillow opens as usual.

    Why: it is the faster decoder of the two, on NIH's files 7.8 against 8.4 ms for Pillow's own decoder in one
    call (gray, 0.93x) and 10.6 against 12.0 ms (RGBA, 0.88x: the files that set serve's one-client p99), and
    against 9.0 and 12.3 ms for Pillow's usual chunk-by-chunk loop (benchmarks/bench_decode.py).
    `head`: the file's bytes, or its first 33 bytes with the rest readable from `rest`. A truncated or corrupt
    file raises ValueError here; the caller then lets Pillow say why in its words.
    """
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", head[16:29])
    mode = PNG_8BIT_MODES.get(colour)
    if mode is None or (depth, compression, filtering, interlace) != (8, 0, 0, 0) or not width or not height:
        return None
    limit = Image.MAX_IMAGE_PIXELS  # over it, Pillow's path warns or refuses
    if limit is not None and width * height > limit:
        return None
    data = head + rest.read() if rest is not None else head
    seen_idat, at = False, 8
    while True:
        if at + 8 > len(data):
            raise ValueError("PNG ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            seen_idat = True
        elif not seen_idat and data[at + 8 + length:at + 12 + length] != struct.pack(
                ">I", zlib.crc32(data[at + 4:at + 8 + length])):  # Pillow checks the chunks before IDAT too
            raise ValueError(f"{kind!r} chunk fails its CRC")
        elif kind == b"IEND":
            break
        elif kind in (b"acTL", b"fcTL", b"fdAT") or (kind == b"tRNS" and mode != "L"):  # Pillow's frames, or
            return None  # a transparent colour that Pillow's conversion to gray reads
        at += 12 + length
    try:
        pixels = imagecodecs.png_decode(data)
    except (imagecodecs.PngError, ValueError):  # some libpng errors surface as UnicodeDecodeError (imagecodecs)
        raise ValueError("libpng cannot decode this PNG") from None
    if pixels.ndim == 3 and mode == "L":  # a gray tRNS, expanded to an alpha channel that gray ignores
        pixels = pixels[..., 0]
    if pixels.dtype != np.uint8 or pixels.shape != (height, width, len(mode))[:2 if mode == "L" else 3]:
        raise ValueError(f"libpng decoded {pixels.shape} {pixels.dtype} pixels from a {width}x{height} {mode} PNG")
    image = Image.fromarray(pixels)
    return image if mode == "L" else image.convert("L")


def _decode_pillow(path: Source, size: int | None) -> tuple[np.ndarray, list[str]]:
    try:
        if isinstance(path, bytes):
            gray = gray8_png(path)
        else:
            with open(path, "rb") as f:
                gray = gray8_png(f.read(33), f)
        if gray is not None:
            return fit(gray, size), []
    except (ValueError, OSError, struct.error, zlib.error):
        pass  # Pillow's own path below says what is wrong with the file
    notes = []
    try:
        with open_image(path) as image:
            pixels = image.width * image.height
            image.load()
            sbit = png_significant_bits(path) if image.format == "PNG" and image.mode in WIDE_MODES else None
            gray = to_gray8(image, sbit)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image ({exc}); expected a readable PNG or JPEG") from None
    limit = Image.MAX_IMAGE_PIXELS  # above 2x this limit Image.open refused the file (DecompressionBombError)
    if limit is not None and pixels > limit:
        notes.append(f"{gray.width}x{gray.height} = {pixels} pixels, over Pillow's decompression-bomb limit of "
                     f"{limit}; decoded anyway (files over {2 * limit} are refused)")
    return fit(gray, size), notes


def decode_gray(path: Path | str, size: int | None = None, voi: bool = True) -> tuple[np.ndarray, list[str]]:
    """`load_gray`'s pixels and its warnings about the file (without the file name), for callers that decode in
    threads or worker processes and print between the updates of a progress bar."""
    gray, notes, _ = decode_image(path, size, voi)
    return gray, notes


def load_gray(path: Path | str, size: int | None = None) -> np.ndarray:
    """Decode an image file to a uint8 (H, W) array, optionally resized (antialiased) to size x size; its
    warnings (a very large image) printed, one line each naming the file.

    Raises ValueError with the reason if the file is not a readable image (or a DICOM file that is refused).
    """
    gray, notes = decode_gray(path, size)
    for note in notes:
        warn(f"{path}: {note}")
    return gray

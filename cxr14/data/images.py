"""Image decoding, one way for prepare, explain and predict: any PNG/JPEG to 8-bit grayscale, resized.

The model must see at prediction time exactly the pixels it was trained on, so prepare and predict
share this function rather than each decoding in its own way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def to_gray8(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit grayscale; 16-bit data is scaled (x/257), never clipped at 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        data = np.asarray(image, dtype=np.float64)
        if image.mode == "F" or data.max(initial=0) > 65535:
            raise ValueError(f"unsupported pixel mode {image.mode} with values above 16 bits")
        return Image.fromarray(np.rint(data / 257.0).astype(np.uint8), mode="L")
    # NIH's RGBA files carry an opaque alpha; convert("L") reads the colour channels, as wanted.
    return image.convert("L")


def load_gray(path: Path | str, size: int | None = None) -> np.ndarray:
    """Decode an image file to a uint8 (H, W) array, optionally resized (antialiased) to size x size.

    Raises ValueError with the reason if the file is not a readable image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            gray = to_gray8(image)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image ({exc}); expected a readable PNG or JPEG") from None
    if size is not None and gray.size != (size, size):
        # Box-reduce first (reducing_gap), then bilinear with an antialias kernel: fast and alias-free.
        gray = gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(gray, dtype=np.uint8)

"""Images a chest X-ray model should not judge, made from what the installed packages ship (no download): the sets
the ood stage scores against the in-distribution test images.

(a) photographs: random square crops (a third to all of the shorter side) of scikit-learn's two sample
    photographs (`load_sample_images`: a temple in China, a flower), greyed;
(b) synthetic: blank images of every grey, uniform and Gaussian noise, checkerboards of random cell sizes;
(c) CT and MR slices: pydicom's bundled test files (`pydicom.data.get_testdata_file`, shipped in its wheel), read
    directly (cxr14's DICOM reader refuses CT and MR), rescaled to Hounsfield units and shown through radiological
    windows (CT: soft tissue, lung, bone, the file's own; MR: the 1st-99th and 0-100th percentiles), random crops
    and mirror images;
(d) radiographs read wrong: the test images inverted (MONOCHROME1 read as MONOCHROME2), rotated 90 degrees, and
    upside down (flipped top to bottom: the phantoms are symmetric left to right, and training flips them so).

Every image goes through `cxr14.data.images.fit`, the one resize of prepare and predict.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from cxr14.data.images import fit

# pydicom's bundled files with a CT or MR slice (uncompressed or JPEG 2000, which the pinned decoders read)
CT_FILES = ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm")
MR_FILES = ("MR_small.dcm", "examples_overlay.dcm")
CT_WINDOWS = ((40, 400), (-600, 1500), (300, 2000))  # (level, width) in HU: soft tissue, lung, bone


def square_crop(image: np.ndarray, rng: np.random.Generator, low: float) -> np.ndarray:
    """A random square crop whose side is `low` to 1 times the image's shorter side."""
    h, w = image.shape
    side = max(1, int(min(h, w) * rng.uniform(low, 1.0)))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return image[y:y + side, x:x + side]


def resized(image: np.ndarray, size: int) -> np.ndarray:
    return fit(Image.fromarray(np.ascontiguousarray(image)), size)


def photographs(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(a) n crops of scikit-learn's sample photographs, grey, (n, size, size) uint8."""
    from sklearn.datasets import load_sample_images

    greys = [np.asarray(Image.fromarray(rgb).convert("L")) for rgb in load_sample_images().images]
    return np.stack([resized(square_crop(greys[i % len(greys)], rng, 1 / 3), size) for i in range(n)])


def blank(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(b) n flat images, from black to white."""
    return np.stack([np.full((size, size), v, np.uint8) for v in np.linspace(0, 255, n).round().astype(int)])


def noise(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(b) n noise images: half uniform on 0-255, half Gaussian around mid-grey with a random spread."""
    uniform = [rng.integers(0, 256, (size, size)).astype(np.uint8) for _ in range(n - n // 2)]
    gauss = [np.clip(rng.normal(128, rng.uniform(10, 60), (size, size)), 0, 255).astype(np.uint8)
             for _ in range(n // 2)]
    return np.stack(uniform + gauss)


def checkerboard(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(b) n black-and-white checkerboards, cells 2 to size/4 pixels."""
    y, x = np.mgrid[0:size, 0:size]
    cells = rng.integers(2, max(3, size // 4 + 1), n)
    return np.stack([(((y // c + x // c) % 2) * 255).astype(np.uint8) for c in cells])


def windowed(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """8-bit display of `values` through a window (DICOM's linear VOI function, simplified)."""
    return np.clip((values - (level - width / 2)) / max(width, 1e-9) * 255, 0, 255).round().astype(np.uint8)


def slices() -> list[np.ndarray]:
    """Every CT and MR slice of pydicom's bundled files in 8 bits, through each window (see the module)."""
    import pydicom
    from pydicom.data import get_testdata_file

    out = []
    for name in (*CT_FILES, *MR_FILES):
        ds = pydicom.dcmread(get_testdata_file(name))
        values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) \
            + float(ds.get("RescaleIntercept", 0) or 0)
        if name in CT_FILES:
            windows = list(CT_WINDOWS)
            if "WindowCenter" in ds and "WindowWidth" in ds:
                level, width = (v[0] if isinstance(v, pydicom.multival.MultiValue) else v
                                for v in (ds.WindowCenter, ds.WindowWidth))
                windows.append((float(level), float(width)))
        else:
            windows = [((lo + hi) / 2, hi - lo) for lo, hi in (np.percentile(values, [1, 99]),
                                                               np.percentile(values, [0, 100]))]
        out += [windowed(values, level, width) for level, width in windows]
    return out


def ct_mr(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(c) n images: random crops (70-100% of the side) of the windowed slices, half mirrored."""
    views = slices()
    images = []
    for i in range(n):
        crop = square_crop(views[i % len(views)], rng, 0.7)
        images.append(resized(crop[:, ::-1] if rng.random() < 0.5 else crop, size))
    return np.stack(images)


def inverted(images: np.ndarray) -> np.ndarray:
    return 255 - np.asarray(images)


def rotated(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(np.asarray(images), 1, axes=(1, 2)))


def upside_down(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(images)[:, ::-1])


# set -> variant -> maker of (n, size, rng) images: the generated sets
GENERATED: dict[str, dict[str, Callable[[int, int, np.random.Generator], np.ndarray]]] = {
    "photographs": {"photographs": photographs},
    "synthetic": {"blank": blank, "noise": noise, "checkerboard": checkerboard},
    "ct_mr": {"ct_mr": ct_mr},
}
# the radiographs read wrong: made from the in-distribution test images
MISREAD: dict[str, Callable[[np.ndarray], np.ndarray]] = {"inverted": inverted, "rot90": rotated,
                                                          "upside_down": upside_down}


def ood_sets(test_images: np.ndarray, per_variant: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Every set and variant's images at the test images' size: `per_variant` generated images each, and each
    misread variant of the test images (all of them)."""
    size = int(test_images.shape[1])
    rng = np.random.default_rng(seed)
    sets = {name: {v: make(per_variant, size, rng) for v, make in variants.items()}
            for name, variants in GENERATED.items()}
    sets["misread"] = {v: make(test_images) for v, make in MISREAD.items()}
    return sets

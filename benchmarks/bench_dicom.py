"""Decode throughput, DICOM against PNG, through the one decoder (`decode_gray`, 224 px) on NIH images.

    python benchmarks/bench_dicom.py [FOLDER] [N_J2K]

Writes each PNG's pixels as uncompressed DICOM (and the first N_J2K as JPEG 2000 lossless) in a temporary
folder, then times one pass of each; prints images/s and the ratios to PNG.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from cxr14.data.images import decode_gray


def write(gray: np.ndarray, path: Path, j2k: bool) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", *gray.shape, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 8, 8, 7
    ds.PixelRepresentation, ds.PixelData = 0, gray.tobytes()
    if j2k:
        ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)


def rate(files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        decode_gray(f, 224)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/nih/images")
    n_j2k = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    pngs = sorted(folder.glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        dcm, j2k = [], []
        for i, png in enumerate(pngs):
            gray = np.asarray(Image.open(png).convert("L"))
            dcm.append(Path(tmp) / f"{png.stem}.dcm")
            write(gray, dcm[-1], False)
            if i < n_j2k:
                j2k.append(Path(tmp) / f"{png.stem}_j2k.dcm")
                write(gray, j2k[-1], True)
        rate(dcm[:5])  # imports pydicom and its handlers before timing
        png_rate, dcm_rate = rate(pngs), rate(dcm)
        j2k_rate, png_few = rate(j2k), rate(pngs[:len(j2k)])
    print(f"PNG {png_rate:.1f}/s, uncompressed DICOM {dcm_rate:.1f}/s ({len(pngs)} images): "
          f"ratio {dcm_rate / png_rate:.2f}")
    print(f"JPEG 2000 lossless DICOM {j2k_rate:.1f}/s vs PNG {png_few:.1f}/s ({len(j2k)} images): "
          f"ratio {j2k_rate / png_few:.2f}")


if __name__ == "__main__":
    main()

"""Build an own-data table dataset (`data.format: table`) from real NIH images, as another hospital would hand one over.

Each of the first `--images` NIH PNGs in `--nih`/images becomes a 12-bit DICOM (MONOCHROME2, with a window that maps
it back to the PNG's 8 bits) in a folder per patient, `<out>/<patient>/<image>.dcm`; `<out>/labels.csv` lists them
with their labels from NIH's label table, sex, age, view and NIH's official test flag, and without the finding
`--leave-out`, so that the pipeline meets a finding it must treat as unknown. docs/datasets.md runs external
validation and fine-tuning on it:

    python tools/nih_table.py --out /tmp/nih-dicom --leave-out Effusion
    dvc exp run -S data.format=table -S data.root=/tmp/nih-dicom -S data.table=labels.csv ...
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from cxr14.data.nih import CLASSES, TEST_LIST, find_label_table, read_image_list, read_label_table
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import replace_dir
from cxr14.runtime.progress import progress
from cxr14.runtime.signals import run_main

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
TABLE = "labels.csv"


def to_dicom(png: Path, out: Path, patient: str, sex: str, age: str, view: str) -> None:
    """The PNG's gray pixels x 16 in 12 of 16 bits, windowed over 0..4080 so a viewer (and prepare) shows the PNG."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    gray = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID, ds.PatientSex, ds.ViewPosition = "DX", patient, sex, view
    ds.PatientAge = f"{int(age):03d}Y" if age.isdigit() else ""
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2040, 4081
    ds.PixelData = gray.tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)


def build(nih: Path, out: Path, images: int | None, leave_out: list[str]) -> dict[str, int]:
    """Write the DICOM files and labels.csv into `out` (replaced whole); return counts for the summary line."""
    table = read_label_table(find_label_table(nih)).set_index("Image Index")
    test = set(read_image_list(nih / TEST_LIST))
    pngs = sorted((nih / "images").glob("*.png"))[:images]
    if not pngs:
        raise PipelineError(f"{nih / 'images'}: no PNG images")
    unknown = [p.name for p in pngs if p.name not in table.index]
    if unknown:
        raise PipelineError(f"{nih / 'images'}: {unknown[0]} is not in the label table ({len(unknown)} such)")
    findings = [c for c in CLASSES if c not in leave_out]
    with replace_dir(out) as tmp:
        rows = []
        for png in progress(pngs, desc="nih_table", unit="img"):
            r = table.loc[png.name]
            patient, stem = f"p{int(r['Patient ID']):05d}", png.stem
            sex, age, view = (str(r.get(c, "")) for c in ("Patient Gender", "Patient Age", "View Position"))
            to_dicom(png, tmp / patient / f"{stem}.dcm", patient, sex, age, view)
            rows.append({"image": f"{patient}/{stem}.dcm", "patient": patient, **{c: int(r[c]) for c in findings},
                         "sex": sex, "age": age, "view": view, "test": int(png.name in test)})
        with open(tmp / TABLE, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return {"images": len(rows), "test": sum(r["test"] for r in rows), "findings": len(findings)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "nih",
                        help="NIH layout root with images/, the label table and test_list.txt (default ../shared/nih)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced whole): <patient>/*.dcm "
                        f"and {TABLE}")
    parser.add_argument("--images", type=int, default=None, help="the first N images by name (default: all)")
    parser.add_argument("--leave-out", nargs="*", default=["Effusion"], choices=CLASSES, metavar="FINDING",
                        help="finding columns the table leaves out (default: Effusion)")
    args = parser.parse_args(argv)
    counts = build(args.nih, args.out, args.images, args.leave_out)
    print(f"nih_table: {counts['images']} DICOM images ({counts['test']} official test) and {args.out / TABLE} with "
          f"{counts['findings']} findings (left out: {', '.join(args.leave_out) or 'none'})")


if __name__ == "__main__":
    run_main(main)

"""DICOM read as radiology software reads it (cxr14/data/dicom.py), through the one decoder and predict.

DICOM files are built here from a real NIH PNG (128 px, for speed) so each lossless variant must decode to the
PNG's pixels exactly and give predict's probabilities through the deployed ONNX model.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cxr14 import cli
from cxr14.data.dicom import is_dicom, parse_age, read_dicom
from cxr14.data.images import decode_image, load_gray
from tests.conftest import NIH, besides_ood, own, stage_result

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

SIDE = 128
DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped with pydicom: offline


@pytest.fixture(scope="module")
def nih_png(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A real NIH radiograph at SIDE px as an 8-bit PNG, and its pixels."""
    source = sorted((NIH / "images").glob("*.png"))[0]
    gray = Image.open(source).convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    path = tmp_path_factory.mktemp("png") / "scan.png"
    gray.save(path)
    return path, np.asarray(gray)


def dataset(stored: np.ndarray, bits_stored: int | None = None, signed: bool = False, **tags) -> Dataset:
    """A DX dataset holding `stored` uncompressed (Explicit VR Little Endian); `tags` set last."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientSex, ds.PatientAge, ds.ViewPosition = "DX", "F", "058Y", "PA"
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(signed)
    ds.ImagerPixelSpacing = [0.143, 0.143]
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = stored.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def twelve_bit(p: np.ndarray, **tags) -> Dataset:
    """p * 16 in 12 of 16 bits, windowed over exactly that data range (0..4080 -> 0..255): the PNG's pixels."""
    return dataset((p.astype(np.uint16) * 16), 12, WindowCenter=2040.5, WindowWidth=4081, **tags)


def voi_lut(p: np.ndarray) -> Dataset:
    ds = dataset(p.astype(np.uint16) * 16, 12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = np.minimum(np.rint(np.arange(4096) / 16), 255).astype(np.uint16).tobytes()
    item["LUTData"].VR = "OW"
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 100, 10  # the LUT comes first
    return ds


def compressed(ds: Dataset, uid: str) -> Dataset:
    if uid == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = uid
    else:
        ds.compress(uid)
    return ds


def gdcm_syntax(source: Path, out: Path, syntax: str) -> Path:
    """`source` re-encoded by python-gdcm (JPEG encoders pydicom lacks)."""
    gdcm = pytest.importorskip("gdcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(out))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return out


# name -> (dataset from the PNG's pixels); every one decodes to the PNG exactly
LOSSLESS = {
    "mono2_8bit": lambda p: dataset(p),
    "bits12_window": twelve_bit,
    "mono1": lambda p: dataset(255 - p, PhotometricInterpretation="MONOCHROME1"),
    "rescale": lambda p: dataset(p.astype(np.uint16) * 2 + 100, 10, RescaleSlope=0.5, RescaleIntercept=-50,
                                 WindowCenter=128, WindowWidth=256),
    "voi_lut": voi_lut,
    "signed": lambda p: dataset((p.astype(np.int16) * 16 - 2048), 12, signed=True, WindowCenter=-7.5,
                                WindowWidth=4081),
    "signed_8_in_16": lambda p: dataset(p.astype(np.int16) - 128, 8, signed=True),
    "rle": lambda p: compressed(twelve_bit(p), RLELossless),
    "deflated": lambda p: compressed(twelve_bit(p), DeflatedExplicitVRLittleEndian),
    "jpeg_ls": lambda p: compressed(twelve_bit(p), JPEGLSLossless),
    "jpeg2000": lambda p: compressed(twelve_bit(p), JPEG2000Lossless),
}
GDCM_LOSSLESS = ("JPEGLosslessProcess14_1", "JPEGLosslessProcess14")


def write_variants(folder: Path, p: np.ndarray) -> dict[str, Path]:
    files = {name: save(make(p), folder / f"{name}.dcm") for name, make in LOSSLESS.items()}
    for syntax in GDCM_LOSSLESS:
        files[syntax] = gdcm_syntax(files["bits12_window"], folder / f"{syntax}.dcm", syntax)
    return files


def test_every_lossless_variant_decodes_to_the_png(nih_png, tmp_path: Path) -> None:
    png, p = nih_png
    files = write_variants(tmp_path, p)
    for name, path in files.items():
        np.testing.assert_array_equal(load_gray(path), p, err_msg=name)
        np.testing.assert_array_equal(load_gray(path, 32), load_gray(png, 32), err_msg=name)  # the same resize
    tags = decode_image(files["jpeg_ls"])[2]
    assert (tags.modality, tags.view, tags.sex, tags.age) == ("DX", "PA", "F", 58.0)
    assert tags.transfer_syntax == "JPEG-LS Lossless Image Compression"
    assert (tags.pixel_spacing, tags.pixel_spacing_tag) == ((0.143, 0.143), "ImagerPixelSpacing")


def test_jpeg_baseline_is_close(nih_png, tmp_path: Path) -> None:
    png, p = nih_png
    path = gdcm_syntax(save(dataset(p), tmp_path / "src.dcm"), tmp_path / "baseline.dcm", "JPEGBaselineProcess1")
    assert decode_image(path)[2].transfer_syntax == "JPEG Baseline (Process 1)"
    assert np.abs(load_gray(path).astype(int) - p).mean() < 1.0


def test_predict_lossless_variants_equal_the_png(nih_png, deployed: Path, tmp_path: Path, capsys) -> None:
    png, p = nih_png
    files = write_variants(tmp_path, p)
    out = tmp_path / "out.csv"
    code, err = stage_result(cli.predict, [png, *files.values(), *own(deployed), "--csv", out], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(out, newline="")))
    probs: dict[str, list[float]] = {}
    for r in rows:
        probs.setdefault(r["image"], []).append(float(r["probability"]))
    assert len(probs) == 1 + len(files)
    for name, path in files.items():
        assert np.abs(np.array(probs[str(path)]) - probs[str(png)]).max() < 1e-3, name
    by_image = {r["image"]: r for r in rows}
    assert (by_image[str(png)]["view"], by_image[str(png)]["sex"], by_image[str(png)]["age"]) == ("", "", "")
    assert (by_image[str(files["rle"])]["view"], by_image[str(files["rle"])]["sex"]) == ("PA", "F")
    assert float(by_image[str(files["rle"])]["age"]) == 58.0


def test_order_window_then_inversion_once(tmp_path: Path) -> None:
    """Window, then MONOCHROME1 with Presentation LUT Shape INVERSE: one inversion, after the window."""
    stored = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))
    ds = dataset(stored, 12, PhotometricInterpretation="MONOCHROME1", PresentationLUTShape="INVERSE",
                 WindowCenter=1000.5, WindowWidth=1001)  # 500..1500 -> full range; asymmetric in 0..4095
    out = read_dicom(save(ds, tmp_path / "order.dcm"))[0][0]
    x = stored[0].astype(float)
    window = np.clip((x - 500) / 1000, 0, 1) * 255
    np.testing.assert_array_equal(out, np.rint(255 - window).astype(np.uint8))
    inverted_first = np.clip((4095 - x - 500) / 1000, 0, 1) * 255  # MONOCHROME1 before the window
    assert np.abs(out - np.rint(inverted_first)).max() > 100
    assert np.abs(out - np.rint(window)).max() > 100  # inverted twice: no inversion
    np.testing.assert_array_equal(read_dicom(tmp_path / "order.dcm", voi=False)[0][0],
                                  np.rint(255 - x * 255 / 4095).astype(np.uint8))


def refused(tmp_path: Path, p: np.ndarray) -> dict[str, tuple[Path, str]]:
    """file -> the reason predict must give, one per refusal."""
    frames = dataset(np.stack([p, p]), NumberOfFrames=2)
    frames.Rows, frames.Columns = p.shape
    colour = dataset(np.stack([p] * 3, axis=-1), SamplesPerPixel=3, PhotometricInterpretation="RGB",
                     PlanarConfiguration=0)
    no_pixels = dataset(p)
    del no_pixels.PixelData
    jpip = dataset(p)
    jpip.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.94"  # JPIP Referenced: no decoder exists
    jpip.PixelData = encapsulate([p.tobytes()])
    jpip["PixelData"].VR = "OB"
    return {
        "frames": (save(frames, tmp_path / "frames.dcm"), "DICOM multi-frame image (2 frames)"),
        "colour": (save(colour, tmp_path / "colour.dcm"), "DICOM colour image (3 samples per pixel, RGB)"),
        "no_pixels": (save(no_pixels, tmp_path / "nopixels.dcm"), "DICOM file has no pixel data"),
        "ct": (save(dataset(p, Modality="CT"), tmp_path / "ct.dcm"),
               "DICOM modality CT: this model reads chest radiographs (CR/DX)"),
        "mr": (save(dataset(p, Modality="MR"), tmp_path / "mr.dcm"), "DICOM modality MR"),
        "syntax": (save(jpip, tmp_path / "jpip.dcm"), "DICOM transfer syntax JPIP Referenced"),
    }


def test_refusals_are_one_line_and_the_others_go_on(nih_png, deployed: Path, tmp_path: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    png, p = nih_png
    cases = refused(tmp_path, p)
    good = save(dataset(p), tmp_path / "good.dcm")
    out = tmp_path / "out.csv"
    code, err = stage_result(cli.predict, [png, good, *(f for f, _ in cases.values()), *own(deployed), "--csv", out],
                             capsys)
    assert code == 1
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == len(cases)
    for path, reason in cases.values():
        assert any(line.startswith(f"error: {path}: {reason}") for line in errors), (path, errors)
    assert {r["image"] for r in csv.DictReader(open(out, newline=""))} == {str(png), str(good)}
    # a syntax whose decoder is not installed: named, in one line
    import pydicom.pixels

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: SimpleNamespace(is_available=False))
    rle = save(compressed(dataset(p), RLELossless), tmp_path / "rle.dcm")
    with pytest.raises(ValueError, match=r"^DICOM transfer syntax RLE Lossless \(1.2.840.10008.1.2.5\): no decoder "
                                         r"installed for it$"):
        load_gray(rle)


def test_pydicom_samples_read_or_refused_in_one_line(recwarn: pytest.WarningsRecorder) -> None:
    """Read, or refused with a one-line reason, and no pydicom warning either (they print two lines with a source
    line into predict's output; SC_rgb_jpeg.dcm's VR mismatch is one)."""
    files = sorted(TEST_FILES.glob("*.dcm"))
    assert len(files) > 50
    read = 0
    for path in files:
        try:
            gray, _, tags = decode_image(path, 16)
            assert gray.shape == (16, 16) and gray.dtype == np.uint8 and tags is not None
            read += 1
        except ValueError as exc:
            assert "\n" not in str(exc) and str(exc), path
    assert read >= 3  # e.g. the JPEG 2000 and JPEG-LS samples
    assert not [w for w in recwarn if "pydicom" in w.filename], [str(w.message) for w in recwarn]


def test_recognised_by_content_whatever_the_name(nih_png, tmp_path: Path) -> None:
    _, p = nih_png
    source = save(dataset(p), tmp_path / "a.dcm")
    for name in ("IM0001", "scan.png", "scan.jpg"):
        (tmp_path / name).write_bytes(source.read_bytes())
        assert is_dicom(tmp_path / name)
        np.testing.assert_array_equal(load_gray(tmp_path / name), p, err_msg=name)
    bare = dataset(p)  # no preamble, no file meta: found by parsing, as Pillow cannot open it
    del bare.file_meta
    bare.save_as(tmp_path / "IM0002", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert not is_dicom(tmp_path / "IM0002")
    np.testing.assert_array_equal(load_gray(tmp_path / "IM0002"), p)


def test_folder_mixing_png_jpeg_dicom(nih_png, deployed: Path, tmp_path: Path, capsys) -> None:
    png, p = nih_png
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(p).save(folder / "a.png")
    Image.fromarray(p).save(folder / "b.jpg", quality=95)
    save(dataset(p, ViewPosition="LL", PatientSex="M", PatientAge="006M"), folder / "sub" / "c.dcm")
    save(twelve_bit(p), folder / "d.dicom")
    save(dataset(p), folder / "sub" / "IM0001")  # an archive's name without a suffix: found by its content
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out.csv"
    code, err = stage_result(cli.predict, [folder, *own(deployed), "--csv", out], capsys)
    assert code == 0
    lateral = [line for line in besides_ood(err) if line.startswith("warning: ")]
    assert lateral == [f"warning: {folder / 'sub' / 'c.dcm'}: lateral view (ViewPosition LL): this model was trained "
                       "on frontal (PA/AP) chest radiographs; its findings may not apply"]
    rows = list(csv.DictReader(open(out, newline="")))
    tags = {Path(r["image"]).name: (r["view"], r["sex"], r["age"]) for r in rows}
    assert tags == {"a.png": ("", "", ""), "b.jpg": ("", "", ""), "c.dcm": ("LL", "M", "0.5"),
                    "d.dicom": ("PA", "F", "58.0"), "IM0001": ("PA", "F", "58.0")}


def test_ages() -> None:
    assert [parse_age(a) for a in ("058Y", "006M", "010W", "003D", "", "58", "abc")] == [
        58.0, 0.5, round(70 / 365.25, 3), round(3 / 365.25, 3), None, None, None]


def test_predict_dicom_voi_param(tmp_path: Path) -> None:
    from cxr14.deployment.predict import dicom_voi

    (tmp_path / "old.yaml").write_text("train: {}\n")
    (tmp_path / "off.yaml").write_text("predict:\n  dicom_voi: false\n")
    assert dicom_voi(tmp_path / "old.yaml") is True and dicom_voi(tmp_path / "off.yaml") is False

"""DICOM radiographs read the way radiology software displays them, to the 8-bit grayscale the PNG path gives.

The grayscale pipeline of PS3.3 C.11 / PS3.4 N.2, in its order, because each step is defined on the output of the
one before it (a window is given in modality units, so it cannot come before the modality LUT; MONOCHROME1 and
INVERSE are defined on the VOI output, so inverting first would move the window to the wrong end of the data):

1. stored values (signed when Pixel Representation is 1, Bits Stored of Bits Allocated; unused high bits cleared);
2. modality LUT: Rescale Slope/Intercept (pydicom's `apply_modality_lut`), or a Modality LUT Sequence;
3. VOI: a VOI LUT Sequence (its first LUT), else Window Center/Width (the first window; pydicom's
   `apply_windowing`, LINEAR, LINEAR_EXACT and SIGMOID); skipped with `voi=False` (params `predict.dicom_voi`);
4. one inversion to P-values when Photometric Interpretation is MONOCHROME1 or Presentation LUT Shape is INVERSE
   (the DX IOD pairs MONOCHROME1 with INVERSE to mean one inversion, PS3.3 C.8.11.6.1.2, so the two never cancel);
5. linear to 8 bits over the output range, see `to_gray8_dicom`.

The LUT Sequences are looked up here, not by pydicom 3.0.2, whose lookup builds a `uint{bits}` dtype (no uint12 for
a 12-bit modality LUT) and indexes an 8-bit VOI LUT through uint8 indices (wrapping beyond 256 entries);
pydicom's `apply_presentation_lut` inverts over the image's own maximum, not the output range, so step 4 is here too.

pydicom is imported inside the functions: a PNG-only run never pays for it.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DICOM_SUFFIXES = (".dcm", ".dicom")
# Radiographs: CR, DX, DR (retired, digital radiography) and RG (film radiography); OT and no Modality too, as
# secondary captures and anonymised exports of chest films often carry them. Any other modality is refused.
RADIOGRAPHS = ("CR", "DX", "DR", "RG", "OT", "")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL")
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY])$")
_AGE_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


@dataclass(frozen=True)
class DicomTags:
    """What predict reports from a DICOM header; `pixel_spacing_tag` says which tag the spacing came from."""

    modality: str
    view: str
    sex: str
    age: float | None
    transfer_syntax: str
    pixel_spacing: tuple[float, float] | None
    pixel_spacing_tag: str | None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pixel_spacing"] = list(self.pixel_spacing) if self.pixel_spacing else None
        return out

    @property
    def lateral(self) -> bool:
        return self.view in LATERAL_VIEWS


def is_dicom(path: Path | str | bytes) -> bool:
    """Whether the file (or bytes) carries the DICOM Part 10 magic ('DICM' at byte 128): content, not suffix,
    decides."""
    if isinstance(path, bytes):
        return path[128:132] == b"DICM"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def quiet_pydicom() -> None:
    """No pydicom UserWarning on stderr: its notes on lenient parsing ("Expected explicit VR, but found implicit
    VR") are two lines with a source line, inside predict's output and progress bar, about files that are then
    checked (`check_radiograph`) and refused in one line where they must be. A filter re-applied on every call
    (a catch_warnings block elsewhere restores the filters it found), not catch_warnings, which is not
    thread-safe: predict decodes in threads."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


def parses_as_dicom(path: Path | str | bytes) -> bool:
    """Whether a file without the magic (no preamble: old ACR-NEMA style files) still parses as a dataset with
    pixel data, pydicom reading it with force. Asked only of files Pillow could not open."""
    import pydicom

    quiet_pydicom()
    try:
        ds = pydicom.dcmread(readable(path), force=True)
        return "PixelData" in ds and "Rows" in ds
    except Exception:  # anything not a dataset
        return False


def parse_age(text: str) -> float | None:
    """DICOM Age String in years: '058Y' -> 58, '006M' -> 0.5, '010W' -> 0.19, '003D' -> 0.008; else None."""
    match = _AGE.match(str(text or "").strip().upper())
    if not match:
        return None
    return round(int(match.group(1)) * _AGE_UNIT[match.group(2)], 3)


def read_tags(ds: Any, syntax: str) -> DicomTags:
    """The header fields predict reports. Pixel spacing: PixelSpacing when present (calibrated to the patient
    plane, what a viewer measures with), else ImagerPixelSpacing (the detector plane); the tag used is named."""
    spacing, which = None, None
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds[tag].value if tag in ds else None
        if value not in (None, "", []):
            try:
                spacing, which = (float(value[0]), float(value[1])), tag
                break
            except (TypeError, ValueError, IndexError):
                continue
    return DicomTags(modality=str(ds.get("Modality", "") or "").strip().upper(),
                     view=str(ds.get("ViewPosition", "") or "").strip().upper(),
                     sex=str(ds.get("PatientSex", "") or "").strip().upper(),
                     age=parse_age(ds.get("PatientAge", "")), transfer_syntax=syntax,
                     pixel_spacing=spacing, pixel_spacing_tag=which)


def readable(path: Path | str | bytes) -> Any:
    """What pydicom.dcmread takes: a path, or the bytes as an in-memory file."""
    return io.BytesIO(path) if isinstance(path, bytes) else path


def _dataset(path: Path | str | bytes) -> tuple[Any, Any]:
    """(dataset, transfer syntax UID); a file without one in its meta gets the encoding pydicom parsed it in."""
    import pydicom
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(readable(path), force=True)
    except Exception as exc:  # pydicom's errors for a truncated or foreign file are of many types
        raise ValueError(f"cannot read DICOM ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid is None:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        uid = (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little is not False
               else ExplicitVRBigEndian)
        ds.file_meta.TransferSyntaxUID = uid
    return ds, UID(str(uid))


def check_radiograph(ds: Any, tags: DicomTags, uid: Any) -> None:
    """The refusals, each one line: what this model cannot read, or this installation cannot decode."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        raise ValueError("DICOM file has no pixel data (not an image)")
    if tags.modality not in RADIOGRAPHS:
        raise ValueError(f"DICOM modality {tags.modality}: this model reads chest radiographs (CR/DX)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"DICOM multi-frame image ({frames} frames): expected one radiograph per file")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1:
        raise ValueError(f"DICOM colour image ({samples} samples per pixel, {photometric}): expected grayscale")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"DICOM photometric interpretation {photometric or 'missing'}: expected MONOCHROME1 or "
                         "MONOCHROME2")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ValueError(f"DICOM transfer syntax {tags.transfer_syntax} ({uid}): no decoder exists for it in "
                         "pydicom") from None
    if not decoder.is_available:
        raise ValueError(f"DICOM transfer syntax {tags.transfer_syntax} ({uid}): no decoder installed for it")


def stored_values(ds: Any, tags: DicomTags) -> np.ndarray:
    """The stored pixel values as integers: signed per Pixel Representation, bits above Bits Stored cleared."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # a decoder's own error: corrupt or truncated data
        raise ValueError(f"cannot decode DICOM pixel data ({tags.transfer_syntax}; {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    if arr.ndim != 2:
        raise ValueError(f"DICOM pixel data of shape {arr.shape}: expected one grayscale frame")
    bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or arr.dtype.itemsize * 8)
    arr = arr.astype(np.int64)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0 and bits < 64:
        arr &= (1 << bits) - 1  # old files keep overlays in the unused high bits
    return arr


def _lut(item: Any, values: np.ndarray, signed: bool, little: bool) -> tuple[np.ndarray, np.ndarray]:
    """A LUT Sequence item applied: (mapped values, the LUT's entries). Inputs below the first mapped value take
    the first entry and above the last the last one (PS3.3 C.11.1.1.1, C.11.2.1.1)."""
    entries, first, _ = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    if signed and first >= 32768:  # the descriptor's second value is SS for signed pixels, read as US
        first -= 65536
    data = item.LUTData
    if isinstance(data, bytes | bytearray):
        lut = np.frombuffer(data, dtype="<u2" if little else ">u2")[:entries].astype(np.int64)
    else:
        lut = np.atleast_1d(np.asarray(data, dtype=np.int64))[:entries]
    if lut.size == 0:
        raise ValueError("DICOM LUT Sequence with no LUT data")
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, lut.size - 1)
    return lut[index], lut


def _ends(ds: Any) -> np.ndarray:
    """The smallest and largest value the stored bits can hold."""
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    return np.array([0, 2**bits - 1])


def modality_values(stored: np.ndarray, ds: Any, little: bool) -> tuple[np.ndarray, tuple[float, float]]:
    """Step 2, and the range the stored bits map to through it (the output range when no VOI is applied)."""
    from pydicom.pixels import apply_modality_lut

    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if ds.get("ModalityLUTSequence"):
        values, lut = _lut(ds.ModalityLUTSequence[0], stored, signed, little)
        return values, (float(lut.min()), float(lut.max()))
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        ends = apply_modality_lut(_ends(ds), ds)
        return apply_modality_lut(stored, ds), (float(ends.min()), float(ends.max()))
    ends = _ends(ds)
    return stored, (float(ends[0]), float(ends[1]))


def voi_values(values: np.ndarray, ds: Any, little: bool) -> tuple[np.ndarray, tuple[float, float]] | None:
    """Step 3 (None when the file has no VOI), and its output range: the LUT's smallest to largest entry, or the
    window's output range (pydicom's: the stored-bit range through the modality LUT), probed at the far ends."""
    from pydicom.pixels import apply_windowing

    if ds.get("VOILUTSequence") and "LUTData" in ds.VOILUTSequence[0] and "LUTDescriptor" in ds.VOILUTSequence[0]:
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        out, lut = _lut(ds.VOILUTSequence[0], values, signed, little)
        return out, (float(lut.min()), float(lut.max()))
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    try:
        with np.errstate(over="ignore"):
            out = apply_windowing(np.asarray(values, dtype=np.float64), ds, index=0)
            ends = apply_windowing(np.array([-1e30, 1e30]), ds, index=0)
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"DICOM window unusable ({' '.join(str(exc).split())[:200]})") from None
    return out, (float(ends.min()), float(ends.max()))


def to_gray8_dicom(stored: np.ndarray, ds: Any, voi: bool = True) -> np.ndarray:
    """Steps 2-5: stored values to uint8 P-values.

    The 8-bit rule: linear over the output range of the last step applied, lo -> 0 and hi -> 255 (rounded,
    clipped): with a VOI, its output range; without one (or with `voi=False`), the range the stored bits can
    hold (Bits Stored, signed or not) carried through the modality LUT. Never the image's own min..max: as
    the PNG path (`to_gray8` scales by the bits stored, never stretches), the contrast is the file's, so a
    DICOM written from an 8-bit PNG decodes to the PNG's pixels.
    """
    little = getattr(ds, "original_encoding", (None, True))[1] is not False
    values, (lo, hi) = modality_values(stored, ds, little)
    windowed = voi_values(values, ds, little) if voi else None
    if windowed is not None:
        values, (lo, hi) = windowed
    scaled = (np.asarray(values, dtype=np.float64) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(stored.shape)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        scaled = 255.0 - scaled
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_dicom(path: Path | str | bytes, voi: bool = True) -> tuple[np.ndarray, DicomTags]:
    """One DICOM radiograph as a full-size uint8 (H, W) array, and its tags.

    Raises ValueError with a one-line reason (the caller names the file) for what is refused: no pixel data, a
    modality other than a radiograph, several frames, colour, a transfer syntax without a decoder installed.
    """
    quiet_pydicom()
    ds, uid = _dataset(path)
    tags = read_tags(ds, uid.name)
    check_radiograph(ds, tags, uid)
    return to_gray8_dicom(stored_values(ds, tags), ds, voi), tags

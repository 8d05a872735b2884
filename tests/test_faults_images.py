"""The deployment side of the fault catalogue, image decoding: what prepare, explain and predict read from a file.

16-bit PNGs exported from DICOM hold 10-16 significant bits: each must come out as the same 8-bit image, or the
model silently sees a darker picture (a 12-bit radiograph divided by 257 once turned a finding from 0.01 to 0.93).
An image over Pillow's decompression-bomb limit is decoded with one warning line naming it, never Pillow's
two-line warning inside a progress bar.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import NIH, TINY_I16, TINY_ROWS, besides_ood, own, phantom, stage_result
from PIL import Image

from cxr14 import cli
from cxr14.data.arrays import _decode_chunk, write_array
from cxr14.data.images import decode_image, gray8_png, load_gray, png_significant_bits, to_gray8
from cxr14.explanation.examples import scaled_boxes

NIH_IMAGE = NIH / "images" / "00000003_000.png"  # 8-bit 'L', 0-255
NIH_RGBA = NIH / "images" / "00000004_000.png"  # 8-bit RGBA, gray in its colour channels, opaque


def png16(path: Path, values: np.ndarray, sbit: int | None = None) -> Path:
    """A 16-bit grayscale PNG of `values`, with an sBIT chunk (inserted after IHDR, before IDAT) when given."""
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    data = buffer.getvalue()
    if sbit is not None:
        body = bytes([sbit])
        chunk = struct.pack(">I", len(body)) + b"sBIT" + body + struct.pack(">I", zlib.crc32(b"sBIT" + body))
        data = data[:33] + chunk + data[33:]  # signature (8) + IHDR (4 + 4 + 13 + 4)
    path.write_bytes(data)
    return path


def ramp(bits: int) -> np.ndarray:
    """Every level from 0 to the top of `bits` bits, 64 levels a row (some repeated at the end)."""
    top = 2**bits - 1
    return np.rint(np.linspace(0, top, 64 * 64)).reshape(64, 64).astype(np.int64)


def scaled(values: np.ndarray, bits: int) -> np.ndarray:
    return np.rint(values * 255.0 / (2**bits - 1)).astype(np.uint8)


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_16bit_png_without_sbit_scales_from_the_range_it_uses(tmp_path: Path, bits: int) -> None:
    values = ramp(bits)
    path = png16(tmp_path / "wide.png", values)
    with Image.open(path) as image:
        assert image.mode == "I;16" and image.info.get("sBIT") is None
    assert png_significant_bits(path) is None
    out = load_gray(path)
    np.testing.assert_array_equal(out, scaled(values, bits))
    assert out.min() == 0 and out.max() == 255  # the full gray range, whatever the bit depth


def test_8bit_png_is_unchanged(tmp_path: Path) -> None:
    values = ramp(8).astype(np.uint8)
    Image.fromarray(values).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_gray(tmp_path / "gray.png"), values)


def pillow_gray(source: Path | bytes) -> np.ndarray:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return np.asarray(to_gray8(image))


def test_nih_png_decodes_in_one_call_as_pillow_does() -> None:
    """The one-call path (`gray8_png`) is taken for NIH's 8-bit files and gives Pillow's pixels, from bytes (serve)
    and from a file (prepare, predict), whole and resized."""
    data = NIH_IMAGE.read_bytes()
    assert data.count(b"IDAT") > 10  # many chunks: what Pillow's loop feeds one at a time
    whole = gray8_png(data)
    assert whole is not None and whole.size == (1024, 1024)
    np.testing.assert_array_equal(np.asarray(whole), pillow_gray(data))
    for source in (data, NIH_IMAGE):
        np.testing.assert_array_equal(decode_image(source)[0], pillow_gray(data))
    with Image.open(NIH_IMAGE) as image:
        image.load()
        reference = np.asarray(image.resize((96, 96), Image.Resampling.BILINEAR, reducing_gap=2.0))
    np.testing.assert_array_equal(decode_image(NIH_IMAGE, 96)[0], reference)


def test_nih_rgba_png_decodes_in_one_call_as_pillow_does(caplog: pytest.LogCaptureFixture) -> None:
    """NIH's RGBA files (4 of the 308 here) take the one-call path too, and come out as Pillow's gray; libpng's
    warning about this file's ICC profile (a gray profile in an RGB file) is not logged."""
    data = NIH_RGBA.read_bytes()
    assert data[25] == 6 and b"iCCP" in data  # colour type RGBA, with the profile libpng warns about
    whole = gray8_png(data)
    assert whole is not None and whole.mode == "L"
    np.testing.assert_array_equal(np.asarray(whole), pillow_gray(data))
    np.testing.assert_array_equal(decode_image(NIH_RGBA, 96)[0], decode_image(data, 96)[0])
    assert not [record.getMessage() for record in caplog.records if "PNG" in record.getMessage()]


def test_a_gray_png_with_a_transparent_value_decodes_in_one_call_as_pillow_does() -> None:
    """libpng expands a gray tRNS to an alpha channel; gray ignores it, as Pillow's conversion does."""
    values = ramp(8).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG", transparency=int(values[0, 0]))
    assert b"tRNS" in buffer.getvalue()
    whole = gray8_png(buffer.getvalue())
    assert whole is not None and whole.mode == "L"
    np.testing.assert_array_equal(np.asarray(whole), values)
    np.testing.assert_array_equal(np.asarray(whole), pillow_gray(buffer.getvalue()))


def test_colour_pngs_decode_in_one_call_as_pillow_does() -> None:
    colours = np.random.default_rng(0).integers(0, 256, (16, 12, 4), dtype=np.uint8)
    for mode in ("RGB", "RGBA"):
        buffer = io.BytesIO()
        Image.fromarray(colours[..., :len(mode)], mode=mode).save(buffer, format="PNG")
        whole = gray8_png(buffer.getvalue())
        assert whole is not None and whole.mode == "L"
        np.testing.assert_array_equal(np.asarray(whole), pillow_gray(buffer.getvalue()))


@pytest.mark.parametrize("kind", ["16-bit", "rgb with tRNS", "palette", "interlaced", "animated"])
def test_other_pngs_are_left_to_pillow(tmp_path: Path, kind: str) -> None:
    values = ramp(8).astype(np.uint8)[:1, :1] if kind == "interlaced" else ramp(8).astype(np.uint8)
    image = {"16-bit": Image.fromarray(values.astype(np.uint16) * 257),
             "rgb with tRNS": Image.fromarray(values).convert("RGB"),
             "palette": Image.fromarray(values).convert("P")}.get(kind, Image.fromarray(values))
    buffer = io.BytesIO()
    if kind == "rgb with tRNS":
        image.save(buffer, format="PNG", transparency=(0, 0, 0))
    elif kind == "animated":
        image.save(buffer, format="PNG", save_all=True, append_images=[Image.fromarray(255 - values)])
    else:
        image.save(buffer, format="PNG")
    data = buffer.getvalue()
    if kind == "interlaced":  # Pillow writes no Adam7; for one pixel its data are those of the plain layout
        ihdr = data[12:28] + b"\x01"
        data = data[:8] + data[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    assert gray8_png(data) is None
    np.testing.assert_array_equal(decode_image(data)[0], pillow_gray(data))


@pytest.mark.parametrize(("cut", "reason"), [(40, "cannot identify image file"), (2000, "truncated"),
                                             (200_000, "truncated"), (-20, None)])
def test_a_cut_png_decodes_or_fails_as_with_pillow(cut: int, reason: str | None) -> None:
    """Cut in its header or image data: Pillow's reason; only IEND missing: Pillow decodes it, and so do we."""
    data = NIH_IMAGE.read_bytes()[:cut]
    if reason:
        with pytest.raises(ValueError, match=reason):
            decode_image(data)
    else:
        np.testing.assert_array_equal(decode_image(data)[0], pillow_gray(NIH_IMAGE))


@pytest.mark.parametrize("fault", ["image data CRC", "unknown critical chunk"])
def test_a_png_libpng_refuses_and_pillow_reads_decodes_as_pillow_does(fault: str) -> None:
    """libpng checks what Pillow lets pass (an IDAT chunk's CRC; a critical chunk it does not know): such a file
    goes to Pillow's decoder, and comes out as Pillow decodes it."""
    data = NIH_IMAGE.read_bytes()
    at = data.index(b"IDAT") - 4  # the first IDAT chunk: its length, type, data and CRC
    if fault == "image data CRC":
        length = struct.unpack(">I", data[at:at + 4])[0]
        end = at + 12 + length
        data = data[:end - 4] + bytes(b ^ 0xFF for b in data[end - 4:end]) + data[end:]
    else:
        body = b"x"
        chunk = struct.pack(">I", len(body)) + b"ABCD" + body + struct.pack(">I", zlib.crc32(b"ABCD" + body))
        data = data[:at] + chunk + data[at:]
    with pytest.raises(ValueError):
        gray8_png(data)
    np.testing.assert_array_equal(decode_image(data)[0], pillow_gray(data))
    np.testing.assert_array_equal(decode_image(data)[0], pillow_gray(NIH_IMAGE))


def test_a_corrupt_chunk_before_the_image_data_is_refused_as_pillow_refuses() -> None:
    data = bytearray(NIH_IMAGE.read_bytes())
    data[20] ^= 1  # IHDR's width: its CRC no longer matches
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(bytes(data))


@pytest.mark.parametrize(("sbit", "top", "bits"), [
    (12, 900, 12),  # a dark 12-bit image: its range alone would say 10 bits, twice as bright
    (10, 1023, 10),
    (16, 4000, 16),  # declared 16-bit, dark: its range alone would say 12 bits
    (8, 255, 8),
    (12, 65520, 16),  # the PNG spec's way: 12-bit samples shifted up to 16 bits, sBIT recording the original 12
])
def test_sbit_decides_the_bit_depth(tmp_path: Path, sbit: int, top: int, bits: int) -> None:
    values = np.rint(np.linspace(0, top, 32 * 32)).reshape(32, 32).astype(np.int64)
    path = png16(tmp_path / "sbit.png", values, sbit)
    assert png_significant_bits(path) == sbit
    np.testing.assert_array_equal(load_gray(path), scaled(values, bits))


@pytest.mark.parametrize("sbit", [0, 17])
def test_an_invalid_sbit_is_ignored_for_the_range(tmp_path: Path, sbit: int) -> None:
    values = ramp(12)
    path = png16(tmp_path / "bad_sbit.png", values, sbit)
    assert png_significant_bits(path) is None
    np.testing.assert_array_equal(load_gray(path), scaled(values, 12))


def test_full_range_16bit_decodes_as_before(tiny_nih) -> None:
    """The tests' tiny dataset (and so every prepared array built from it) is unchanged: x / 257, rounded."""
    path = tiny_nih.paths[TINY_I16]
    with Image.open(path) as image:
        old = np.rint(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8)
    expected = phantom(64, 64, seed=[r[0] for r in TINY_ROWS].index(TINY_I16))
    expected[0, :4] = (255, 128, 4, 1)
    np.testing.assert_array_equal(load_gray(path), old)
    np.testing.assert_array_equal(old, expected)


def test_wide_modes_negative_values_are_an_error() -> None:
    with pytest.raises(ValueError, match="unsupported pixel mode I with negative values"):
        to_gray8(Image.fromarray(np.array([[-5, 100]], dtype=np.int32)))
    image = Image.fromarray(np.array([[0, 1000, 4095]], dtype=np.int32))  # 'I': the same rule as 'I;16'
    assert image.mode == "I" and np.asarray(to_gray8(image)).tolist() == [[0, 62, 255]]


def test_12bit_export_of_a_real_radiograph_decodes_and_predicts_as_the_original(
        deployed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    original = np.asarray(Image.open(NIH_IMAGE))
    twelve = np.rint(original * 4095.0 / 255.0)
    files = [str(NIH_IMAGE), str(png16(tmp_path / "twelve.png", twelve)),
             str(png16(tmp_path / "twelve_sbit.png", twelve, 12))]
    for file in files[1:]:
        assert np.abs(load_gray(file).astype(int) - original).max() <= 1
        assert np.abs(load_gray(file, 32).astype(int) - load_gray(NIH_IMAGE, 32)).max() <= 1
    cli.predict_main([*files, *own(deployed), "--json", "--threads", "2"])
    out = capsys.readouterr()
    assert besides_ood(out.err.splitlines()) == []
    probabilities = np.array([[r["probability"] for r in result["predictions"]] for result in json.loads(out.out)])
    assert np.abs(probabilities[1:] - probabilities[0]).max() <= 1e-2
    dark = np.rint(twelve / 257.0)  # the old rule, every file divided by 257: a nearly black image
    assert np.abs(load_gray(files[1]).astype(int) - dark).max() > 200


@pytest.fixture
def bomb_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pillow's decompression-bomb limit lowered to 6000 pixels: 100x100 images warn, 120x120 ones are refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    monkeypatch.setenv("CI", "1")  # no progress bar on the captured stderr
    return 6000


def big_image(path: Path, side: int = 100) -> Path:
    Image.fromarray(np.full((side, side), 90, dtype=np.uint8)).save(path)
    return path


def bomb_warning(path: Path | str) -> str:
    return (f"warning: {path}: 100x100 = 10000 pixels, over Pillow's decompression-bomb limit of 6000; decoded "
            "anyway (files over 12000 are refused)")


def no_pillow_warning(recwarn: pytest.WarningsRecorder, err: str) -> None:
    assert "DecompressionBomb" not in err and "Image size" not in err
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_predict_warns_once_about_a_very_large_image(bomb_limit, deployed: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture, recwarn) -> None:
    small, big = deployed / "images" / "nested" / "img0.png", big_image(tmp_path / "big.png")
    code, err = stage_result(cli.predict, [small, big, small, *own(deployed), "--threads", "2", "--json"], capsys)
    assert code == 0 and besides_ood(err) == [bomb_warning(big)]
    no_pillow_warning(recwarn, "\n".join(err))
    refused = big_image(tmp_path / "huge.png", 120)  # over twice the limit: Pillow's error, one line
    code, err = stage_result(cli.predict, [refused, *own(deployed), "--json"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {refused}: cannot decode image (Image size ")


def test_prepare_warns_once_about_a_very_large_image(bomb_limit, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     recwarn) -> None:
    small, big = str(big_image(tmp_path / "small.png", 20)), str(big_image(tmp_path / "big.png"))
    capsys.readouterr()
    write_array([small, big, small], 16, 1, tmp_path / "out.npy", "table.csv")
    err = capsys.readouterr().err
    assert err.splitlines() == [bomb_warning(big)]
    no_pillow_warning(recwarn, err)
    assert (np.load(tmp_path / "out.npy") == 90).all()
    # what a worker process sends back: the warning travels with the image, for the parent to print
    rows = pickle.loads(pickle.dumps(_decode_chunk([(0, small, 16), (1, big, 16)])))
    assert [(row, notes) for row, _, notes in rows] == [(0, []), (1, [bomb_warning(big).split(": ", 2)[2]])]
    assert capsys.readouterr().err == ""


def test_load_gray_and_explain_say_nothing_in_pillow_words(bomb_limit, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture, recwarn) -> None:
    big = big_image(tmp_path / "big.png")
    capsys.readouterr()
    table = pd.DataFrame({"Image Index": ["big.png"], "path": [str(big)]})
    boxes = pd.DataFrame({"Image Index": ["big.png"], "x": [10.0], "y": [20.0], "w": [30.0], "h": [40.0]})
    moved = scaled_boxes(boxes, table, 50)  # explain reads the size only; prepare warned when it decoded
    assert moved[["x", "y", "w", "h"]].iloc[0].tolist() == [5.0, 10.0, 15.0, 20.0]
    err = capsys.readouterr().err
    assert err == ""
    no_pillow_warning(recwarn, err)
    assert load_gray(big, 8).shape == (8, 8)  # the library call (predict's torch path) prints its own line
    err = capsys.readouterr().err
    assert err.splitlines() == [bomb_warning(big)]
    no_pillow_warning(recwarn, err)

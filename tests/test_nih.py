"""cxr14.data.nih (class names, label table, split lists, both download layouts) and cxr14.data.images (decoding)."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    HEADER_2017,
    NIH,
    NIH_ROWS,
    NIH_TABLE,
    RGBA_FILES,
    TINY_I16,
    TINY_RGBA,
    TINY_ROWS,
    TINY_WIDE,
    phantom,
)
from PIL import Image

from cxr14.data.images import load_gray, to_gray8
from cxr14.data.nih import (
    CLASSES,
    LABEL_TABLE_NAMES,
    META_COLUMNS,
    find_label_table,
    image_dirs,
    parse_findings,
    read_image_list,
    read_label_table,
    scan_images,
)
from cxr14.runtime.errors import PipelineError

SEED_ORDER = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]


def labels_of(findings: str) -> list[int]:
    """Independent reference: 0/1 per class in the seed's order."""
    names = findings.split("|")
    return [int(c in names) for c in SEED_ORDER]


# ---------------------------------------------------------------- class names


def test_classes_are_the_14_names_in_the_seed_order():
    assert list(CLASSES) == SEED_ORDER
    assert len(set(CLASSES)) == 14


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No Finding", []),
        ("Mass|Nodule", [4, 5]),
        ("Nodule|Mass", [4, 5]),
        ("Hernia|Atelectasis", [0, 13]),
        ("Pleural_Thickening", [12]),
        ("Effusion|Infiltration|Pneumothorax", [2, 3, 7]),
    ],
)
def test_parse_findings_in_classes_order(text, expected):
    labels = parse_findings(text, "here")
    assert labels.dtype == np.uint8
    assert labels.shape == (14,)
    assert np.flatnonzero(labels).tolist() == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("Pneumonitis", "unknown finding 'Pneumonitis'"),
        ("Mass|Infiltrate", "unknown finding 'Infiltrate'"),
        ("No Finding|Mass", "'No Finding' combined with findings"),
        ("", "empty 'Finding Labels'"),
    ],
)
def test_parse_findings_refuses_bad_text(text, fragment):
    with pytest.raises(PipelineError, match="^table.csv line 7: ") as err:
        parse_findings(text, "table.csv line 7")
    assert fragment in str(err.value)


# ---------------------------------------------------------------- label table


@pytest.mark.parametrize("name", LABEL_TABLE_NAMES)
def test_find_label_table_accepts_each_nih_name(tmp_path, name):
    assert set(LABEL_TABLE_NAMES) == {
        "Data_Entry_2017.csv",
        "Data_Entry_2017.csv.gz",
        "Data_Entry_2017_v2020.csv",
        "Data_Entry_2017_v2020.csv.gz",
    }
    (tmp_path / "Data_Entry_2017_other.csv").write_text("decoy")
    (tmp_path / name).write_text("x")
    assert find_label_table(tmp_path) == tmp_path / name


def test_find_label_table_without_a_table_names_root_and_expected_names(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").mkdir()  # a folder with the right name is not a table
    (tmp_path / "data_entry_2017.csv").write_text("x")  # nor a name in the wrong case
    with pytest.raises(PipelineError) as err:
        find_label_table(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path}: no label table")
    for name in LABEL_TABLE_NAMES:
        assert name in message


def test_find_label_table_when_root_is_not_a_folder(tmp_path):
    with pytest.raises(PipelineError, match="data root is not a directory"):
        find_label_table(tmp_path / "absent")


@pytest.mark.parametrize("trailing_comma", [True, False], ids=["rows-end-with-comma", "rows-without"])
def test_read_label_table_original_2017_header(tiny_nih, trailing_comma):
    path = tiny_nih.write_table(TINY_ROWS, trailing_comma=trailing_comma)
    assert path.read_text().splitlines()[0].endswith("OriginalImagePixelSpacing[x,y],")
    table = read_label_table(path)
    assert list(table.columns) == ["Image Index", "Patient ID", *META_COLUMNS, *SEED_ORDER]
    assert table["Image Index"].tolist() == [r[0] for r in TINY_ROWS]
    assert table["Patient ID"].tolist() == [r[2] for r in TINY_ROWS]
    assert table["Patient ID"].dtype == np.int64
    assert table[SEED_ORDER].to_numpy().tolist() == [labels_of(r[1]) for r in TINY_ROWS]
    no_finding = table["Image Index"] == "00000002_000.png"
    assert table.loc[no_finding, SEED_ORDER].to_numpy().sum() == 0
    multi = table.set_index("Image Index").loc["00000003_001.png", SEED_ORDER]
    assert multi[multi == 1].index.tolist() == ["Infiltration", "Mass", "Nodule"]


def test_read_label_table_v2020_gzip_layout(tiny_nih):
    import gzip

    header = HEADER_2017.rstrip(",")  # the 2020 revision has no trailing comma
    plain = tiny_nih.write_table(TINY_ROWS, name="Data_Entry_2017_v2020.csv", header=header, trailing_comma=False)
    gz = tiny_nih.root / "Data_Entry_2017_v2020.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    pd.testing.assert_frame_equal(read_label_table(gz), read_label_table(plain))
    pd.testing.assert_frame_equal(read_label_table(gz), read_label_table(tiny_nih.table))


def test_read_label_table_on_the_real_nih_table():
    table = read_label_table(NIH_TABLE)
    raw = pd.read_csv(NIH_TABLE)
    assert len(table) == NIH_ROWS
    assert table["Patient ID"].nunique() == 30_805
    assert table["Image Index"].tolist() == raw["Image Index"].tolist()
    split = raw["Finding Labels"].str.split("|")
    for cls in SEED_ORDER:
        expected = split.map(lambda names, cls=cls: cls in names).astype(int)
        assert table[cls].tolist() == expected.tolist(), cls
    assert table["Hernia"].sum() == 227
    no_finding = (raw["Finding Labels"] == "No Finding").to_numpy()
    assert no_finding.sum() == 60_361
    assert table.loc[no_finding, SEED_ORDER].to_numpy().sum() == 0
    assert (table.loc[~no_finding, SEED_ORDER].to_numpy().sum(axis=1) >= 1).all()


def rows_with(change: dict[int, tuple[str, str, object]]) -> list[tuple[str, str, object]]:
    rows: list[tuple[str, str, object]] = list(TINY_ROWS)
    for i, row in change.items():
        rows[i] = row
    return rows


@pytest.mark.parametrize(
    ("rows", "line", "fragments"),
    [
        (
            rows_with({5: ("00000003_000.png", "Pneumonitis", 3)}),
            7,
            ["unknown finding 'Pneumonitis'", "expected one of Atelectasis, Cardiomegaly"],
        ),
        (rows_with({5: ("00000003_000.png", "Mass|No Finding", 3)}), 7, ["'No Finding' combined"]),
        (rows_with({5: ("00000003_000.png", "", 3)}), 7, ["empty 'Finding Labels'"]),
        (rows_with({4: ("00000002_000.png", "Hernia", 2)}), 6, ["image 00000002_000.png appears twice"]),
        (rows_with({9: ("00000005_000.png", "Edema", "P5")}), 11, ["Patient ID 'P5' is not an integer"]),
        (rows_with({9: ("00000005_000.png", "Edema", "5.5")}), 11, ["is not an integer"]),
        (rows_with({9: ("", "Edema", 5)}), 11, ["empty 'Image Index'"]),
    ],
    ids=[
        "unknown-finding",
        "no-finding-mixed",
        "empty-findings",
        "duplicate-image",
        "patient-text",
        "patient-float",
        "empty-name",
    ],
)
def test_read_label_table_names_file_line_and_expectation(tiny_nih, rows, line, fragments):
    path = tiny_nih.write_table(rows)
    with pytest.raises(PipelineError) as err:
        read_label_table(path)
    message = str(err.value)
    assert message.startswith(f"{path} line {line}: "), message
    for fragment in fragments:
        assert fragment in message


def test_read_label_table_missing_column(tiny_nih):
    header = HEADER_2017.replace("Patient ID,", "")
    lines = [header] + [f"{n},{f},0,{50 + i}Y,M,PA,2500,2048,0.143,0.143," for i, (n, f, _) in enumerate(TINY_ROWS)]
    path = tiny_nih.root / "Data_Entry_2017.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PipelineError) as err:
        read_label_table(path)
    message = str(err.value)
    assert message.startswith(f"{path}: missing column(s) 'Patient ID'")
    assert "expected at least Image Index, Finding Labels, Patient ID" in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "label table is empty"),
        (HEADER_2017.encode() + b"\n", "label table has no rows"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x81", "cannot read label table"),
    ],
    ids=["empty-file", "header-only", "binary"],
)
def test_read_label_table_unreadable(tmp_path, content, fragment):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_bytes(content)
    with pytest.raises(PipelineError) as err:
        read_label_table(path)
    assert str(err.value).startswith(f"{path}: ")
    assert fragment in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "corrupt-deflate"])
def test_read_label_table_damaged_gzip_is_a_pipeline_error(tmp_path, damage):
    """A damaged download must stop with a one-line error naming the file, not a zlib traceback."""
    raw = bytearray(NIH_TABLE.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[5000:5064] = b"\xff" * 64  # an invalid deflate block: zlib.error, which is not an OSError
    path = tmp_path / "Data_Entry_2017_v2020.csv.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(PipelineError) as err:
        read_label_table(path)
    assert str(err.value).startswith(f"{path}: cannot read label table")


# ---------------------------------------------------------------- split lists


def test_read_image_list_skips_blank_lines_and_keeps_order(tmp_path):
    path = tmp_path / "test_list.txt"
    path.write_text("b.png\n\n  a.png  \nc.png")  # no final newline, stray spaces, a blank line
    assert read_image_list(path) == ["b.png", "a.png", "c.png"]


def test_read_image_list_real_lists():
    train_val = read_image_list(NIH / "train_val_list.txt")
    test = read_image_list(NIH / "test_list.txt")
    assert (len(train_val), len(test)) == (86_524, 25_596)
    assert train_val[0] == "00000001_000.png"
    assert not set(train_val) & set(test)


def test_read_image_list_duplicate_names_both_lines(tmp_path):
    path = tmp_path / "train_val_list.txt"
    path.write_text("a.png\nb.png\n\na.png\n")
    with pytest.raises(PipelineError) as err:
        read_image_list(path)
    assert str(err.value) == f"{path} line 4: a.png already listed on line 1"


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_read_image_list_empty(tmp_path, content):
    path = tmp_path / "test_list.txt"
    path.write_text(content)
    with pytest.raises(PipelineError) as err:
        read_image_list(path)
    assert str(err.value) == f"{path}: split list is empty; expected one image name per line"


def test_read_image_list_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="split list not found; expected NIH's test_list.txt"):
        read_image_list(tmp_path / "test_list.txt")


# ---------------------------------------------------------------- both layouts


def test_scan_images_nih_layout(tiny_nih):
    (tiny_nih.root / "images" / "notes.txt").write_text("not an image")
    found = scan_images(tiny_nih.root)
    assert found == {name: os.path.join(tiny_nih.root / "images", name) for name, _, _ in TINY_ROWS}
    assert image_dirs(tiny_nih.root) == [tiny_nih.root / "images"]


def test_scan_images_kaggle_layout(tiny_kaggle):
    root = tiny_kaggle.root
    (root / "images_001.tar.gz").write_bytes(b"archive")  # a file matching images_* is not a folder to scan
    found = scan_images(root)
    assert set(found) == {name for name, _, _ in TINY_ROWS}
    for name, path in found.items():
        assert Path(path) == tiny_kaggle.paths[name]
        assert Path(path).parent.name == "images"
        assert Path(path).parent.parent.name in {"images_001", "images_002", "images_003"}
    assert image_dirs(root) == [root / f"images_{i:03d}" / "images" for i in (1, 2, 3)]


def test_scan_images_kaggle_mirror_without_inner_folder(tmp_path):
    for i, folder in enumerate(["images_001", "images_002"]):
        (tmp_path / folder).mkdir()
        Image.fromarray(phantom(8, 8, i)).save(tmp_path / folder / f"0000000{i}_000.png")
    assert scan_images(tmp_path) == {
        "00000000_000.png": os.path.join(tmp_path / "images_001", "00000000_000.png"),
        "00000001_000.png": os.path.join(tmp_path / "images_002", "00000001_000.png"),
    }


def test_scan_images_relative_root_gives_relative_paths(tiny_nih, monkeypatch):
    monkeypatch.chdir(tiny_nih.root.parent)
    found = scan_images(Path("nih"))
    assert found["00000001_000.png"] == os.path.join("nih", "images", "00000001_000.png")
    assert all(not os.path.isabs(p) for p in found.values())


@pytest.mark.parametrize("layout", ["tiny_nih", "tiny_kaggle"])
def test_scan_images_one_scan_per_folder_and_no_per_image_lookups(request, monkeypatch, layout):
    data = request.getfixturevalue(layout)
    calls: dict[str, list] = {"scandir": [], "glob": [], "stat": 0}
    real_scandir, real_glob = os.scandir, pathlib.Path.glob
    real_is_file, real_exists = pathlib.Path.is_file, pathlib.Path.exists

    def scandir(path="."):
        calls["scandir"].append(Path(path))
        return real_scandir(path)

    def glob(self, pattern, *args, **kwargs):
        calls["glob"].append(pattern)
        return real_glob(self, pattern, *args, **kwargs)

    def counted(real):
        def method(self, *args, **kwargs):
            calls["stat"] += 1
            return real(self, *args, **kwargs)

        return method

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(pathlib.Path, "glob", glob)
    monkeypatch.setattr(pathlib.Path, "is_file", counted(real_is_file))
    monkeypatch.setattr(pathlib.Path, "exists", counted(real_exists))
    found = scan_images(data.root)
    assert len(found) == len(TINY_ROWS)
    folders = sorted({Path(p).parent for p in data.paths.values()})
    image_scans = sorted(p for p in calls["scandir"] if p != data.root)  # Path.glob itself scans the root
    assert image_scans == folders  # each image folder exactly once
    assert set(calls["glob"]) <= {"images_*"}  # only folder discovery, never a glob per image
    assert len(calls["glob"]) <= 2
    assert calls["stat"] < len(TINY_ROWS)  # no existence check per image


# ---------------------------------------------------------------- decoding


def save_gray(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array, mode="L").save(path)
    return path


def test_load_gray_8bit_is_lossless_without_resize(tiny_nih):
    name = "00000001_000.png"
    out = load_gray(tiny_nih.paths[name])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, phantom(64, 64, seed=0))


@pytest.mark.parametrize("name", RGBA_FILES)
def test_load_gray_real_rgba_equals_its_grayscale_conversion(tmp_path, name):
    path = NIH / "images" / name
    with Image.open(path) as image:
        assert image.mode == "RGBA"
        assert np.asarray(image)[..., 3].min() == 255  # opaque: the alpha carries no information
        gray = image.convert("L")
    gray.save(tmp_path / name)
    with Image.open(tmp_path / name) as check:
        assert check.mode == "L"
    out = load_gray(path, 224)
    assert out.shape == (224, 224)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, load_gray(tmp_path / name, 224))
    np.testing.assert_array_equal(load_gray(path), np.asarray(gray))
    assert out.std() > 10  # a radiograph, not a flat alpha plane


def test_load_gray_tiny_rgba(tiny_nih):
    with Image.open(tiny_nih.paths[TINY_RGBA]) as image:
        assert image.mode == "RGBA"
    index = [r[0] for r in TINY_ROWS].index(TINY_RGBA)
    np.testing.assert_array_equal(load_gray(tiny_nih.paths[TINY_RGBA]), phantom(64, 64, seed=index))


def test_load_gray_16bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 257], [1000, 32896, 40000, 65535]], dtype=np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
    out = load_gray(path)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 1, 1], [4, 128, 156, 255]]


def test_load_gray_tiny_16bit(tiny_nih):
    index = [r[0] for r in TINY_ROWS].index(TINY_I16)
    out = load_gray(tiny_nih.paths[TINY_I16])
    expected = phantom(64, 64, seed=index)
    expected[0, :4] = (255, 128, 4, 1)
    np.testing.assert_array_equal(out, expected)


def test_to_gray8_wide_modes():
    image = Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(to_gray8(image)).tolist() == [[0, 1, 128, 255]]
    with pytest.raises(ValueError, match="above 16 bits"):
        to_gray8(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))
    with pytest.raises(ValueError, match="unsupported pixel mode F"):
        to_gray8(Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)))


@pytest.mark.parametrize("size", [8, 64, 224])
def test_load_gray_resizes_to_square(tiny_nih, size):
    out = load_gray(tiny_nih.paths[TINY_WIDE], size)
    assert out.shape == (size, size)
    assert out.dtype == np.uint8


def test_load_gray_resize_keeps_flat_images_flat_and_real_size(tmp_path):
    path = save_gray(np.full((300, 200), 77, dtype=np.uint8), tmp_path / "flat.png")
    assert load_gray(path, 50).tolist() == np.full((50, 50), 77).tolist()
    real = NIH / "images" / "00000003_000.png"
    assert load_gray(real).shape == (1024, 1024)
    small = load_gray(real, 64)
    assert small.shape == (64, 64)
    # antialiased: each output pixel is close to the mean of its 16x16 block
    blocks = load_gray(real).reshape(64, 16, 64, 16).mean(axis=(1, 3))
    assert np.abs(small.astype(float) - blocks).mean() < 3


def test_load_gray_same_size_is_untouched(tiny_nih):
    np.testing.assert_array_equal(load_gray(tiny_nih.paths["00000001_000.png"], 64), phantom(64, 64, seed=0))


def bad_image(kind: str, path: Path) -> Path:
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        real = (NIH / "images" / "00000003_000.png").read_bytes()
        path.write_bytes(real[: len(real) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "directory", "missing"])
def test_load_gray_bad_file_is_a_value_error(tmp_path, kind):
    path = bad_image(kind, tmp_path / "00000001_000.png")
    with pytest.raises(ValueError, match=r"^cannot decode image \(.*\); expected a readable PNG or JPEG$"):
        load_gray(path, 64)

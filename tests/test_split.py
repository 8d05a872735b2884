"""cxr14.data.splits and stages.split: patient-disjoint stratified split on the real 112,120-row table, the CLI, and
bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    NIH,
    NIH_IMAGES,
    NIH_ROWS,
    NIH_TABLE,
    NIH_TEST,
    NIH_TRAIN_VAL,
    REPO,
    TINY_ROWS,
    files_under,
    project_params,
    run_module,
    write_params,
)

from cxr14 import paths
from cxr14.data.nih import CLASSES, META_COLUMNS
from cxr14.data.splits import build_splits, stratified_patient_split
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.signals import run_main
from stages import split

SPLITS = ("train", "val", "test")
SPLIT_FILES = [f"{n}.csv" for n in SPLITS]
KAGGLE_FOLDERS = 12


# ---------------------------------------------------------------- the real table, both layouts


def placeholder_tree(root: Path, layout: str) -> Path:
    """The real label table and lists, plus an empty file for each of the 112,120 images."""
    root.mkdir(parents=True)
    for name in (NIH_TABLE.name, "train_val_list.txt", "test_list.txt"):
        shutil.copyfile(NIH / name, root / name)
    names = pd.read_csv(NIH_TABLE, usecols=["Image Index"])["Image Index"].tolist()
    per_folder = -(-len(names) // KAGGLE_FOLDERS)
    groups = [names] if layout == "nih" else [names[i : i + per_folder] for i in range(0, len(names), per_folder)]
    for i, group in enumerate(groups, start=1):
        folder = root / "images" if layout == "nih" else root / f"images_{i:03d}" / "images"
        folder.mkdir(parents=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            for name in group:
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        finally:
            os.close(fd)
    return root


def scratch_dirs(tmp_path_factory) -> list[Path]:
    """Where to put 224k empty files: RAM-backed /dev/shm first (1-2 s; the disk-backed /tmp of a busy VM
    has taken 40 s and more for the same files), pytest's tmp folder if there is no usable tmpfs."""
    shm = Path("/dev/shm")
    candidates = [Path(tempfile.mkdtemp(prefix="nih-split-test-", dir=shm))] if os.access(shm, os.W_OK) else []
    return [*candidates, tmp_path_factory.mktemp("real")]


@pytest.fixture(scope="module")
def real_trees(tmp_path_factory):
    """Both layouts of the full dataset (empty image files), built once for this module."""
    bases = scratch_dirs(tmp_path_factory)
    try:
        for base in bases:
            try:
                trees = {layout: placeholder_tree(base / layout, layout) for layout in ("nih", "kaggle")}
                break
            except OSError:  # a small tmpfs ran out of inodes: fall back to the next place
                shutil.rmtree(base, ignore_errors=True)
        yield trees
    finally:
        for base in bases:  # 224k files: do not leave them behind
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def real_splits(real_trees):
    """build_splits(root, 0.1, 42, 'error') on each layout, computed once."""
    return {layout: build_splits(root, 0.1, 42, "error") for layout, root in real_trees.items()}


@pytest.fixture(scope="module")
def real_reference():
    raw = pd.read_csv(NIH_TABLE).set_index("Image Index")
    labels = raw["Finding Labels"].str.get_dummies("|")
    assert set(labels.columns) == {*CLASSES, "No Finding"}
    return {
        "raw": raw,
        "labels": labels[list(CLASSES)],
        "train_val": (NIH / "train_val_list.txt").read_text().split(),
        "test": (NIH / "test_list.txt").read_text().split(),
    }


@pytest.mark.parametrize("layout", ["nih", "kaggle"])
def test_real_split_sizes_and_membership(real_splits, real_reference, layout):
    splits, metrics = real_splits[layout]
    assert len(splits["test"]) == NIH_TEST
    assert len(splits["train"]) + len(splits["val"]) == NIH_TRAIN_VAL
    assert splits["test"]["Image Index"].tolist() == real_reference["test"]  # official list, in its order
    assert set(splits["train"]["Image Index"]) | set(splits["val"]["Image Index"]) == set(real_reference["train_val"])
    assert metrics["missing_images"] == 0
    for name, frame in splits.items():
        assert list(frame.columns) == ["Image Index", "Patient ID", *META_COLUMNS, "path", *CLASSES]
        assert metrics[name]["images"] == len(frame)
        assert metrics[name]["patients"] == frame["Patient ID"].nunique()
        assert metrics[name]["positives"] == {c: int(frame[c].sum()) for c in CLASSES}
    assert sum(metrics[n]["patients"] for n in SPLITS) == 30_805


@pytest.mark.parametrize("layout", ["nih", "kaggle"])
def test_real_split_is_patient_disjoint(real_splits, layout):
    splits, _ = real_splits[layout]
    patients = {name: set(frame["Patient ID"]) for name, frame in splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert len(patients["val"]) > 2000


@pytest.mark.parametrize("layout", ["nih", "kaggle"])
def test_real_split_is_stratified(real_splits, layout):
    splits, metrics = real_splits[layout]
    train, val = splits["train"], splits["val"]
    assert len(val) / NIH_TRAIN_VAL == pytest.approx(0.1, abs=0.005)
    for cls in CLASSES:
        pos_val, pos_train = int(val[cls].sum()), int(train[cls].sum())
        assert pos_val > 0, cls
        assert metrics["val"]["positives"][cls] == pos_val
        assert 0.08 <= pos_val / (pos_val + pos_train) <= 0.12, (cls, pos_val, pos_train)
    no_finding = (val[list(CLASSES)].sum(axis=1) == 0).mean()
    no_finding_train = (train[list(CLASSES)].sum(axis=1) == 0).mean()
    assert no_finding == pytest.approx(no_finding_train, abs=0.03)


@pytest.mark.parametrize("layout", ["nih", "kaggle"])
def test_real_split_labels_and_paths(real_splits, real_reference, real_trees, layout):
    splits, _ = real_splits[layout]
    raw = real_reference["raw"]
    root = real_trees[layout]
    for frame in splits.values():
        assert frame["Patient ID"].tolist() == raw.loc[frame["Image Index"], "Patient ID"].tolist()
        expected = real_reference["labels"].loc[frame["Image Index"]].to_numpy()
        np.testing.assert_array_equal(frame[list(CLASSES)].to_numpy(), expected)
        paths = frame["path"].tolist()
        assert [os.path.basename(p) for p in paths] == frame["Image Index"].tolist()
        assert all(map(os.path.isfile, paths))
        folders = {os.path.dirname(p) for p in paths}
        if layout == "nih":
            assert folders == {str(root / "images")}
        else:
            assert folders == {str(root / f"images_{i:03d}" / "images") for i in range(1, KAGGLE_FOLDERS + 1)}


def test_real_split_same_seed_same_split_in_either_layout(real_trees, real_splits):
    again, again_metrics = build_splits(real_trees["nih"], 0.1, 42, "error")
    first, first_metrics = real_splits["nih"]
    for name in first:
        pd.testing.assert_frame_equal(again[name], first[name])
    assert again_metrics == first_metrics
    # The layout changes paths, never the split itself.
    kaggle, _ = real_splits["kaggle"]
    for name in first:
        cols = ["Image Index", "Patient ID", *CLASSES]
        pd.testing.assert_frame_equal(kaggle[name][cols], first[name][cols])


def test_real_split_other_seed_other_split(real_trees, real_splits):
    other, metrics = build_splits(real_trees["nih"], 0.1, 7, "error")
    first, _ = real_splits["nih"]
    val_42, val_7 = set(first["val"]["Patient ID"]), set(other["val"]["Patient ID"])
    assert val_42 != val_7
    assert len(val_42 & val_7) < 0.5 * len(val_42)  # not a near copy either
    pd.testing.assert_frame_equal(other["test"], first["test"])
    assert not set(other["train"]["Patient ID"]) & val_7
    assert len(other["val"]) / NIH_TRAIN_VAL == pytest.approx(0.1, abs=0.005)
    assert all(metrics["val"]["positives"][c] > 0 for c in CLASSES)


def test_stratified_patient_split_keeps_patients_whole_and_follows_fraction():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(400), rng.integers(1, 6, 400))
    labels = (rng.random((len(patients), len(CLASSES))) < np.linspace(0.01, 0.3, len(CLASSES))).astype(np.uint8)
    table = pd.DataFrame(labels, columns=list(CLASSES)).assign(**{"Patient ID": patients})
    for fraction in (0.1, 0.25, 0.5):
        in_val = stratified_patient_split(table, fraction, seed=3)
        assert in_val.dtype == bool and in_val.shape == (len(table),)
        per_patient = pd.Series(in_val).groupby(patients).nunique()
        assert (per_patient == 1).all()  # a patient is never cut in two
        assert in_val.mean() == pytest.approx(fraction, abs=0.03)
        assert (labels[in_val].sum(axis=0) > 0).all()


# ---------------------------------------------------------------- the CLI on ../shared/nih (308 images)


def test_split_cli_on_the_nih_sample_skips_missing(nih_sample_split):
    result = nih_sample_split["result"]
    assert result.returncode == 0, result.stderr
    assert f"skipped {NIH_ROWS - NIH_IMAGES} missing" in result.stdout
    out = nih_sample_split["out"]
    assert files_under(out) == sorted(SPLIT_FILES)
    tables = {name.removesuffix(".csv"): pd.read_csv(out / name) for name in SPLIT_FILES}
    # --metrics given outside the project: the report goes beside it, never over the project's reports/split.json
    metrics = json.loads(nih_sample_split["metrics"].with_suffix(".report.json").read_text())
    assert json.loads(nih_sample_split["metrics"].read_text()) == {f"{n}_images": metrics[n]["images"] for n in SPLITS}
    assert metrics["missing_images"] == NIH_ROWS - NIH_IMAGES
    assert len(tables["train"]) + len(tables["val"]) == 257
    assert len(tables["test"]) == 51
    everything = pd.concat(tables.values())
    assert sorted(everything["Image Index"]) == sorted(os.listdir(NIH / "images"))
    for name, frame in tables.items():
        assert metrics[name]["images"] == len(frame)
        assert metrics[name]["patients"] == frame["Patient ID"].nunique()
        assert metrics[name]["positives"] == {c: int(frame[c].sum()) for c in CLASSES}
    assert not set(tables["train"]["Patient ID"]) & set(tables["val"]["Patient ID"])
    train_val_patients = set(tables["train"]["Patient ID"]) | set(tables["val"]["Patient ID"])
    assert not set(tables["test"]["Patient ID"]) & train_val_patients
    # paths are relative to the repo root, exactly as the root was given
    assert everything["path"].str.startswith(os.path.join("..", "shared", "nih", "images") + os.sep).all()
    assert all((REPO / p).is_file() for p in everything["path"])
    assert len(tables["val"]) > 0


def test_split_missing_error_on_the_nih_sample_names_count_and_first(tmp_path):
    with pytest.raises(PipelineError) as err:
        build_splits(NIH, 0.1, 42, "error")
    message = str(err.value)
    on_disk = set(os.listdir(NIH / "images"))
    listed = (NIH / "train_val_list.txt").read_text().split() + (NIH / "test_list.txt").read_text().split()
    first = [n for n in listed if n not in on_disk][:3]
    assert f"{NIH_ROWS - NIH_IMAGES} of {NIH_ROWS} listed images are missing" in message
    assert f"(first: {', '.join(first)})" in message
    assert "data.missing: skip" in message


def test_split_cli_missing_error_is_one_line_and_writes_nothing(tmp_path):
    params = write_params(tmp_path / "params.yaml", NIH, missing="error")
    out, metrics = tmp_path / "split", tmp_path / "metrics" / "split.json"
    result = run_module("split", "--params", params, "--out", out, "--metrics", metrics)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert f"{NIH_ROWS - NIH_IMAGES} of {NIH_ROWS} listed images are missing" in lines[0]
    assert "Traceback" not in result.stderr
    assert files_under(out) == [] and files_under(metrics.parent) == []


# ---------------------------------------------------------------- the tiny dataset: good and bad inputs


def run_split(tmp_path: Path, root: Path, *, missing: str = "error") -> tuple[Path, Path, list[str]]:
    params = write_params(tmp_path / "params.yaml", root, missing=missing)
    out, metrics = tmp_path / "out" / "split", tmp_path / "out" / "metrics.json"
    return params, out, ["--params", str(params), "--out", str(out), "--metrics", str(metrics)]


@pytest.mark.parametrize("layout", ["tiny_nih", "tiny_kaggle"])
def test_split_main_on_tiny_dataset(request, tmp_path, layout, capsys):
    data = request.getfixturevalue(layout)
    _, out, argv = run_split(tmp_path, data.root)
    split.main(argv)
    assert "split: train" in capsys.readouterr().out
    assert files_under(tmp_path / "out") == sorted(["metrics.json", "metrics.report.json", "split",
                                                    *(f"split/{f}" for f in SPLIT_FILES)])
    tables = {n: pd.read_csv(out / f"{n}.csv") for n in ("train", "val", "test")}
    assert tables["test"]["Image Index"].tolist() == data.test
    assert sorted(pd.concat([tables["train"], tables["val"]])["Image Index"]) == sorted(data.train_val)
    expected = {name: findings for name, findings, _ in TINY_ROWS}
    for frame in tables.values():
        for _, row in frame.iterrows():
            names = expected[row["Image Index"]].split("|")
            assert [row[c] for c in CLASSES] == [int(c in names) for c in CLASSES]
            assert Path(row["path"]) == data.paths[row["Image Index"]]
    assert not set(tables["train"]["Patient ID"]) & set(tables["val"]["Patient ID"])
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {
        "train_images": len(tables["train"]), "val_images": len(tables["val"]), "test_images": 4}
    metrics = json.loads((tmp_path / "out" / "metrics.report.json").read_text())
    assert metrics["missing_images"] == 0
    assert metrics["test"] == {
        "images": 4,
        "patients": 2,
        "positives": {c: int(c in {"Effusion", "Infiltration", "Nodule", "Mass"}) for c in CLASSES},
    }


def test_split_skip_counts_missing_images(tiny_nih, tmp_path):
    for name in ("00000001_001.png", "00000008_000.png"):
        tiny_nih.paths[name].unlink()
    splits, metrics = build_splits(tiny_nih.root, 0.1, 42, "skip")
    assert metrics["missing_images"] == 2
    assert len(splits["test"]) == 3 and len(splits["train"]) + len(splits["val"]) == 12
    with pytest.raises(PipelineError, match=r"2 of 17 listed images are missing \(first: 00000001_001.png, 0000000"):
        build_splits(tiny_nih.root, 0.1, 42, "error")


def both_lists(data):
    data.write_list("train_val_list.txt", [*data.train_val, "00000007_000.png"])
    return data.root / "test_list.txt", [
        "line 1: 00000007_000.png is also in train_val_list.txt (1 image(s) in both)",
        "expected disjoint official lists",
    ]


def patient_in_both(data):
    data.write_list("train_val_list.txt", [*data.train_val, "00000007_001.png"])
    data.write_list("test_list.txt", [n for n in data.test if n != "00000007_001.png"])
    return data.root / "test_list.txt", [
        "test_list.txt line 1: patient 7 (00000007_000.png) is also in train_val_list.txt (1 such patient(s))",
        "expected patient-disjoint lists",
    ]


def empty_list(data):
    data.write_list("test_list.txt", [])
    return data.root / "test_list.txt", ["split list is empty; expected one image name per line"]


def unknown_image(data):
    data.write_list("train_val_list.txt", [*data.train_val[:3], "00009999_000.png", *data.train_val[3:]])
    return data.root / "train_val_list.txt", [
        "line 4: 00009999_000.png is not in the label table (1 such image(s))"
    ]


def duplicate_row(data):
    data.write_table([*TINY_ROWS[:5], TINY_ROWS[2], *TINY_ROWS[5:]])
    return data.table, ["line 7: image 00000001_002.png appears twice; expected one row per image"]


def unknown_finding(data):
    rows = list(TINY_ROWS)
    rows[9] = ("00000005_000.png", "Pneumonitis|Edema", 5)
    data.write_table(rows)
    return data.table, ["line 11: unknown finding 'Pneumonitis' in 'Pneumonitis|Edema'", "expected one of Atelectasis"]


def missing_column(data):
    text = data.table.read_text().replace("Finding Labels,", "Findings,", 1)
    data.table.write_text(text)
    return data.table, ["missing column(s) 'Finding Labels'", "expected at least Image Index, Finding Labels"]


def no_table(data):
    data.table.unlink()
    return data.root, ["no label table; expected one of Data_Entry_2017.csv"]


def no_list(data):
    (data.root / "train_val_list.txt").unlink()
    return data.root / "train_val_list.txt", ["split list not found"]


def duplicate_in_list(data):
    data.write_list("test_list.txt", [*data.test, data.test[1]])
    return data.root / "test_list.txt", [f"line 5: {data.test[1]} already listed on line 2"]


def no_test_images(data):
    for name in data.test:
        data.paths[name].unlink()
    return data.root, ["no images found for test"]


BAD_INPUTS = [
    both_lists,
    patient_in_both,
    empty_list,
    unknown_image,
    duplicate_row,
    unknown_finding,
    missing_column,
    no_table,
    no_list,
    duplicate_in_list,
    no_test_images,
]


@pytest.mark.parametrize("breaker", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_split_bad_input_is_one_line_naming_the_file_and_writes_nothing(tiny_nih, tmp_path, capsys, breaker):
    where, fragments = breaker(tiny_nih)
    _, out, argv = run_split(tmp_path, tiny_nih.root, missing="skip")
    out.mkdir(parents=True)
    (out / "train.csv").write_text("sentinel from an earlier run\n")
    before = files_under(tmp_path / "out")
    with pytest.raises(PipelineError) as err:
        split.main(argv)
    assert str(err.value).startswith(f"{where}"), str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        run_main(split.main, argv)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0] == f"error: {err.value}"
    for fragment in fragments:
        assert fragment in lines[0]
    assert files_under(tmp_path / "out") == before
    assert (out / "train.csv").read_text() == "sentinel from an earlier run\n"


def test_split_cli_bad_input_has_no_traceback(tiny_nih, tmp_path):
    where, _ = unknown_finding(tiny_nih)
    params, out, argv = run_split(tmp_path, tiny_nih.root)
    result = run_module("split", *argv)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {where} line 11: unknown finding 'Pneumonitis'")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert files_under(tmp_path / "out") == []


BAD_PARAMS = [
    ({"split": {"val_fraction": 0.0}}, "split.val_fraction: 0.0; expected a number in (0.0, 1.0)"),
    ({"split": {"val_fraction": 1.0}}, "split.val_fraction: 1.0; expected a number in (0.0, 1.0)"),
    ({"split": {"val_fraction": 1.5}}, "split.val_fraction: 1.5; expected a number in (0.0, 1.0)"),
    ({"split": {"val_fraction": "0.1"}}, "split.val_fraction: '0.1'; expected a number in (0.0, 1.0)"),
    ({"split": {"seed": -1}}, "split.seed: -1; expected an integer in [0, 4294967295]"),
    ({"split": {"val_fractoin": 0.1}}, "split.val_fractoin: unknown key; did you mean val_fraction?"),
    ({"data": {"missing": "ignore"}}, "data.missing: 'ignore'; expected one of error, skip"),
    ({"data": {"missing": "maybe"}}, "data.missing: 'maybe'; expected one of error, skip"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_PARAMS, ids=[m.split(";")[0] for _, m in BAD_PARAMS])
def test_split_bad_params(tiny_nih, tmp_path, bad, message):
    """The schema refuses them in one line naming the params file given with --params; nothing is written."""
    data = {"root": str(tiny_nih.root), "missing": "error", **bad.get("data", {})}
    params = project_params(tmp_path / "other-params.yaml", {**bad, "data": data})
    out, metrics = tmp_path / "out" / "split", tmp_path / "out" / "metrics.json"
    with pytest.raises(PipelineError) as err:
        split.main(["--params", str(params), "--out", str(out), "--metrics", str(metrics)])
    assert str(err.value) == f"{params} {message}"
    assert files_under(tmp_path / "out") == []


def test_split_outputs_replace_old_ones_together(tiny_nih, tmp_path):
    _, out, argv = run_split(tmp_path, tiny_nih.root)
    out.mkdir(parents=True)
    for name in SPLIT_FILES:
        (out / name).write_text("old\n")
    split.main(argv)
    for name in SPLIT_FILES:
        assert (out / name).read_text().startswith(
            "Image Index,Patient ID,Patient Age,Patient Gender,View Position,path,Atelectasis,")
    assert not [p for p in files_under(tmp_path / "out") if p.endswith(".tmp")]
    assert oct((out / "train.csv").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_split_report_goes_to_reports_or_beside_metrics_given_elsewhere() -> None:
    """The project's metrics/split.json has its report in reports/; a --metrics elsewhere (a test's, a user's)
    keeps its report beside it, so such a run never replaces the project's reports/split.json."""
    assert paths.report_for(split.METRICS, None) == Path("reports/split.json")
    assert paths.report_for(Path("/tmp/x/sizes.json"), None) == Path("/tmp/x/sizes.report.json")
    assert paths.report_for(Path("/tmp/x/sizes.json"), Path("r.json")) == Path("r.json")

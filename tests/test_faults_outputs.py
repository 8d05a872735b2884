"""The deployment side of the fault catalogue, output paths: an output option that names something a rename would
destroy (an input image, a device, a FIFO, a folder, what a link points to in DVC's cache) is refused in one line
naming the path and why, before any work, and leaves everything as it was; so is a place no file can be made.
`cxr14-compare` outside a git repository says so and what it needs."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import REPO, besides_ood, own, stage_result

from cxr14 import cli
from cxr14.data.nih import CLASSES
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import replace_dir, write_json

TABLE = " for the table"


@pytest.fixture
def image(deployed: Path, tmp_path: Path) -> Path:
    """A copy of one of the fixture's images (its own files are shared by the session and never changed)."""
    copy = tmp_path / "x.png"
    shutil.copy(deployed / "images" / "nested" / "img0.png", copy)
    return copy


def predict_csv(deployed: Path, image: Path, out: Path | str, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    return stage_result(cli.predict, [image, *own(deployed), "--csv", out], capsys)


def test_csv_naming_the_input_image_is_refused_and_the_image_kept(deployed: Path, image: Path, capsys) -> None:
    before = image.read_bytes()
    code, err = predict_csv(deployed, image, image, capsys)
    assert code == 1
    assert err == [f"error: --csv {image}: is the input {image}; writing the output there would destroy it, so name "
                   "another file"]
    assert image.read_bytes() == before and sorted(p.name for p in image.parent.iterdir()) == ["x.png"]


def test_csv_naming_the_model_is_refused(deployed: Path, image: Path, tmp_path: Path, capsys) -> None:
    """The model, thresholds and calibrator are inputs too (here a copy of the model)."""
    model = tmp_path / "model.onnx"
    shutil.copy(deployed / "model.onnx", model)
    before = model.read_bytes()
    code, err = stage_result(cli.predict, [image, "--model", model, "--csv", model], capsys)
    assert code == 1 and err == [f"error: --csv {model}: is the input {model}; writing the output there would "
                                 "destroy it, so name another file"]
    assert model.read_bytes() == before


def character_device(tmp_path: Path) -> Path:
    """A character device like /dev/null (same numbers) in `tmp_path` where this user may make one (root), so that
    a regression replaces a scratch node and not the machine's /dev/null; else /dev/null itself, which a user
    other than root cannot replace anyway."""
    node = tmp_path / "null"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:
        return Path("/dev/null")
    return node


def test_csv_to_a_character_device_is_refused_and_the_device_kept(deployed: Path, image: Path, tmp_path: Path,
                                                                  capsys) -> None:
    device = character_device(tmp_path)
    rdev = os.stat(device).st_rdev
    code, err = predict_csv(deployed, image, device, capsys)
    assert code == 1
    assert err == [f"error: --csv {device}: is a character device; expected a file name{TABLE} (a device, FIFO or "
                   "socket is never replaced)"]
    assert stat.S_ISCHR(os.stat(device).st_mode) and os.stat(device).st_rdev == rdev


@pytest.mark.parametrize(("option", "expected"), [("--csv", "a file name for the table"),
                                                 ("--gradcam", "a folder for the heatmaps")])
def test_an_output_that_is_a_fifo_is_refused_without_opening_it(deployed: Path, image: Path, tmp_path: Path,
                                                                 capsys, option: str, expected: str) -> None:
    """A FIFO is never opened (that would block until a reader came): the check looks at it with stat."""
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    engine = own(deployed, onnx=option == "--csv")  # heatmaps: the torch engine
    code, err = stage_result(cli.predict, [image, *engine, option, fifo], capsys)
    assert code == 1
    assert err == [f"error: {option} {fifo}: is a FIFO (named pipe); expected {expected} (a device, FIFO or "
                   "socket is never replaced)"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.png"]


def test_csv_naming_a_folder_is_refused(deployed: Path, image: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "kept.txt").write_text("mine")
    code, err = predict_csv(deployed, image, folder, capsys)
    assert code == 1 and err == [f"error: --csv {folder}: is a folder; expected a file name{TABLE}"]
    assert [p.name for p in folder.iterdir()] == ["kept.txt"] and (folder / "kept.txt").read_text() == "mine"


def test_csv_below_a_file_names_the_file(deployed: Path, image: Path, capsys) -> None:
    before = image.read_bytes()
    out = image / "out.csv"
    code, err = predict_csv(deployed, image, out, capsys)
    assert code == 1 and err == [f"error: --csv {out}: {image} is a file, not a folder"]
    assert image.read_bytes() == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_csv_under_proc_says_no_file_can_be_made_there(deployed: Path, image: Path, capsys) -> None:
    out = Path("/proc/cxr14-predict.csv")
    code, err = predict_csv(deployed, image, out, capsys)
    assert code == 1 and len(err) == 1
    assert err[0] in (f"error: --csv {out}: cannot write here (read-only or virtual file system)",
                      f"error: --csv {out}: cannot write here (permission denied)")  # as a user other than root
    assert not out.exists()


def test_csv_through_a_link_replaces_the_file_it_points_to_and_keeps_the_link(deployed: Path, image: Path,
                                                                              tmp_path: Path, capsys) -> None:
    real = tmp_path / "tables" / "latest.csv"
    real.parent.mkdir()
    real.write_text("the previous table\n")
    link = tmp_path / "out.csv"
    link.symlink_to(real)
    code, err = predict_csv(deployed, image, link, capsys)
    err = besides_ood(err)
    assert code == 0 and len(err) == 1 and err[0].endswith(f"to {link}; 0 failed")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text().startswith("image,class,probability")
    assert sorted(p.name for p in real.parent.iterdir()) == ["latest.csv"]  # no temporary left beside it


@pytest.mark.parametrize("mode", [0o644, 0o444], ids=["writable", "read-only"])
def test_csv_through_a_link_to_the_input_is_refused(deployed: Path, image: Path, tmp_path: Path, capsys,
                                                    mode: int) -> None:
    """A read-only input (a copy from a read-only share) is named as the input, the reason that matters."""
    link = tmp_path / "out.csv"
    link.symlink_to(image)
    image.chmod(mode)
    before = image.read_bytes()
    code, err = predict_csv(deployed, image, link, capsys)
    assert code == 1
    assert err == [f"error: --csv {link} (a link to {image}): is the input {image}; writing the output there would "
                   "destroy it, so name another file"]
    assert image.read_bytes() == before and link.is_symlink() and os.readlink(link) == str(image)


def test_csv_through_a_link_to_a_read_only_file_is_refused(deployed: Path, image: Path, tmp_path: Path,
                                                           capsys) -> None:
    """DVC's cache files are read-only; with cache.type symlink an output is a link to one, and writing through
    it would change the cached copy under its hash (root's writes ignore the mode: the check reads it)."""
    cached = tmp_path / "cache" / "ab" / "cdef"
    cached.parent.mkdir(parents=True)
    cached.write_text("cached\n")
    cached.chmod(0o444)
    link = tmp_path / "out.csv"
    link.symlink_to(cached)
    code, err = predict_csv(deployed, image, link, capsys)
    assert code == 1
    assert err == [f"error: --csv {link} (a link to {cached}): what it points to is read-only (a DVC cache file?); "
                   "writing through the link would change it: remove the link or name another file"]
    assert cached.read_text() == "cached\n" and link.is_symlink()


def test_gradcam_heatmaps_that_would_replace_an_input_are_refused(deployed: Path, image: Path, capsys) -> None:
    """Predicting a folder into itself twice: the first run's heatmaps (x_<Class>.png) are inputs of the second,
    which would draw x.png's heatmaps over them (one per class here, so whichever classes it draws)."""
    folder = image.parent
    for name in CLASSES:
        shutil.copy(image, folder / f"x_{name}.png")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, err = stage_result(cli.predict, [folder, *own(deployed, onnx=False), "--gradcam", folder], capsys)
    assert code == 1
    first = f"x_{min(CLASSES)}.png"
    assert err == [f"error: --gradcam {folder}: its heatmap {first} would replace the input {folder / first}; write "
                   "the heatmaps to another folder"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_stage_outputs_get_the_same_checks(tmp_path: Path) -> None:
    """The stages write through write_json/write_csv (atomic_path) and replace_dir: the same refusals apply."""
    fifo, taken = tmp_path / "m.json", tmp_path / "plots"
    os.mkfifo(fifo)
    taken.write_text("a file, not plots")
    with pytest.raises(PipelineError, match=r"m\.json: is a FIFO \(named pipe\); expected a file name "):
        write_json(fifo, {"a": 1})
    with pytest.raises(PipelineError, match=r"plots: is a file; expected a folder$"), replace_dir(taken):
        pass
    with pytest.raises(PipelineError, match=r"plots/x.json: .*plots is a file, not a folder$"):
        write_json(taken / "x.json", {"a": 1})
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and taken.read_text() == "a file, not plots"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "plots"]


def test_compare_outside_a_git_repository_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # even where the temp folder is in a repo
    code, err = stage_result(cli.compare, ["--params", REPO / "params.yaml"], capsys)
    assert code == 1
    assert err == [f"error: {Path.cwd()}: not inside a git repository; cxr14-compare reads the runs it compares "
                   "(HEAD here) at git revisions through DVC: run it in the project's git clone, or name that with "
                   "--repo"]
    assert list(tmp_path.iterdir()) == []

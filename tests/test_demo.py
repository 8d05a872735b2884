"""The demo dataset (cxr14.data.demo) and its stage: NIH layout that the real readers accept, determinism, label model,
boxes, params."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cxr14.data import demo, phantom
from cxr14.data.nih import CLASSES, parse_findings, read_image_list, read_label_table, scan_images
from cxr14.evaluation.expert import read_expert_labels
from cxr14.params import Demo, build
from cxr14.runtime.errors import PipelineError
from stages import demo as demo_stage

SMALL = {"patients": 25, "images": 60, "image_size": 64, "label_noise": 0.05, "class_floor": 0.03,
         "test_fraction": 0.2, "seed": 0}
DEMO_KEYS = "patients, images, image_size, label_noise, class_floor, test_fraction, seed"


def config(**change: object) -> Demo:
    """SMALL with `change`, checked by the params schema as the stage does."""
    return build(Demo, {**SMALL, **change}, "test")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def labels(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    matrix = np.stack([parse_findings(t, str(path)) for t in table["Finding Labels"]])
    return pd.DataFrame(matrix, index=table["Image Index"], columns=list(CLASSES))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, demo.generate(config(), out, workers=2)


def test_same_params_give_identical_files_whatever_the_worker_count(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    demo.generate(config(), again, workers=1)
    first, second = digest(out), digest(again)
    assert len(first) == 6 + SMALL["images"]
    assert first == second
    other = tmp_path / "other"
    demo.generate(config(seed=1), other, workers=1)
    assert digest(other)["Data_Entry_2017.csv"] != first["Data_Entry_2017.csv"]


def test_layout_is_nih_and_the_project_readers_accept_it(small):
    out, _ = small
    lines = (out / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    assert all(line.endswith(",") and line.count(",") == 11 for line in lines)
    table = read_label_table(out / "Data_Entry_2017.csv")
    raw = pd.read_csv(out / "Data_Entry_2017.csv")
    assert len(table) == SMALL["images"] and table["Patient ID"].nunique() == SMALL["patients"]
    assert sorted(table["Patient ID"].unique()) == list(range(1, SMALL["patients"] + 1))
    assert list(table["Image Index"]) == sorted(table["Image Index"])
    for name, pid, followup in zip(raw["Image Index"], raw["Patient ID"], raw["Follow-up #"], strict=True):
        assert name == f"{pid:08d}_{followup:03d}.png"
    assert (raw.groupby("Patient ID")["Follow-up #"].min() == 0).all()
    assert set(raw["Patient Gender"]) <= {"M", "F"} and set(raw["View Position"]) <= {"PA", "AP"}
    assert raw["Patient Age"].between(0, 95).all()
    assert (raw["OriginalImage[Width"] == 64).all() and (raw["Height]"] == 64).all()
    assert raw["OriginalImagePixelSpacing[x"].iloc[0] == pytest.approx(0.143 * 1024 / 64)
    assert (out / "BBox_List_2017.csv").read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    found = scan_images(out)
    assert sorted(found) == list(table["Image Index"])
    for path in list(found.values())[:10]:
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (64, 64)


def test_expert_labels_are_googles_format_from_the_clean_labels(small):
    out, _ = small
    google = pd.read_csv(Path(__file__).parents[1] / "../shared/nih/google2019_nih-chest-xray-labels.csv", nrows=1)
    written = pd.read_csv(out / "google2019_nih-chest-xray-labels.csv", dtype=str)
    assert list(written.columns) == list(google.columns)
    experts = read_expert_labels(out / "google2019_nih-chest-xray-labels.csv")
    clean = labels(out / "clean_labels.csv").loc[experts.index]
    assert (experts["Pneumothorax"] == clean["Pneumothorax"]).all()
    assert (experts["Nodule or mass"] == clean[["Nodule", "Mass"]].max(axis=1)).all()
    airspace = clean[["Infiltration", "Consolidation", "Pneumonia", "Edema"]].max(axis=1)
    assert (experts["Airspace opacity"] == airspace).all() and experts["Fracture"].sum() == 0
    test = set(read_image_list(out / "test_list.txt"))
    in_test = experts.index.isin(list(test))
    assert (experts["Set Id"] == np.where(in_test, "test", "val")).all()
    assert 0.4 < in_test.sum() / len(test) < 0.8  # a subset of each split, most of test
    noisy = read_label_table(out / "Data_Entry_2017.csv").set_index("Image Index").loc[experts.index]
    assert (written.set_index("Image Index")["Patient Age"].astype(int) == noisy["Patient Age"]).all()


def test_lists_are_sorted_patient_disjoint_and_cover_every_image(small):
    out, summary = small
    table = read_label_table(out / "Data_Entry_2017.csv").set_index("Image Index")
    train_val, test = read_image_list(out / "train_val_list.txt"), read_image_list(out / "test_list.txt")
    assert train_val == sorted(train_val) and test == sorted(test)
    assert sorted(train_val + test) == sorted(table.index)
    assert not set(table.loc[train_val, "Patient ID"]) & set(table.loc[test, "Patient ID"])
    assert table.loc[test, "Patient ID"].nunique() == round(0.2 * SMALL["patients"]) == summary["test_patients"]


def test_every_class_reaches_the_floor_in_each_split(small):
    out, summary = small
    clean = labels(out / "clean_labels.csv")
    for name in ("train_val_list.txt", "test_list.txt"):
        split = clean.loc[read_image_list(out / name)]
        need = math.ceil(SMALL["class_floor"] * len(split))
        assert (split.sum() >= need).all(), split.sum()
    assert summary["clean"] == clean.sum().to_dict()


def test_boxes_cover_exactly_the_planted_test_findings(small):
    out, summary = small
    clean = labels(out / "clean_labels.csv")
    test = read_image_list(out / "test_list.txt")
    columns = ["image", "label", "x", "y", "w", "h"]
    boxes = pd.read_csv(out / "BBox_List_2017.csv", header=None, skiprows=1, names=columns)
    assert set(boxes["image"]) <= set(test)
    assert "Infiltration" not in set(boxes["label"])
    planted = {(i, c) for i in test for c in CLASSES if clean.loc[i, c]}
    label = boxes["label"].replace("Infiltrate", "Infiltration")
    boxed = set(zip(boxes["image"], label, strict=True))
    assert boxed == planted and len(boxes) == len(planted) == summary["boxes"]
    assert (boxes[["x", "y"]] >= 0).all().all() and (boxes[["w", "h"]] >= 1).all().all()
    assert ((boxes["x"] + boxes["w"]) <= 64).all() and ((boxes["y"] + boxes["h"]) <= 64).all()


@pytest.mark.parametrize("k", range(len(CLASSES)))
def test_each_finding_is_visible_at_half_size_and_boxed_tightly(k):
    lab = np.zeros(len(CLASSES), dtype=np.uint8)
    lab[k] = 1
    for pid in (3, 4):
        film, boxes = phantom.render(128, 0, pid, 0, lab)
        plain, _ = phantom.render(128, 0, pid, 0, np.zeros_like(lab))
        assert film.dtype == np.uint8 and film.shape == (128, 128)
        (kk, x, y, w, h), = boxes
        assert kk == k
        x, y, w, h = int(x), int(y), int(w), int(h)
        changed = np.abs(film.astype(int) - plain) > 8
        inside = np.zeros_like(changed)
        inside[max(y - 1, 0):y + h + 1, max(x - 1, 0):x + w + 1] = True
        assert changed.any() and not (changed & ~inside).any()  # nothing visible outside its box
        half = [np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.BILINEAR), float)
                for a in (film, plain)]
        assert np.abs(half[0] - half[1]).max() > 20, CLASSES[k]  # still plain to see at 64 px


def test_zero_noise_gives_clean_labels_and_noise_flips_some(tmp_path):
    demo.generate(config(label_noise=0.0), tmp_path / "a", workers=1)
    assert labels(tmp_path / "a" / "Data_Entry_2017.csv").equals(labels(tmp_path / "a" / "clean_labels.csv"))
    rng = np.random.default_rng(0)
    clean = (rng.random((20000, len(CLASSES))) < 0.1).astype(np.uint8)
    noisy = demo.add_noise(clean, np.full(len(CLASSES), 0.1), 0.2, rng)
    assert ((clean == 1) & (noisy == 0)).sum() / clean.sum() == pytest.approx(0.2, abs=0.01)
    assert ((clean == 0) & (noisy == 1)).sum() / (clean == 0).sum() == pytest.approx(0.02, abs=0.003)


def test_label_model_keeps_real_cooccurrence_and_exact_totals():
    combos, counts, stats = demo.load_stats()
    assert len(combos) == len(counts) > 700 and counts.sum() == stats["images"] == 112120
    probs = demo.floor_weights(combos, counts, 0.03)
    assert probs.sum() == pytest.approx(1) and (probs @ combos >= 0.03).all()
    # Sets holding none of the raised classes keep their real proportions.
    raised = (counts / counts.sum()) @ combos < 0.03
    untouched = ~combos[:, raised].any(axis=1)
    ratio = probs[untouched] / counts[untouched]
    assert ratio == pytest.approx(np.full(untouched.sum(), ratio[0]))
    per_patient = demo.images_per_patient(stats["images_per_patient"]["counts"], 800, 2000, np.random.default_rng(0))
    assert per_patient.sum() == 2000 and len(per_patient) == 800 and per_patient.min() >= 1
    assert (per_patient == 1).mean() > 0.4  # most NIH patients have a single film


MISSING = object()  # a `change` value that drops the key
BAD_PARAMS = [
    ({"image_size": "big"}, "demo.image_size: 'big'; expected an integer in [64, 2048]"),
    ({"label_noise": 0.9}, "demo.label_noise: 0.9; expected a number in [0.0, 0.5]"),
    ({"patients": True}, "demo.patients: True; expected an integer in [2, 1000000]"),
    ({"images": 10}, "demo.images: 10; expected >= demo.patients (25): every patient has an image"),
    ({"test_fraction": 1.0}, "demo.test_fraction: 1.0; expected a number in [0.01, 0.99]"),
    ({"seed": -1}, "demo.seed: -1; expected an integer in [0, 4294967295]"),
    ({"colour": 1}, f"demo.colour: unknown key; expected one of {DEMO_KEYS}"),
    ({"image_sise": 64}, "demo.image_sise: unknown key; did you mean image_size?"),
    ({"seed": MISSING},
     "demo.seed: missing; expected an integer in [0, 4294967295] (the defaults live in params.yaml)"),
]


@pytest.mark.parametrize("change, message", BAD_PARAMS, ids=[m.split(";")[0] for _, m in BAD_PARAMS])
def test_bad_params_are_refused_with_the_key_named(tmp_path, change, message):
    values = {k: v for k, v in {**SMALL, **change}.items() if v is not MISSING}
    with pytest.raises(PipelineError) as err:
        build(Demo, values, "test")
    assert str(err.value) == f"test {message}"
    # The stage names the params file it was given, and writes nothing.
    params = tmp_path / "my-params.yaml"
    params.write_text(yaml.safe_dump({"demo": values}))
    out = tmp_path / "data" / "demo"
    with pytest.raises(PipelineError) as err:
        demo_stage.main(["--out", str(out), "--params", str(params)])
    assert str(err.value) == f"{params} {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-params.yaml"]


def test_params_without_a_demo_section_are_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  root: data/demo\n  missing: error\n")
    with pytest.raises(PipelineError) as err:
        demo_stage.main(["--out", str(tmp_path / "demo"), "--params", str(params)])
    assert str(err.value) == f"{params}: missing section 'demo'; expected keys {DEMO_KEYS}"
    assert not (tmp_path / "demo").exists()


def test_main_replaces_the_old_dataset_and_leaves_no_temp_files(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("demo:\n" + "".join(f"  {k}: {v}\n" for k, v in {**SMALL, "images": 30, "patients": 12}.items()))
    out = tmp_path / "data" / "demo"
    (out / "images").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    demo_stage.main(["--out", str(out), "--params", str(params)])
    assert not (out / "stale.txt").exists() and len(list((out / "images").iterdir())) == 30
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]
    printed = capsys.readouterr().out
    assert "30 images of 12 patients" in printed and "Hernia" in printed


def test_a_failed_run_keeps_the_previous_dataset_whole(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    demo.generate(config(), out, workers=1)
    before = digest(out)

    def crash(folder: Path, *args: object) -> None:
        (folder / "00000001_000.png").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "render_all", crash)
    with pytest.raises(KeyboardInterrupt):
        demo.generate(config(seed=7), out, workers=1)
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

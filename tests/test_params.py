"""The params schema: every section typed and checked by one loader; one line naming the file, the key, the value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import REPO, project_params, stage_main, stage_result

from cxr14.params import SECTIONS, Calibrate, Data, Demo, Explain, Prepare, Train, build, load_section, read_yaml
from cxr14.runtime.errors import PipelineError


def test_the_repo_params_file_satisfies_every_section() -> None:
    for cls in SECTIONS:
        if cls.SECTION in read_yaml(REPO / "params.yaml"):
            section = load_section(REPO / "params.yaml", cls)
            assert dataclasses.is_dataclass(section) and not isinstance(section, dict)
    train = load_section(REPO / "params.yaml", Train)
    assert train.augment.crop_scale == (1.0, 1.0) and isinstance(train.lr_head, float)


def test_every_key_of_the_schema_is_in_params_yaml_and_back() -> None:
    """Defaults live in params.yaml only: the file and the schema name the same keys."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for cls in SECTIONS:
        if "." in cls.SECTION:
            continue
        assert set(params[cls.SECTION]) == {f.name for f in dataclasses.fields(cls)}, cls.SECTION
    assert set(params["train"]["augment"]) == {"hflip", "rotate", "crop_scale"}


def test_sections_are_frozen() -> None:
    train = load_section(REPO / "params.yaml", Train)
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.lr_head = 1.0  # type: ignore[misc]


BAD = [  # (section, key path, value, message)
    ("train", "lr_haed", 1e-3, "train.lr_haed: unknown key; did you mean lr_head?"),
    ("train", "epochs", "five", "train.epochs: 'five'; expected an integer >= 1"),
    ("train", "epochs", 2.5, "train.epochs: 2.5; expected an integer >= 1"),
    ("train", "resume", "yes", "train.resume: 'yes'; expected true or false"),
    ("train", "lr_head", "1e-3", "train.lr_head: '1e-3'; expected a number > 0.0 (YAML reads 1e-3 as text"),
    ("train", "lr_backbone", 0, "train.lr_backbone: 0; expected a number > 0.0"),
    ("train", "scheduler", "step", "train.scheduler: 'step'; expected one of none, cosine, plateau, onecycle"),
    ("train", "label_smoothing", 0.5, "train.label_smoothing: 0.5; expected a number in [0.0, 0.5)"),
    ("train", "output_stride", 12, "train.output_stride: 12; expected one of 32, 16, 8"),
    ("train", "pos_weight_cap", 0.5, "train.pos_weight_cap: 0.5; expected null (no cap) or a number >= 1"),
    ("train", "freeze", "layer1", "train.freeze: 'layer1'; expected a list of module-name prefixes"),
    ("train", "augment.hflip", 1.5, "train.augment.hflip: 1.5; expected a probability in [0, 1]"),
    ("train", "augment.crop_scale", [1.0, 0.5], "train.augment.crop_scale: [1.0, 0.5]; expected [low, high]"),
    ("train", "augment.flip", 0.5, "train.augment.flip: unknown key; did you mean hflip?"),
    ("demo", "images", 10, "demo.images: 10; expected >= demo.patients (800)"),
    ("demo", "label_noise", 0.7, "demo.label_noise: 0.7; expected a number in [0.0, 0.5]"),
    ("data", "missing", "maybe", "data.missing: 'maybe'; expected one of error, skip"),
    ("data", "root", "", "data.root: ''; expected a folder in NIH layout"),
    ("split", "val_fraction", 1.0, "split.val_fraction: 1.0; expected a number in (0.0, 1.0)"),
    ("split", "seed", -1, "split.seed: -1; expected an integer in [0, 4294967295]"),
    ("prepare", "image_size", 4, "prepare.image_size: 4; expected an integer in [8, 4096]"),
    ("prepare", "workers", True, "prepare.workers: True; expected 0 (all cores) or a positive integer"),
    ("evaluate", "bootstrap", 5, "evaluate.bootstrap: 5; expected an integer >= 10"),
    ("evaluate", "batch_szie", 64, "evaluate.batch_szie: unknown key; did you mean batch_size?"),
    ("calibrate", "method", "magic", "calibrate.method: 'magic'; expected one of none, temperature, platt, isotonic"),
    ("calibrate", "target_recall", 0, "calibrate.target_recall: 0; expected a number in (0.0, 1.0]"),
    ("explain", "cam_threshold", 1, "explain.cam_threshold: 1; expected a number in (0, 1)"),
    ("explain", "iobb_thresholds", [], "explain.iobb_thresholds: []; expected a non-empty list"),
    ("explain", "iobb_thresholds", [0.1, 1.5], "explain.iobb_thresholds: [0.1, 1.5]; expected a non-empty list"),
]
CLASS = {cls.SECTION: cls for cls in SECTIONS}


@pytest.mark.parametrize(("section", "key", "value", "message"), BAD, ids=[f"{b[1]}={b[2]!r}" for b in BAD])
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path: Path, section, key, value, message) -> None:
    *parents, leaf = key.split(".")
    override: dict = {leaf: value}
    for parent in reversed(parents):
        override = {parent: override}
    path = project_params(tmp_path / "my-params.yaml", {section: override})
    with pytest.raises(PipelineError) as err:
        load_section(path, CLASS[section])
    text = str(err.value)
    assert text.startswith(f"{path} ") and message in text and "\n" not in text


def test_missing_key_section_and_file(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["train"]["seed"]
    params["evaluate"] = None
    del params["calibrate"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match=r"p.yaml train.seed: missing; expected an integer in \[0, 4294967295\] "
                                            r"\(the defaults live in params.yaml\)"):
        load_section(path, Train)
    with pytest.raises(PipelineError, match="p.yaml evaluate: empty section; expected keys bootstrap, seed"):
        load_section(path, CLASS["evaluate"])
    with pytest.raises(PipelineError, match="p.yaml: missing section 'calibrate'; expected keys policy"):
        load_section(path, Calibrate)
    with pytest.raises(PipelineError, match="nowhere.yaml: not found"):
        load_section(tmp_path / "nowhere.yaml", Data)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(PipelineError, match="empty.yaml: empty; expected the sections data, demo"):
        load_section(tmp_path / "empty.yaml", Data)
    (tmp_path / "bad.yaml").write_text("train: [1\n")
    with pytest.raises(PipelineError, match="bad.yaml: not valid YAML"):
        load_section(tmp_path / "bad.yaml", Data)


def test_unknown_section_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    path = project_params(tmp_path / "p.yaml", {"trian": {"epochs": 1}})
    with pytest.raises(PipelineError, match="p.yaml trian: unknown section; did you mean train?"):
        load_section(path, Prepare)


def test_null_is_a_value_only_where_the_schema_allows_it() -> None:
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    assert build(Train, {**values["train"], "pos_weight_cap": None}, "x").pos_weight_cap is None
    with pytest.raises(PipelineError, match="x train.patience: None; expected an integer >= 1"):
        build(Train, {**values["train"], "patience": None}, "x")
    assert build(Demo, {**values["demo"], "label_noise": 0}, "x").label_noise == 0.0  # an int is a number
    assert build(Explain, {**values["explain"], "iobb_thresholds": [0, 0.5]}, "x").iobb_thresholds == [0.0, 0.5]


TYPOS = {  # stage: (section it reads, mistyped key, the key meant)
    "demo": ("demo", "sed", "seed"), "split": ("data", "rooot", "root"),
    "prepare": ("prepare", "image_sise", "image_size"),
    "train": ("train", "lr_haed", "lr_head"), "evaluate": ("evaluate", "bootstap", "bootstrap"),
    "calibrate": ("calibrate", "polcy", "policy"), "explain": ("explain", "per_clas", "per_class"),
}


@pytest.mark.parametrize("stage", list(TYPOS))
def test_every_stage_stops_on_a_typo_before_doing_work(tmp_path: Path, stage: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    """As `dvc repro` runs it: a mistyped key in a section the stage reads is exit 1 and one line on stderr."""
    section, typo, meant = TYPOS[stage]
    params = project_params(tmp_path / "params.yaml", {section: {typo: 1}})
    code, lines = stage_result(stage_main(stage), ["--params", params], capsys)
    assert code == 1
    assert lines == [f"error: {params} {section}.{typo}: unknown key; did you mean {meant}?"]


def test_a_float_is_not_an_integer_choice() -> None:
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(PipelineError, match=r"x train.output_stride: 32.0; expected one of 32, 16, 8"):
        build(Train, {**values["train"], "output_stride": 32.0}, "x")
    assert type(build(Train, values["train"], "x").output_stride) is int


def _params_doc():
    import importlib.util

    spec = importlib.util.spec_from_file_location("params_doc", REPO / "tools" / "params_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_params_page_schema_and_params_yaml_agree() -> None:
    """docs/params.md is generated from cxr14/params.py and params.yaml: one source of truth, checked."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "tools/params_doc.py", "--check"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (REPO / "docs" / "params.md").read_text()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in params.items():
        for key in values:
            assert f"`{section}.{key}`" in page, f"params.yaml {section}.{key} is not in docs/params.md"


def test_params_doc_check_names_every_disagreement() -> None:
    from cxr14.params import Section, field

    doc = _params_doc()
    text = (REPO / "params.yaml").read_text()
    params = yaml.safe_load(text)
    page = doc.render(params)
    assert doc.problems(params, page, text) == []

    extra = yaml.safe_load(text)
    extra["train"]["lr_tail"] = 1.0
    assert "params.yaml train.lr_tail: not in the schema (cxr14/params.py)" in doc.problems(extra, page, text)
    missing = yaml.safe_load(text)
    del missing["train"]["augment"]["hflip"]
    assert "cxr14/params.py train.augment.hflip: not in params.yaml" in doc.problems(missing, page, text)
    changed = yaml.safe_load(text)
    changed["train"]["epochs"] = 5  # a new default: the page is stale
    assert doc.problems(changed, page, text) == ["docs/params.md: stale or missing; run python tools/params_doc.py"]
    assert doc.problems(params, None, text)[-1].startswith("docs/params.md: stale")
    drifted = text.replace("# none | cosine | plateau | onecycle", "# none | cosine | plateau")
    assert drifted != text
    (line,) = doc.problems(params, page, drifted)
    assert line.endswith("train.scheduler lists none | cosine | plateau; the schema has none | cosine | plateau | "
                         "onecycle")

    @dataclasses.dataclass(frozen=True)
    class Undocumented(Section):
        SECTION = "undocumented"
        size: int = field(low=1)

    assert doc.disagreements(Undocumented, {"size": 1}, "undocumented") == [
        "cxr14/params.py undocumented.size: no help= text"]

"""dvc.yaml is the contract: each stage lists exactly the project modules it imports, and the params it reads.

DVC re-runs a stage when one of its deps changes, so a module missing from a stage's deps would leave
stale outputs after an edit, and a module listed but not imported would re-run the stage for nothing.
The import closure is derived from the code (every `import`, at any depth, lazy ones included).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cxr14", "stages")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (package or module), or None for third-party modules."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise AssertionError(f"import of {name}: no such project module")


def imported_files(path: Path) -> set[Path]:
    """Project files `path` imports directly: `import a.b`, `from a import b` (b a module or a name in a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the closure derivation reads absolute imports only"
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            base = ROOT.joinpath(*name.split("."))
            if name.split(".")[0] in PACKAGES and not (base.with_suffix(".py").is_file() or base.is_dir()) \
                    and name != names[0]:
                continue  # `from cxr14.x import some_function`: a name, not a module
            file = module_file(name)
            if file is not None and file.name != "__init__.py":
                found.add(file)
    return found


def import_closure(path: Path) -> set[Path]:
    """`path` and every project file it imports, transitively."""
    seen, todo = set(), [path]
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(imported_files(file))
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> Path:
    cmd = stage["cmd"].split()
    assert cmd[:2] == ["python", "-m"], f"stage command {stage['cmd']!r}: expected python -m stages.<name>"
    return module_file(cmd[2])


def listed_modules(stage: dict) -> set[Path]:
    return {ROOT / dep for dep in stage["deps"] if str(dep).endswith(".py")}


@pytest.mark.parametrize("name", list(stages()))
def test_stage_deps_are_exactly_its_import_closure(name: str) -> None:
    stage = stages()[name]
    derived = import_closure(stage_module(stage))
    listed = listed_modules(stage)
    missing = sorted(str(p.relative_to(ROOT)) for p in derived - listed)
    extra = sorted(str(p.relative_to(ROOT)) for p in listed - derived)
    assert not missing, f"dvc.yaml stage {name}: imports {missing} but does not list them under deps"
    assert not extra, f"dvc.yaml stage {name}: lists {extra} under deps but does not import them"


def test_closure_follows_library_imports() -> None:
    """The derivation itself: train reaches evaluation/metrics.py only through model/inference.py, and calibrate
    never reaches torch code."""
    train = import_closure(ROOT / "stages/train.py")
    assert ROOT / "cxr14/evaluation/metrics.py" in train and ROOT / "cxr14/model/inference.py" in train
    assert ROOT / "cxr14/model/factory.py" not in import_closure(ROOT / "stages/calibrate.py")


def test_removing_a_module_from_deps_is_caught() -> None:
    stage = stages()["train"]
    derived = import_closure(stage_module(stage))
    trimmed = listed_modules(stage) - {ROOT / "cxr14/model/inference.py"}
    assert derived - trimmed == {ROOT / "cxr14/model/inference.py"}


def test_library_never_imports_a_stage() -> None:
    for path in sorted((ROOT / "cxr14").rglob("*.py")):
        stage_imports = [p for p in imported_files(path) if p.parent.name == "stages"]
        assert not stage_imports, f"{path.relative_to(ROOT)} imports {stage_imports}"


def test_no_sys_path_edits() -> None:
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]  # .venv, .git, .dvc: not ours
        for path in (Path(folder) / n for n in names if n.endswith(".py")):
            if path == Path(__file__):
                continue
            text = path.read_text()
            edits = "sys.path.insert" in text or "sys.path.append" in text
            assert not edits, f"{path.relative_to(ROOT)} edits sys.path"


SECTIONS_READ = {  # params sections each stage reads, as `params.<section>` of cxr14.params.load_params
    "demo": {"demo"}, "split": {"data", "split"}, "prepare": {"prepare"}, "train": {"train"},
    "evaluate": {"evaluate", "data", "train"}, "calibrate": {"calibrate", "evaluate"},
    "explain": {"explain", "data", "train"}, "export": {"export", "train"}, "ood": {"ood", "train"},
}


def sections_read(code: str) -> set[str]:
    """The params sections a stage's code reads: every `params.<section>` attribute (docstrings and comments
    aside), where `params = load_params(args.params)`, the stage's one read of the file."""
    from cxr14.params import Section

    known = {cls.SECTION for cls in Section.__subclasses__() if "." not in cls.SECTION}
    tree = ast.parse(code)
    assigned = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["params"]]
    assert [ast.unparse(node.value) for node in assigned] == ["load_params(args.params)"], \
        "expected the params file read once, as `params = load_params(args.params)`"
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "params" and node.attr in known}


@pytest.mark.parametrize("name", list(stages()))
def test_stage_params_name_the_sections_it_reads(name: str) -> None:
    """Every section a stage reads appears in its params (whole, or the keys it uses)."""
    declared = {str(p).split(".")[0] if isinstance(p, str) else next(iter(p)) for p in stages()[name]["params"]}
    code = stage_module(stages()[name]).read_text()
    assert "load_section(" not in code, "expected params.<section> of load_params, read once"
    assert sections_read(code) == SECTIONS_READ[name] == declared


def test_a_section_read_but_not_declared_is_caught() -> None:
    """The detection itself: a stage that starts reading `params.train` shows it (and the docstring does not)."""
    code = '"""Uses params.explain."""\nparams = load_params(args.params)\nsplit = params.split\n'
    assert sections_read(code) == {"split"}
    assert sections_read(code + "device = params.train.device\n") == {"split", "train"}
    with pytest.raises(AssertionError, match="read once"):
        sections_read(code + "params = load_params(other)\n")


def test_deployed_models_survive_a_refused_export() -> None:
    """DVC deletes a stage's outputs before it runs unless they are persist: export refusing a param would then
    leave predict with no model. They stay DVC-cached (not committed to git): the stage replaces them atomically."""
    outs = {next(iter(o)) if isinstance(o, dict) else o: (o if isinstance(o, dict) else {o: {}})
            for o in stages()["export"]["outs"]}
    for path in ("models/model.onnx", "models/model.int8.onnx"):
        options = outs[path][path]
        assert options.get("persist") is True, f"dvc.yaml stage export: {path} is not persist: true"
        assert options.get("cache", True) is True, f"dvc.yaml stage export: {path} is not DVC-cached"
    assert "atomic_path(out) as tmp, atomic_path(out8) as tmp8" in (ROOT / "stages/export.py").read_text()

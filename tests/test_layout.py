"""The form of the code: a library laid out by pipeline phase, thin stages, small functions.

A newcomer maps each `cxr14/` subpackage to a phase of the DAG and each `stages/` script to a `dvc.yaml`
stage; these tests keep it so as the code grows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
PHASES = {"data", "model", "training", "evaluation", "explanation", "deployment", "runtime"}
# `python -m stages.predict` / `stages.compare`: aliases of the console commands, kept for one release
STAGE_ALIASES = {"predict", "compare"}


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                    found.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_60_lines_in_the_library_or_stages() -> None:
    paths = sorted([*(ROOT / "cxr14").rglob("*.py"), *(ROOT / "stages").glob("*.py")])
    assert not long_functions(paths), f"functions over {MAX_FUNCTION_LINES} lines: {long_functions(paths)}"


def test_long_function_check_catches_one(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    assert long_functions([tmp_path / "m.py"], limit=MAX_FUNCTION_LINES) and not long_functions(
        [tmp_path / "m.py"], limit=MAX_FUNCTION_LINES + 1)


def test_library_is_laid_out_by_phase() -> None:
    packages = {p.parent.name for p in (ROOT / "cxr14").glob("*/__init__.py")}
    assert packages == PHASES
    for name in PHASES:
        doc = ast.get_docstring(ast.parse((ROOT / "cxr14" / name / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"cxr14/{name}/__init__.py: a paragraph saying what the phase holds"
    modules = {p.stem for p in (ROOT / "cxr14").rglob("*.py")}
    assert not modules & {"common", "engine", "utils", "misc", "helpers", "lifeline"}


def test_stages_are_exactly_the_dvc_stages() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    scripts = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert scripts - STAGE_ALIASES == set(stages)
    for name, stage in stages.items():
        assert stage["cmd"].split()[:3] == ["python", "-m", f"stages.{name}"]
        tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
        entry = "worker" if any(isinstance(n, ast.FunctionDef) and n.name == "worker" for n in tree.body) else "main"
        guard = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
        call = guard[-1].body[0].value  # conftest.stage_result runs stage_main(name) in-process as this line does
        assert ast.unparse(call.func) == "run_main" and ast.unparse(call.args[0]) == entry, f"stages/{name}.py"


@pytest.mark.xdist_group("layout")
def test_grouped_tests_share_a_worker(request: pytest.FixtureRequest) -> None:
    """Under `--dist loadgroup` (the README's test command) xdist keeps a group on one worker by suffixing node ids
    with `@group`; pytest 9.2 drops the suffix (pytest-dev/pytest-xdist#1386), and each module on the reproduced
    DVC project would build it again, a minute more, silently."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run under --dist loadgroup")
    assert request.node.nodeid.endswith("@layout"), f"{request.node.nodeid}: xdist_group ignored; install the " \
                                                    "pytest and pytest-xdist versions of requirements.txt"

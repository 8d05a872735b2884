"""The README is the user's entry point: its results come from the committed metrics, its commands work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_results_tables_match_committed_metrics() -> None:
    result = subprocess.run([sys.executable, "tools/update_readme.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    extracted = subprocess.run(
        ["awk", r'/<!-- test-command -->/{f=1; next} f && /^```bash/{g=1; next} g && /^```/{exit} g', "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == block and "pytest" in block
    assert "README.md" in (ROOT / ".ci/run").read_text()


def test_every_params_section_is_documented() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    readme = (ROOT / "README.md").read_text()
    for section, values in params.items():
        for key in values:
            assert f"{section}.{key}" in readme, f"params.yaml {section}.{key} is not in the README's params table"

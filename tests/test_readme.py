"""The README is the user's entry point: its results come from the committed metrics, its commands work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_results_tables_match_committed_metrics() -> None:
    """README.md and docs/*.md hold the generated tables as update_readme.py writes them from metrics/ and reports/."""
    result = subprocess.run([sys.executable, "tools/update_readme.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_is_the_front_door_within_12_kib() -> None:
    """The README stays short (what it is, the commands, the stages, the layout, links); the rest lives in docs/."""
    readme = ROOT / "README.md"
    assert readme.stat().st_size <= 12 * 1024, f"README.md is {readme.stat().st_size} bytes; move detail to docs/"
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", readme.read_text()))
    pages = {page.name for page in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    extracted = subprocess.run(
        ["awk", r'/<!-- test-command -->/{f=1; next} f && /^```bash/{g=1; next} g && /^```/{exit} g', "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == block and "pytest" in block
    assert "README.md" in (ROOT / ".ci/run").read_text()


def test_nih_recipe_command_gives_valid_train_params() -> None:
    """The README's one-command NIH recipe parses as DVC parses -S (Hydra grammar) and builds the seed's model."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cxr14.model.factory import build_model, freeze, param_groups
    from cxr14.params import Train, build

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- nih-recipe -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    args = block.replace("\\\n", " ").split()
    sets = [args[i + 1].strip("'") for i, a in enumerate(args) if a == "-S"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in OverridesParser.create().parse_overrides(sets):
        *path, key = override.key_or_group.split(".")
        node = params
        for part in path:
            node = node[part]
        assert key in node, f"README sets unknown param {override.key_or_group}"
        node[key] = override.value()
    t = build(Train, params["train"], "README nih-recipe")
    assert (t.arch, t.weights, t.lr_head, t.lr_backbone) == ("resnet50", "imagenet", 1e-3, 1e-4)
    assert params["prepare"]["image_size"] == 224 and t.batch_size == 64
    model = build_model(t.arch, "none")  # same modules as with ImageNet weights, no file needed
    frozen = freeze(model, t.freeze)
    assert "layer3" in frozen and "layer4" not in frozen
    assert [g["name"] for g in param_groups(model, t.arch, t.lr_head, t.lr_backbone)] == ["head", "backbone"]


def test_gpu_check_smoke_runs_on_the_cpu(tmp_path) -> None:
    """benchmarks/gpu_check.py is run by hand on a GPU now and then; its --smoke mode keeps every section working."""
    import json
    import math

    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--json", str(tmp_path / "g.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "measurement" in result.stdout and "target train_images_per_s" in result.stdout
    figures = json.loads((tmp_path / "g.json").read_text())
    assert figures["smoke"] and "partial" not in figures  # the final write replaces the per-section ones
    sections = ["arrays", "check_bf16", "check_evaluate", "check_predict", "evaluate_predict", "train", "loader",
                "ddp", "compile"]
    assert list(figures["section_seconds"]) == sections
    assert [line.split("] ")[1].split()[0] for line in result.stderr.splitlines() if " done in " in line] == sections

    def speed(entry: dict) -> float:
        assert math.isfinite(entry["images_per_s"]) and entry["images_per_s"] > 0, entry
        return entry["images_per_s"]

    checks = figures["checks"]
    assert set(checks) == {"bf16_training_vs_fp32", "evaluate_cuda_vs_cpu", "predict_cuda_vs_cpu", "ddp_nccl",
                           "no_dvclive_import"}
    assert all(c["passed"] is True for c in checks.values()), checks  # DDP runs over gloo on the CPU here
    assert checks["predict_cuda_vs_cpu"]["heatmaps"] == 1 and checks["no_dvclive_import"]["modules"] == []
    assert 0 <= checks["ddp_nccl"]["max_weight_difference"] < checks["ddp_nccl"]["max_weight_change"]
    recipe = figures["train"][figures["config"]["arch"]]
    assert set(figures["train"]) == {figures["config"]["arch"], "densenet121"}
    for batches in figures["train"].values():
        for variants in batches.values():
            assert {"fp32", "bf16_channels_last"} <= set(variants)
            for name, entry in variants.items():
                if name == "compile" and "skipped" in entry:  # allowed where compiling is impossible
                    continue
                speed(entry)
    for variants in recipe.values():
        compiled = variants["compile"]
        assert "skipped" in compiled or compiled["compile_seconds"] >= 0
    workers = [f for batch in figures["loader"].values() for f in batch.values()]
    assert len(workers) >= 2 and all(speed(f) and math.isfinite(f["ratio_to_model"]) for f in workers)
    speed(figures["evaluate"])
    speed(figures["predict"])
    assert figures["predict"]["gradcam_images_per_s"] > 0
    targets = figures["targets"]
    assert set(targets) == {"train_images_per_s", "loader_ratio", "nih_epoch_seconds"}
    assert all(math.isfinite(t["value"]) and isinstance(t["passed"], bool) for t in targets.values())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def test_slug_follows_github() -> None:
    assert slug("The real NIH ChestX-ray14") == "the-real-nih-chestx-ray14"
    assert slug("Is a difference real?") == "is-a-difference-real"
    assert slug("Predict with the exported model (`benchmarks/bench_deploy.py`)") == \
        "predict-with-the-exported-model-benchmarksbench_deploypy"
    assert slug("After a crash: faults and resume") == "after-a-crash-faults-and-resume"


def outside_code(text: str) -> str:
    """The page without fenced code blocks (a '# comment' in a bash block is no heading) and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """Every anchor a page offers; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M),
                              flags=re.M):
        base = slug(heading)
        out.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return out


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve_and_no_placeholders(page: Path) -> None:
    """Every relative link in the README and docs/ names a file in the repo and, with '#', a heading on that page."""
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", outside_code(text)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"
    placeholders = [line for line in text.splitlines() if re.fullmatch(r"[A-Z_]{4,}", line.strip())]
    assert not placeholders, f"{page.relative_to(ROOT)}: placeholder lines {placeholders}"


def test_the_link_check_finds_a_broken_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Top\n\n## Two words\n\n```bash\n# not a heading\n```\n")
    assert anchors(tmp_path / "a.md") == {"top", "two-words"}

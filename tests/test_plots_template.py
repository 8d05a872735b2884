"""The offline plots page: plots/template.html inlines Vega (no CDN) and `dvc plots show` uses it.

Fast and offline: no npm, no browser (tools/check_plots_page.py is the optional browser check).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import dvc
from dvc_render.html import HTML

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "plots" / "template.html"


def load_tool():
    spec = importlib.util.spec_from_file_location("vendor_vega", REPO / "tools" / "vendor_vega.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look the module up while the class body runs
    spec.loader.exec_module(module)
    return module


vendor_vega = load_tool()
EXTERNAL_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=", re.IGNORECASE)


@pytest.fixture(scope="module")
def template() -> str:
    assert TEMPLATE.is_file(), "plots/template.html missing: run python tools/vendor_vega.py"
    return TEMPLATE.read_text(encoding="utf-8")


def assert_vega_inlined(html: str) -> None:
    assert not EXTERNAL_SCRIPT.search(html), "a <script src=...> would need the network"
    assert "cdn.jsdelivr" not in html
    for pkg in vendor_vega.PINS:
        tag = re.search(rf'<script data-package="{pkg.name}@{re.escape(pkg.version)}" [^>]*>(.*?)</script>', html, re.S)
        assert tag, f"{pkg.name}@{pkg.version} is not inlined"
        assert f'"{pkg.version}"' in tag[1], f"{pkg.name} bundle lacks its version string {pkg.version}"


def test_template_inlines_the_pinned_libraries(template: str) -> None:
    assert_vega_inlined(template)
    assert vendor_vega.verify_page(template) == []  # placeholder once, no scripts placeholder, sha256s match
    # In load order (vega-lite and vega-embed need vega); each UMD bundle defines its browser global.
    scripts = list(vendor_vega.SCRIPT_RE.finditer(template))
    assert [m["package"] for m in scripts] == ["vega", "vega-lite", "vega-embed"]
    globals_ = ["self).vega={}", "self).vegaLite={}", "self).vegaEmbed=t(e.vega,e.vegaLite)"]
    for m, defines in zip(scripts, globals_, strict=True):
        assert defines in m["code"][:500], f"{m['package']}: not the UMD browser bundle"


def test_template_records_versions_and_hashes_up_front(template: str) -> None:
    head = template[: template.index("<title>")]
    assert '<meta charset="utf-8">' in template[:1024], "non-ASCII in the bundles needs the charset early"
    for m in vendor_vega.SCRIPT_RE.finditer(template):
        assert f"{m['package']}@{m['version']}" in head and f"sha256={m['sha256']}" in head


def test_dvc_render_fills_the_template(template: str) -> None:
    """dvc_render substitutes its placeholders with str.replace: the JavaScript's braces survive untouched."""
    page = HTML(template).with_scripts('<script src="https://cdn.example/x.js"></script>')
    page = page.with_element('<div id="p1">PLOT</div>').embed()
    assert '<div id="p1">PLOT</div>' in page
    assert "{plot_divs}" not in page and "{refresh_tag}" not in page
    assert "cdn.example" not in page  # no scripts placeholder: the renderers' CDN tags are dropped
    assert page.count("<script data-package=") == 3


def test_repo_config_points_dvc_at_the_template() -> None:
    from dvc.config import Config

    value = Config(dvc_dir=str(REPO / ".dvc"), validate=True)["plots"]["html_template"]
    # DVC joins a relative plots.html_template to the .dvc directory (dvc/commands/plots.py).
    assert Path(os.path.join(REPO / ".dvc", value)).resolve() == TEMPLATE.resolve()


@pytest.mark.slow
def test_dvc_plots_show_uses_the_template(tmp_path: Path) -> None:
    """A tiny DVC repo configured like this one: the written page has Vega inlined and the plot embedded."""
    work = tmp_path / "repo"
    (work / "plots").mkdir(parents=True)
    shutil.copy(TEMPLATE, work / "plots" / "template.html")
    (work / "loss.csv").write_text("step,loss\n0,1.0\n1,0.6\n2,0.4\n")
    dvc("init", "--no-scm", "-q", cwd=work)
    with open(work / ".dvc" / "config", "a") as fh:  # the same relative value as this repo's .dvc/config
        fh.write("[plots]\n    html_template = ../plots/template.html\n")
    dvc("plots", "show", "loss.csv", "-y", "loss", "-o", "out", cwd=work)
    page = (work / "out" / "index.html").read_text(encoding="utf-8")
    assert_vega_inlined(page)
    assert "vegaEmbed('#loss_csv', spec)" in page
    assert '{"step": 1, "loss": "0.6", "rev": "workspace"}' in page
    assert "{plot_divs}" not in page

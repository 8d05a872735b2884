"""Check that the `dvc plots show` page draws its plots with no network, in headless Chromium (optional check).

Renders the plots page (`dvc plots show -o OUT` in the repo, or an existing page with --page), opens it in
headless Chromium with every network route closed (all requests go to a dead proxy, every host name fails to
resolve), then:
  * dumps the DOM after Vega-Embed ran and checks that every `vegaEmbed('#id', spec)` call in the page drew
    its chart: each plot div holds a Vega `<canvas class="marks">` (or `<svg class="marks">`);
  * checks that every image plot (<img>, e.g. the Grad-CAM overlays) is a local file that decodes;
  * saves a screenshot (OUT/screenshot.png) to look at.
A page that loads Vega from a CDN fails here, as it would on an offline hospital network.

    python tools/check_plots_page.py                    # dvc plots show -> /tmp/..., check, screenshot
    python tools/check_plots_page.py --out /tmp/plots   # keep index.html, dom.html, screenshot.png there
    python tools/check_plots_page.py --page dvc_plots/index.html

Needs Chromium (Debian: `apt-get install chromium`; or set CHROMIUM=/path/to/chrome). It is not a project
dependency and the tests do not run this. Exit status: 0 all plots drawn, 1 some not drawn, 2 setup problem
(no Chromium, dvc plots show failed, no plots in the page).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
EMBED_RE = re.compile(r"vegaEmbed\('#([^']+)'")
IMG_RE = re.compile(r"<img\s[^>]*src=[\"']([^\"'$]+)[\"']", re.IGNORECASE)  # not the JS template in Vega's code
# No network: all traffic to a closed port on loopback (also overrides loopback bypass), no host resolves.
OFFLINE_FLAGS = (
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
QUIET_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
)


class Setup(RuntimeError):
    """A problem that is not the page's fault (exit 2)."""


def find_chromium(explicit: str | None) -> str:
    asked = explicit or os.environ.get("CHROMIUM")
    if asked:  # an explicit choice is not silently replaced by another browser
        if path := shutil.which(asked):
            return path
        raise Setup(f"Chromium {asked!r} (from --chromium or $CHROMIUM) not found or not executable")
    for candidate in CHROMIUM_NAMES:
        if path := shutil.which(candidate):
            return path
    raise Setup(
        "Chromium not found on PATH (tried " + ", ".join(CHROMIUM_NAMES) + "; or pass --chromium / set $CHROMIUM).\n"
        "Install it, e.g. on Debian/Ubuntu: apt-get update && apt-get install -y chromium"
    )


def render_plots(out: Path, targets: list[str]) -> Path:
    """`dvc plots show -o out [targets]` in the repo root (uses .dvc/config's plots.html_template)."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    cmd = [dvc, "plots", "show", "-o", str(out), *targets]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    page = out / "index.html"
    if result.returncode != 0 or not page.is_file():
        raise Setup(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    if result.stderr.strip():
        print(f"dvc plots show: {result.stderr.strip()}", file=sys.stderr)
    return page


def chromium(binary: str, page: Path, extra: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="check_plots_profile_") as profile:
        cmd = [binary, *QUIET_FLAGS, *OFFLINE_FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise Setup(f"Chromium did not finish in {timeout:.0f} s: {' '.join(cmd)}") from e


class MarksByPlot(HTMLParser):
    """For each element id in `ids`: how many Vega mark layers (canvas/svg with class "marks") it contains."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, ids: set[str]):
        super().__init__(convert_charrefs=True)
        self.ids = ids
        self.marks = dict.fromkeys(ids, 0)
        self.stack: list[tuple[str, str | None]] = []  # (tag, plot id it opens, if any)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag in ("canvas", "svg") and "marks" in classes:
            for _, plot in self.stack:
                if plot is not None:
                    self.marks[plot] += 1
        if tag not in self.VOID:
            self.stack.append((tag, a.get("id") if a.get("id") in self.ids else None))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):  # tolerate unclosed tags
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break


def readable_image(path: Path) -> bool:
    """A local file the browser can show: it exists and decodes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, UnidentifiedImageError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("targets", nargs="*", help="passed to `dvc plots show` (default: all plots)")
    parser.add_argument("--page", type=Path, help="check this HTML page instead of running `dvc plots show`")
    parser.add_argument("--out", type=Path, help="folder for index.html, dom.html, screenshot.png (default: new tmp)")
    parser.add_argument("--chromium", help="Chromium/Chrome binary (default: $CHROMIUM, then chromium on PATH)")
    parser.add_argument(
        "--window-size",
        default="1400,auto",
        help="screenshot size W,H; H=auto: tall enough for every plot, at least 3000 (default: %(default)s)",
    )
    parser.add_argument("--budget-ms", type=int, default=10000, help="virtual time for the page to render")
    parser.add_argument("--timeout", type=float, default=120, help="wall-clock limit per Chromium run, seconds")
    args = parser.parse_args(argv)

    try:
        binary = find_chromium(args.chromium)
        out = args.out or Path(tempfile.mkdtemp(prefix="check_plots_"))
        out.mkdir(parents=True, exist_ok=True)
        page = args.page if args.page else render_plots(out, args.targets)
        if not page.is_file():
            raise Setup(f"{page}: no such page")
        html = page.read_text(encoding="utf-8")
        plot_ids = EMBED_RE.findall(html)
        if not plot_ids:
            raise Setup(f"{page}: no vegaEmbed('#...') plots in the page")
        cdn = sorted(set(re.findall(r"<script[^>]*\ssrc=[\"']?([^\"' >]+)", html, re.IGNORECASE)))

        width, _, height = args.window_size.partition(",")
        if height == "auto":  # dvc lays plots out two per row, ~300 px each; images take ~650 px
            height = str(max(3000, 320 * -(-len(plot_ids) // 2) + 650 * html.count("<img") + 200))
        timing = [f"--virtual-time-budget={args.budget_ms}", "--run-all-compositor-stages-before-draw"]
        dom_run = chromium(binary, page, [*timing, "--dump-dom"], args.timeout)
        (out / "dom.html").write_text(dom_run.stdout, encoding="utf-8")
        shot = out / "screenshot.png"
        shot.unlink(missing_ok=True)
        chromium(binary, page, [*timing, f"--window-size={width},{height}", f"--screenshot={shot}"], args.timeout)
    except Setup as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not dom_run.stdout.strip():
        print(f"error: Chromium dumped no DOM (exit {dom_run.returncode}):\n{dom_run.stderr[-2000:]}", file=sys.stderr)
        return 2
    counter = MarksByPlot(set(plot_ids))
    counter.feed(dom_run.stdout)
    drawn = [p for p in plot_ids if counter.marks[p] > 0]
    missing = [p for p in plot_ids if counter.marks[p] == 0]

    print(f"page: {page}")
    print(f"DOM after rendering: {out / 'dom.html'}")
    print(f"screenshot: {shot}" + ("" if shot.is_file() else " (NOT WRITTEN)"))
    if cdn:
        print("external scripts (unreachable here): " + ", ".join(cdn))
    print(f"{len(drawn)}/{len(plot_ids)} Vega plots drawn with the network blocked")
    images = IMG_RE.findall(html)
    broken = [src for src in images if not readable_image(page.parent / src)]
    print(f"{len(images) - len(broken)}/{len(images)} image plots readable "
          f"({sum('gradcam' in src for src in images)} of them Grad-CAM overlays)")
    if broken:
        print("unreadable images: " + ", ".join(broken), file=sys.stderr)
        return 1
    if missing:
        print("not drawn: " + ", ".join(missing), file=sys.stderr)
        if cdn:
            print(
                "the page loads Vega from elsewhere: is .dvc/config's plots.html_template set "
                "(python tools/vendor_vega.py --verify)?",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

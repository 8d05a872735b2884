"""Write plots/template.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined (no CDN).

`dvc plots show` fills an HTML page whose <head> loads vega, vega-lite and vega-embed from cdn.jsdelivr.net;
offline (hospital networks) that page stays blank. This tool fetches the three npm packages at pinned
versions with `npm pack`, checks each tarball against its pinned npm integrity hash, takes the minified
browser (UMD) bundle out of each, and writes DVC's default page (dvc_render's PAGE_HTML) with the three
bundles inlined in <script> tags. `.dvc/config` points `plots.html_template` at the result
(`../plots/template.html`: DVC resolves a relative path against the .dvc directory).

    python tools/vendor_vega.py                  # fetch with npm (needs the npm registry) and write the page
    python tools/vendor_vega.py --tarballs DIR   # use vega-X.tgz, vega-lite-X.tgz, vega-embed-X.tgz already in DIR
    python tools/vendor_vega.py --verify         # offline: check the committed page (tests run this)

The output is deterministic: rerunning with the same pins rewrites the same bytes. The versions, the
npm integrity of each tarball and the sha256 of each inlined bundle are recorded in a comment at the top
of the page and on each <script> tag (`--verify` recomputes the sha256s).

Versions: dvc_render 1.0.2 loads vega@5.20.2, vega-lite@5.2.0 and vega-embed@6.18.2 from the CDN, and DVC's
plot templates are Vega-Lite v5 specs; the pins are the newest releases of those same major versions
(vega 6 / vega-lite 6 / vega-embed 7 are ESM-first and are not what dvc_render targets). Overriding a
version (--vega etc.) skips the integrity check for that package, with a warning.

Differences from dvc_render's PAGE_HTML, on purpose:
  * no scripts placeholder: dvc_render puts the renderers' CDN <script src> tags there, so the page
    leaves it out (a Plotly renderer, which `dvc plots show` does not use, would get no script either);
  * `<meta charset="utf-8">`: the bundles contain non-ASCII characters and a file:// page without a
    charset is decoded as windows-1252.
dvc_render fills the page with str.replace of the plot-divs and refresh-tag placeholders (not
str.format), so the braces in the JavaScript need no escaping; the tool refuses a bundle that contains a
placeholder, `</script` or `<!--` (either would break the inlining), or a carriage return.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "plots" / "template.html"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    bundle: str  # path of the minified browser bundle inside the npm tarball
    integrity: str | None  # npm's `dist.integrity` for this exact version (None: not pinned, not checked)


# Newest releases of the major versions dvc_render 1.0.2 loads (vega 5, vega-lite 5, vega-embed 6).
PINS: tuple[Package, ...] = (
    Package(
        "vega",
        "5.33.1",
        "package/build/vega.min.js",
        "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
    ),
    Package(
        "vega-lite",
        "5.23.0",
        "package/build/vega-lite.min.js",
        "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
    ),
    Package(
        "vega-embed",
        "6.29.0",
        "package/build/vega-embed.min.js",
        "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
    ),
)

# dvc_render.html: HTML.PLOTS_PLACEHOLDER / REFRESH_PLACEHOLDER / SCRIPTS_PLACEHOLDER, filled with str.replace.
PLOTS_PLACEHOLDER = "{plot_divs}"
REFRESH_PLACEHOLDER = "{refresh_tag}"
SCRIPTS_PLACEHOLDER = "{scripts}"
FORBIDDEN_IN_BUNDLE = (PLOTS_PLACEHOLDER, REFRESH_PLACEHOLDER, SCRIPTS_PLACEHOLDER, "</script", "<!--", "\r")

SCRIPT_RE = re.compile(
    r'<script data-package="(?P<package>[^"@]+)@(?P<version>[^"]+)" data-sha256="(?P<sha256>[0-9a-f]{64})">'
    r"(?P<code>.*?)</script>",
    re.DOTALL,
)
EXTERNAL_SCRIPT_RE = re.compile(r"<script\b[^>]*\bsrc\s*=", re.IGNORECASE)


class VendorError(RuntimeError):
    pass


def npm_integrity(data: bytes) -> str:
    """npm's `dist.integrity` (SRI sha512) of a tarball."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def tarball_name(pkg: Package) -> str:
    return f"{pkg.name}-{pkg.version}.tgz"  # what `npm pack` names an unscoped package's tarball


def npm_pack(packages: list[Package], dest: Path) -> None:
    """`npm pack name@version ...` into dest (uses npm's registry and cache; writes nothing else)."""
    npm = shutil.which("npm")
    if npm is None:
        raise VendorError("npm not found on PATH (install Node.js/npm, or pass --tarballs DIR)")
    specs = [f"{p.name}@{p.version}" for p in packages]
    print("npm pack " + " ".join(specs), file=sys.stderr)
    result = subprocess.run(
        [npm, "pack", *specs, "--pack-destination", str(dest)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise VendorError(f"npm pack failed ({result.returncode}):\n{result.stderr.strip()}")


def extract_bundle(pkg: Package, tarball: Path) -> str:
    """The package's minified browser bundle, from its npm tarball, after the integrity and safety checks."""
    data = tarball.read_bytes()
    got = npm_integrity(data)
    if pkg.integrity is None:
        print(
            f"warning: {pkg.name}@{pkg.version} is not pinned here; tarball integrity {got} unchecked", file=sys.stderr
        )
    elif got != pkg.integrity:
        raise VendorError(f"{tarball.name}: integrity {got} does not match the pinned {pkg.integrity}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        try:
            member = tar.getmember(pkg.bundle)
        except KeyError:
            names = [n for n in tar.getnames() if n.endswith(".min.js")]
            raise VendorError(f"{tarball.name} has no {pkg.bundle} (minified files: {names})") from None
        fh = tar.extractfile(member)
        assert fh is not None
        code = fh.read().decode("utf-8")
    for bad in FORBIDDEN_IN_BUNDLE:
        if bad in code:
            raise VendorError(f"{pkg.name}@{pkg.version} {pkg.bundle} contains {bad!r}: cannot inline it safely")
    if f'"{pkg.version}"' not in code:
        raise VendorError(f"{pkg.bundle} does not carry its version string {pkg.version!r}: wrong file?")
    return code


def sha256(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def render_page(bundles: list[tuple[Package, str]]) -> str:
    """dvc_render 1.0.2's PAGE_HTML with the bundles inlined (see the module docstring for the differences)."""
    lines = [
        "Offline DVC plots page: dvc_render's default page with Vega inlined instead of loaded from a CDN.",
        "Generated by tools/vendor_vega.py; do not edit by hand. Regenerate: python tools/vendor_vega.py",
        "Used by `dvc plots show` through .dvc/config: [plots] html_template = ../plots/template.html",
        "",
    ]
    for pkg, code in bundles:
        lines.append(f"{pkg.name}@{pkg.version}  {pkg.bundle}  sha256={sha256(code)}")
        lines.append(f"    npm tarball {tarball_name(pkg)} integrity={pkg.integrity or 'unpinned'}")
    comment = "\n".join("  " + line if line else "" for line in lines)
    if "--" in comment:
        raise VendorError("header comment would not be a valid HTML comment")
    scripts = "\n".join(
        f'    <script data-package="{pkg.name}@{pkg.version}" data-sha256="{sha256(code)}">{code}</script>'
        for pkg, code in bundles
    )
    # The charset must come within the page's first 1024 bytes, so before the (long) comment.
    return f"""<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
<!--
{comment}
-->
    {REFRESH_PLACEHOLDER}
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {PLOTS_PLACEHOLDER}
</body>
</html>
"""


def verify_page(text: str, packages: tuple[Package, ...] = PINS) -> list[str]:
    """Problems with a generated page (empty list: fine). Offline; recomputes each inlined bundle's sha256."""
    problems = []
    if text.count(PLOTS_PLACEHOLDER) != 1:
        problems.append(f"{PLOTS_PLACEHOLDER} must appear exactly once (found {text.count(PLOTS_PLACEHOLDER)})")
    if SCRIPTS_PLACEHOLDER in text:
        problems.append(f"{SCRIPTS_PLACEHOLDER} present: dvc_render would add its CDN <script src> tags there")
    if EXTERNAL_SCRIPT_RE.search(text):
        problems.append("page has a <script src=...>: it must not load scripts from elsewhere")
    found = {m["package"]: m for m in SCRIPT_RE.finditer(text)}
    for pkg in packages:
        m = found.pop(pkg.name, None)
        if m is None:
            problems.append(f"no inlined <script> for {pkg.name}")
            continue
        if m["version"] != pkg.version:
            problems.append(f"{pkg.name}: page has {m['version']}, pinned {pkg.version}")
        if sha256(m["code"]) != m["sha256"]:
            problems.append(f"{pkg.name}: inlined code does not match its recorded sha256 (edited by hand?)")
        if f"{pkg.name}@{m['version']}  {pkg.bundle}  sha256={m['sha256']}" not in text:
            problems.append(f"{pkg.name}: header comment does not record version and sha256")
    problems += [f"unexpected inlined package {name}" for name in found]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "-o", "--out", type=Path, default=DEFAULT_OUT, help="page to write (default: plots/template.html)"
    )
    parser.add_argument(
        "--tarballs", type=Path, metavar="DIR", help="take NAME-VERSION.tgz from DIR instead of running npm pack"
    )
    parser.add_argument("--keep-tarballs", type=Path, metavar="DIR", help="also copy the npm tarballs into DIR")
    for pkg in PINS:
        parser.add_argument(
            f"--{pkg.name}",
            metavar="VERSION",
            dest=pkg.name.replace("-", "_"),
            help=f"{pkg.name} version (default: pinned {pkg.version})",
        )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the existing page offline (placeholder, no script src, pins, sha256s) and exit",
    )
    args = parser.parse_args(argv)

    packages = []
    for pkg in PINS:
        version = getattr(args, pkg.name.replace("-", "_")) or pkg.version
        packages.append(pkg if version == pkg.version else Package(pkg.name, version, pkg.bundle, None))

    if args.verify:
        if not args.out.is_file():
            print(f"{args.out}: missing (run python tools/vendor_vega.py)", file=sys.stderr)
            return 1
        problems = verify_page(args.out.read_text(encoding="utf-8"), tuple(packages))
        for p in problems:
            print(f"{args.out}: {p}", file=sys.stderr)
        if not problems:
            print(f"{args.out}: ok ({', '.join(f'{p.name}@{p.version}' for p in packages)})")
        return 1 if problems else 0

    try:
        with tempfile.TemporaryDirectory(prefix="vendor_vega_") as tmp:
            src = args.tarballs or Path(tmp)
            if args.tarballs is None:
                npm_pack(packages, src)
            bundles = []
            for pkg in packages:
                tarball = src / tarball_name(pkg)
                if not tarball.is_file():
                    raise VendorError(f"{tarball} not found")
                bundles.append((pkg, extract_bundle(pkg, tarball)))
                if args.keep_tarballs:
                    args.keep_tarballs.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(tarball, args.keep_tarballs / tarball.name)
        page = render_page(bundles)
        problems = verify_page(page, tuple(packages))
        if problems:
            raise VendorError("generated page fails its own checks: " + "; ".join(problems))
    except VendorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(page)
    for pkg, code in bundles:
        print(f"{pkg.name}@{pkg.version}: {len(code.encode('utf-8')):,} bytes, sha256 {sha256(code)}")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

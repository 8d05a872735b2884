"""Rewrite the results tables in README.md and docs/*.md from the committed metrics and reports, so no page drifts.

Each table follows a marker `<!-- results:NAME -->` on any of those pages and is replaced whole; a marker naming
no table here is an error. The headline table reads metrics/ (the figures `dvc exp show` compares), the others
reports/ (every figure behind them). `--check` exits 1 when a page differs from what the files say (the tests
run it).

    python tools/update_readme.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"(<!-- results:([\w-]+) -->\n)((?:\|.*\n)*)")


def read(folder: Path, stage: str) -> dict:
    return json.loads((folder / f"{stage}.json").read_text())


def headline_table(metrics_dir: Path, reports_dir: Path) -> str:
    """The README's few lines: test mean AUC with its interval, the demo's oracle, macro F1, ECE before -> after."""
    e, c = read(metrics_dir, "evaluate"), read(metrics_dir, "calibrate")

    def f(v: float | None, digits: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    rows = ["| test split | |", "| --- | --- |",
            f"| mean ROC-AUC [95% CI] | {f(e['auc'], 4)} [{f(e.get('auc_low'), 4)}, {f(e.get('auc_high'), 4)}] |",
            f"| oracle mean ROC-AUC (demo: its clean labels) | {f(e.get('oracle'), 4)} |",
            f"| macro F1 at the val thresholds | {f(c['f1'])} |",
            f"| macro ECE before -> after calibration | {f(c['ece_before'])} -> {f(c['ece_after'])} |"]
    return "\n".join(rows)


def split_table(metrics_dir: Path, reports_dir: Path) -> str:
    """Images and patients per split, from reports/split.json."""
    m = read(reports_dir, "split")
    rows = ["| split | images | patients |", "| --- | --- | --- |"]
    rows += [f"| {s} | {m[s]['images']:,} | {m[s]['patients']:,} |" for s in ("train", "val", "test")]
    return "\n".join(rows)


def train_table(metrics_dir: Path, reports_dir: Path) -> str:
    """Best validation AUC and when it was reached, from reports/train.json (timings vary by machine: left out)."""
    m = read(reports_dir, "train")
    rows = ["| best val mean ROC-AUC | best epoch | epochs run |", "| --- | --- | --- |"]
    rows.append(f"| {m['best_val_mean_auc']:.4f} | {m['best_epoch']} | {m['epochs_run']} |")
    return "\n".join(rows)


def test_table(metrics_dir: Path, reports_dir: Path) -> str:
    """Test-set figures from reports/evaluate.json and reports/calibrate.json."""
    e = read(reports_dir, "evaluate")
    c = read(reports_dir, "calibrate")["test"]["macro"]
    oracle = f"{e['oracle_mean_auc']:.4f}" if "oracle_mean_auc" in e else "n/a"
    rows = ["| test mean ROC-AUC | oracle | macro ECE before -> after | macro Brier before -> after "
            "| macro F1 / precision / recall at val thresholds |", "| --- | --- | --- | --- | --- |"]
    rows.append(f"| {e['mean_auc']:.4f} | {oracle} | {c['ece_before']:.3f} -> {c['ece_after']:.3f} "
                f"| {c['brier_before']:.3f} -> {c['brier_after']:.3f} "
                f"| {c['f1']:.3f} / {c['precision']:.3f} / {c['recall']:.3f} |")
    return "\n".join(rows)


def explain_table(metrics_dir: Path, reports_dir: Path) -> str:
    """Grad-CAM localisation per class with boxes and overall, from reports/explain.json."""
    m = read(reports_dir, "explain")
    keys = [k for k in m["overall"] if k.startswith("iobb_")]
    rows = ["| class | boxes | pointing game | its ceiling | " + " | ".join(f"T(IoBB > {k[5:]})" for k in keys) + " |",
            "| --- | --- | --- | --- |" + " --- |" * len(keys)]
    for name, s in [*m["per_class"].items(), ("**all**", m["overall"])]:
        if s["boxes"]:
            rows.append(f"| {name} | {s['boxes']} | {s['pointing_game']:.2f} | {s['pointing_game_ceiling']:.2f} | "
                        + " | ".join(f"{s[k]:.2f}" for k in keys) + " |")
    return "\n".join(rows)


def expert_table(metrics_dir: Path, reports_dir: Path) -> str:
    """The model and NIH's labels against the expert labels, from evaluate.json and calibrate.json."""
    e = read(reports_dir, "evaluate")["expert"]
    c = read(reports_dir, "calibrate").get("expert", {}).get("findings", {})
    rows = ["| expert finding | NIH classes | test images (positives) | model AUC vs experts [95% CI] "
            "| model AUC vs NIH labels | NIH labels vs experts: sensitivity / specificity / F1 "
            "| model at thresholds vs experts: precision / recall / F1 |", "|" + " --- |" * 7]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for name, v in e.get("findings", {}).items():
        if not v["nih_classes"]:
            rows.append(f"| {name} | none | - | not scored: no NIH class | - | - | - |")
            continue
        n = v["nih_labels_vs_expert"]
        d = c.get(name, {}).get("against_expert", {})
        rows.append(f"| {name} | {', '.join(v['nih_classes'])} | {v['images']} ({v['expert_positives']}) "
                    f"| {f(v['auc'])} [{f(v['auc_ci_low'])}, {f(v['auc_ci_high'])}] "
                    f"| {f(v['auc_against_nih_labels'])} "
                    f"| {f(n['sensitivity'])} / {f(n['specificity'])} / {f(n['f1'])} "
                    f"| {f(d.get('precision'))} / {f(d.get('recall'))} / {f(d.get('f1'))} |")
    return "\n".join(rows)


def subgroup_table(metrics_dir: Path, reports_dir: Path) -> str:
    """Mean test AUC and underdiagnosis rate per subgroup, from evaluate.json and calibrate.json."""
    e = read(reports_dir, "evaluate")["subgroups"]
    c = read(reports_dir, "calibrate")["subgroups"]
    rows = ["| subgroup | test images | mean ROC-AUC [95% CI] | underdiagnosis rate |", "| --- | --- | --- | --- |"]
    for attribute in ("sex", "age", "view"):
        for name, g in e[attribute]["groups"].items():
            under = c[attribute]["groups"][name].get("underdiagnosis_rate")
            auc = (f"{g['mean_auc']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}]" if "mean_auc" in g
                   else "too small")
            rows.append(f"| {attribute}: {name} | {g['images']} | {auc} | "
                        f"{'-' if under is None else f'{under:.3f}'} |")
        gap, under_gap = e[attribute]["gap"], c[attribute]["underdiagnosis_gap"]["gap"]
        rows.append(f"| **{attribute}: worst-to-best gap** | | {'-' if gap is None else f'{gap:.3f}'} | "
                    f"{'-' if under_gap is None else f'{under_gap:.3f}'} |")
    return "\n".join(rows)


def sanity_table(metrics_dir: Path, reports_dir: Path) -> str:
    """Grad-CAM's sanity checks per class and overall, from the `sanity` section of reports/explain.json."""
    m = read(reports_dir, "explain").get("sanity")
    if m is None:
        return "| sanity checks |\n| --- |\n| off (`explain.sanity_images: 0`) |"

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rows = ["| class | images | Spearman, trained vs randomised heatmaps (low is good) | constant maps: randomised "
            "(scored 0) / trained (left out) | deletion area, Grad-CAM order | deletion area, random order |",
            "|" + " --- |" * 6]
    for name, c in m["per_class"].items():
        rows.append(f"| {name} | {c['images']} | {f(c['randomisation_spearman'])} "
                    f"| {c['constant_randomised_maps']} / {c['constant_trained_maps']} "
                    f"| {f(c['deletion_area_gradcam'])} | {f(c['deletion_area_random'])} |")
    o = m["overall"]
    rows.append(f"| **all** ({o['classes_gradcam_below_random']} of {o['classes']} classes: Grad-CAM below random) "
                f"| {o['images']} | {f(o['randomisation_spearman'])} | {o['constant_randomised_maps']} / "
                f"{o['constant_trained_maps']} | {f(o['deletion_area_gradcam'])} | {f(o['deletion_area_random'])} |")
    return "\n".join(rows)


def export_table(metrics_dir: Path, reports_dir: Path) -> str:
    """The exported model's check, from reports/export.json."""
    m = read(reports_dir, "export")
    q = m["int8"]

    def auc(split: dict) -> str:
        if split["mean_auc"] is None:
            return "-"
        worst = split["largest_class_auc_drop"]
        return (f"{split['mean_auc']:.4f} (float32 {split['mean_auc_float32']:.4f}; largest class drop "
                f"{worst['drop']:+.4f}, {worst['class']})")

    t = q["test"]
    return ("| model | test images | largest difference | val mean AUC (the gate) | test mean AUC | test decisions "
            "changed | file size |\n| --- | --- | --- | --- | --- | --- | --- |\n"
            f"| `model.onnx` (float32, opset {m['opset']}) | {m['images']} | {m['max_abs_difference']:.1e} vs PyTorch "
            f"(tolerance {m['tolerance']:g}) | | | | {m['file_bytes'] / 2**20:.1f} MiB |\n"
            f"| `model.int8.onnx` | {m['images']} | {t['max_abs_difference_to_float32']:.2g} vs float32 | "
            f"{auc(q['val'])} | {auc(t)} | {t['decisions_changed']} of {t['decisions']} | "
            f"{q['file_bytes'] / 2**20:.1f} MiB |")


TABLES: dict[str, Callable[[Path, Path], str]] = {
    "headline": headline_table, "split": split_table, "train": train_table, "test": test_table,
    "explain": explain_table, "sanity": sanity_table, "expert": expert_table, "subgroups": subgroup_table,
    "export": export_table}


def render(page: str, where: Path, metrics_dir: Path, reports_dir: Path) -> str:
    """`page` (the text of `where`) with every marked table regenerated."""
    def table(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"{where}: marker '<!-- results:{name} -->' names no table; expected one of "
                             f"{', '.join(TABLES)}")
        return match.group(1) + TABLES[name](metrics_dir, reports_dir) + "\n"

    return MARKER.sub(table, page)


def pages(root: Path) -> list[Path]:
    """README.md and every docs page: the places a results table may live."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="project folder: README.md, docs/, metrics/, reports/")
    args = parser.parse_args()
    metrics_dir, reports_dir = args.root / "metrics", args.root / "reports"
    stale = []
    for path in pages(args.root):
        old = path.read_text()
        new = render(old, path, metrics_dir, reports_dir)
        if new != old:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"{', '.join(map(str, stale))}: results tables differ from {metrics_dir} and {reports_dir}; "
              "run tools/update_readme.py")
        sys.exit(1)


if __name__ == "__main__":
    main()

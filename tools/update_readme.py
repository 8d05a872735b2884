"""Rewrite the README's results tables from the committed metrics, so the README never drifts from them.

Each table follows a marker `<!-- results:NAME -->` and is replaced whole. `--check` exits 1 when the
README differs from what the metrics say (the tests run it).

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


def split_table(metrics_dir: Path) -> str:
    """Images and patients per split, from metrics/split.json."""
    m = json.loads((metrics_dir / "split.json").read_text())
    rows = ["| split | images | patients |", "| --- | --- | --- |"]
    rows += [f"| {s} | {m[s]['images']:,} | {m[s]['patients']:,} |" for s in ("train", "val", "test")]
    return "\n".join(rows)


def train_table(metrics_dir: Path) -> str:
    """Best validation AUC and when it was reached, from metrics/train.json (timings vary by machine: left out)."""
    m = json.loads((metrics_dir / "train.json").read_text())
    rows = ["| best val mean ROC-AUC | best epoch | epochs run |", "| --- | --- | --- |"]
    rows.append(f"| {m['best_val_mean_auc']:.4f} | {m['best_epoch']} | {m['epochs_run']} |")
    return "\n".join(rows)


def test_table(metrics_dir: Path) -> str:
    """Test-set figures from metrics/evaluate.json and metrics/calibrate.json."""
    e = json.loads((metrics_dir / "evaluate.json").read_text())
    c = json.loads((metrics_dir / "calibrate.json").read_text())["test"]["macro"]
    oracle = f"{e['oracle_mean_auc']:.4f}" if "oracle_mean_auc" in e else "n/a"
    rows = ["| test mean ROC-AUC | oracle | macro ECE before -> after | macro Brier before -> after "
            "| macro F1 / precision / recall at val thresholds |", "| --- | --- | --- | --- | --- |"]
    rows.append(f"| {e['mean_auc']:.4f} | {oracle} | {c['ece_before']:.3f} -> {c['ece_after']:.3f} "
                f"| {c['brier_before']:.3f} -> {c['brier_after']:.3f} "
                f"| {c['f1']:.3f} / {c['precision']:.3f} / {c['recall']:.3f} |")
    return "\n".join(rows)


def explain_table(metrics_dir: Path) -> str:
    """Grad-CAM localisation per class with boxes and overall, from metrics/explain.json."""
    m = json.loads((metrics_dir / "explain.json").read_text())
    keys = [k for k in m["overall"] if k.startswith("iobb_")]
    rows = ["| class | boxes | pointing game | its ceiling | " + " | ".join(f"T(IoBB > {k[5:]})" for k in keys) + " |",
            "| --- | --- | --- | --- |" + " --- |" * len(keys)]
    for name, s in [*m["per_class"].items(), ("**all**", m["overall"])]:
        if s["boxes"]:
            rows.append(f"| {name} | {s['boxes']} | {s['pointing_game']:.2f} | {s['pointing_game_ceiling']:.2f} | "
                        + " | ".join(f"{s[k]:.2f}" for k in keys) + " |")
    return "\n".join(rows)


def expert_table(metrics_dir: Path) -> str:
    """The model and NIH's labels against the expert labels, from evaluate.json and calibrate.json."""
    e = json.loads((metrics_dir / "evaluate.json").read_text())["expert"]
    c = json.loads((metrics_dir / "calibrate.json").read_text()).get("expert", {}).get("findings", {})
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


def subgroup_table(metrics_dir: Path) -> str:
    """Mean test AUC and underdiagnosis rate per subgroup, from evaluate.json and calibrate.json."""
    e = json.loads((metrics_dir / "evaluate.json").read_text())["subgroups"]
    c = json.loads((metrics_dir / "calibrate.json").read_text())["subgroups"]
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


def sanity_table(metrics_dir: Path) -> str:
    """Grad-CAM's sanity checks per class and overall, from the `sanity` section of metrics/explain.json."""
    m = json.loads((metrics_dir / "explain.json").read_text()).get("sanity")
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


def export_table(metrics_dir: Path) -> str:
    """The exported model's check, from metrics/export.json."""
    m = json.loads((metrics_dir / "export.json").read_text())
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


TABLES: dict[str, Callable[[Path], str]] = {"split": split_table, "train": train_table, "test": test_table,
                                            "explain": explain_table, "sanity": sanity_table,
                                            "expert": expert_table, "subgroups": subgroup_table,
                                            "export": export_table}


def render(readme: str, metrics_dir: Path) -> str:
    """README text with every marked table regenerated."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n)((?:\|.*\n)*)")
        if not pattern.search(readme):
            raise SystemExit(f"README.md: no '<!-- results:{name} -->' marker followed by a table")
        readme = pattern.sub(lambda m, n=name, f=make: m.group(1) + f(metrics_dir) + "\n", readme)
    return readme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--metrics", type=Path, default=ROOT / "metrics")
    args = parser.parse_args()
    old = args.readme.read_text()
    new = render(old, args.metrics)
    if args.check:
        if new != old:
            print(f"{args.readme}: results tables differ from {args.metrics}; run tools/update_readme.py")
            sys.exit(1)
        return
    args.readme.write_text(new)


if __name__ == "__main__":
    main()

"""Who the model fails: metrics per sex, age band and view position, and the worst-to-best gap.

Chest X-ray classifiers trained on NIH underdiagnose some groups more than others (Seyyed-Kalantari et al.,
CheXclusion 2021; Nature Medicine 2021). NIH's label table carries `Patient Gender`, `Patient Age` and
`View Position`; the split tables and predictions keep them. Values that cannot be placed (an age above
100: the original 2017 table has ages of 148 to 414, which its 2020 revision corrected; a sex other than
M/F; a view other than PA/AP; an empty cell) are counted and named, and those images are left out of that
attribute only. A subgroup with fewer than `min_images` images is reported with its size and no number.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr14.data.nih import CLASSES
from cxr14.evaluation.metrics import PatientBootstrap, has_both, macro_bootstrap, percentile_interval
from cxr14.runtime.outputs import rounded

MAX_AGE = 100
AGE_EDGES = (0, 20, 40, 60, 80)
AGE_BANDS = (*(f"{a}-{b}" for a, b in zip(AGE_EDGES, AGE_EDGES[1:], strict=False)), f"{AGE_EDGES[-1]}+")
ATTRIBUTES = {  # attribute: (label-table column, subgroups in report order)
    "sex": ("Patient Gender", ("F", "M")),
    "age": ("Patient Age", AGE_BANDS),
    "view": ("View Position", ("PA", "AP")),
}
EXAMPLES = 5  # invalid values named per attribute
MIN_POSITIVES = 5  # a false negative rate needs at least this many positives in the subgroup


def age_band(value: object) -> str | None:
    """'40-60' for 47 (or '047Y', a form some copies of the table use); None for what is not an age in [0, 100]."""
    text = str(value).strip().upper()
    text = text[:-1] if text.endswith("Y") else text
    try:
        age = float(text)
    except ValueError:
        return None
    if not (0 <= age <= MAX_AGE) or age != int(age):
        return None
    return AGE_BANDS[int(np.searchsorted(AGE_EDGES, age, side="right")) - 1]


def assign(frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Each image's subgroup per attribute (None where its value is bad) and the bad values counted and named."""
    groups, invalid = {}, {}
    for attribute, (column, labels) in ATTRIBUTES.items():
        if column not in frame.columns:
            groups[attribute] = np.full(len(frame), None, dtype=object)
            invalid[attribute] = {"count": 0, "note": f"no '{column}' column in the label table"}
            continue
        raw = frame[column]
        if attribute == "age":
            placed = np.array([age_band(v) for v in raw], dtype=object)
        else:
            text = raw.astype(str).str.strip().str.upper().to_numpy(dtype=object)
            placed = np.where(np.isin(text, labels), text, None)
        groups[attribute] = placed
        bad = np.flatnonzero(pd.isna(placed))
        if bad.size:
            names = frame["Image Index"].to_numpy()
            invalid[attribute] = {"count": int(bad.size), "column": column,
                                  "examples": [f"{names[i]}: {raw.iloc[i]!r}" for i in bad[:EXAMPLES]]}
    return groups, invalid


def gap(values: dict[str, float | None]) -> dict[str, object]:
    """Worst-to-best gap over the subgroups with a number (None with fewer than two)."""
    measured = {k: v for k, v in values.items() if v is not None}
    if len(measured) < 2:
        return {"gap": None, "best": None, "worst": None}
    best, worst = max(measured, key=measured.get), min(measured, key=measured.get)
    return {"gap": measured[best] - measured[worst], "best": best, "worst": worst}


def auc_by_subgroup(pred: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, resamples: int, seed: int,
                    min_images: int) -> dict:
    """reports/evaluate.json's `subgroups`: per attribute and subgroup, mean ROC-AUC with a patient-bootstrap
    95% interval over the classes defined in that subgroup; the worst-to-best gap; the values left out."""
    groups, invalid = assign(pred)
    out: dict = {"min_images": min_images}
    patients = pred["Patient ID"].to_numpy()
    for attribute, (_, names) in ATTRIBUTES.items():
        entries, means = {}, {}
        for name in names:
            rows = groups[attribute] == name
            entry: dict = {"images": int(rows.sum()), "patients": int(np.unique(patients[rows]).size)}
            mean = None
            if rows.sum() >= min_images:
                boot = PatientBootstrap(patients[rows], resamples, seed)
                mean, values = macro_bootstrap(labels[rows], probs[rows], boot)
            if mean is None:
                entry["note"] = f"too small to measure (fewer than {min_images} images)" if rows.sum() < min_images \
                    else "no class has both outcomes"
            else:
                low, high = percentile_interval(values)
                entry.update(mean_auc=mean, ci_low=low, ci_high=high,
                             classes=int(sum(has_both(labels[rows, k]) for k in range(labels.shape[1]))))
            entries[name], means[name] = entry, mean
        out[attribute] = {"groups": entries, **gap(means), "invalid": invalid.get(attribute, {"count": 0})}
    return rounded(out)


def decisions_by_subgroup(pred: pd.DataFrame, labels: np.ndarray, called: np.ndarray, min_images: int) -> dict:
    """reports/calibrate.json's `subgroups`: per subgroup the underdiagnosis rate (images with any finding that
    the model calls 'No Finding': every class below its threshold) and each class's false negative rate."""
    groups, invalid = assign(pred)
    any_finding, none_called = (labels == 1).any(axis=1), ~called.any(axis=1)  # unknown (NaN) is no finding
    out: dict = {"min_images": min_images, "min_positives": MIN_POSITIVES}
    for attribute, (_, names) in ATTRIBUTES.items():
        entries, under, fnrs = {}, {}, {name: {} for name in CLASSES}
        for name in names:
            rows = groups[attribute] == name
            entry: dict = {"images": int(rows.sum()), "with_finding": int((rows & any_finding).sum())}
            rate = None
            if rows.sum() < min_images:
                entry["note"] = f"too small to measure (fewer than {min_images} images)"
            else:
                sick = rows & any_finding
                rate = float(none_called[sick].mean()) if sick.any() else None
                entry["underdiagnosis_rate"] = rate
                entry["false_negative_rate"] = {}
                for k, cls in enumerate(CLASSES):
                    pos = rows & (labels[:, k] == 1)
                    value = float((~called[pos, k]).mean()) if pos.sum() >= MIN_POSITIVES else None
                    entry["false_negative_rate"][cls] = value
                    fnrs[cls][name] = value
            entries[name], under[name] = entry, rate
        # For a rate, higher is worse: the gap runs from the lowest (best) to the highest (worst) rate.
        worst = {k: -v if v is not None else None for k, v in under.items()}
        g = gap(worst)
        out[attribute] = {
            "groups": entries,
            "underdiagnosis_gap": {"gap": g["gap"], "worst": g["worst"], "best": g["best"]},
            "false_negative_rate_gap": {cls: gap({k: -v if v is not None else None for k, v in fnrs[cls].items()})
                                        ["gap"] for cls in CLASSES},
            "invalid": invalid.get(attribute, {"count": 0}),
        }
    return rounded(out)


def plot_rows(section: dict, key: str, low: str | None = None, high: str | None = None) -> pd.DataFrame:
    """One row per measured subgroup ('sex: F', ...) with `key` (and its interval), for a DVC bar plot."""
    rows = []
    for attribute in ATTRIBUTES:
        for name, entry in section[attribute]["groups"].items():
            if entry.get(key) is not None:
                row = {"subgroup": f"{attribute}: {name}", key: entry[key], "images": entry["images"]}
                if low and high:
                    row.update({low: entry[low], high: entry[high]})
                rows.append(row)
    columns = ["subgroup", key, *([low, high] if low and high else []), "images"]
    return pd.DataFrame(rows, columns=columns)


def summary(section: dict, gap_of: str | None = None) -> str:
    """'sex 0.031 (F worst), age n/a, view 0.012 (AP worst); 3 bad values left out': the gaps in one line."""
    parts, bad = [], 0
    for attribute in ATTRIBUTES:
        entry = section[attribute]
        g = entry[gap_of] if gap_of else entry
        if "note" in entry["invalid"]:
            parts.append(f"{attribute} n/a (no column)")
        else:
            parts.append(f"{attribute} {g['gap']} ({g['worst']} worst)" if g["gap"] is not None else f"{attribute} n/a")
        bad += entry["invalid"]["count"]
    return ", ".join(parts) + (f"; {bad} bad values left out" if bad else "")

"""Google's radiologist-adjudicated labels (Majkowska et al., Radiology 2020) for four findings on NIH images.

Every other number this pipeline reports is measured against NIH's report-mined labels, which are noisy.
Google's file gives expert truth for 4,376 images (1,962 of them in NIH's official test list), so evaluate
scores the model against it, and scores NIH's own labels against it: how noisy the training labels are.

Three of the four findings map onto NIH classes; a finding's model score is the largest probability among
its classes (the model's strongest evidence for any of them), its NIH label is any of them:
- Pneumothorax: Pneumothorax.
- Nodule or mass: Nodule, Mass (the expert finding merges the two sizes of one lesion).
- Airspace opacity: Infiltration, Consolidation, Pneumonia, Edema: the NIH classes that denote airspace
  filling (by pus, fluid or cells). Atelectasis (collapse, volume loss) is not airspace disease, and Nodule
  and Mass are scored on their own; adding Atelectasis would buy the NIH labels sensitivity against the
  experts with specificity.
- Fracture: no NIH class; reported as not scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.data.nih import CLASSES, EXPERT_FILES, FINDINGS
from cxr14.evaluation.metrics import PatientBootstrap, auc, auc_with_interval, has_both
from cxr14.evaluation.predictions import EXPERT_PREFIX, PROB_PREFIX
from cxr14.runtime.errors import PipelineError, warn
from cxr14.runtime.outputs import rounded

MAPPED = tuple(f for f, classes in FINDINGS.items() if classes)
VALUES = {"YES": 1, "NO": 0}


def find_expert_file(root: Path | str) -> Path | None:
    """The expert-label file in the data root, or None (then evaluate has no expert section)."""
    for name in EXPERT_FILES:
        if (Path(root) / name).is_file():
            return Path(root) / name
    return None


def read_expert_labels(path: Path | str) -> pd.DataFrame:
    """One row per adjudicated image, indexed by Image Index: a 0/1 column per finding and `Set Id`.

    Every cell of the four finding columns must read YES or NO; anything else stops with file, line and column.
    Ids are stripped of surrounding spaces (a hand-edited copy has them) before any comparison, so a duplicate
    written with a space is caught here, not by pandas later.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineError(f"{path}: cannot read the expert labels ({' '.join(str(exc).split())})") from None
    missing = [c for c in ("Image Index", *FINDINGS) if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; expected Image Index and "
                            f"{', '.join(FINDINGS)} (YES/NO)")
    table["Image Index"] = table["Image Index"].str.strip()  # " a.png" is a.png, to the duplicate check and lookup
    refuse_duplicates(path, table)
    out = pd.DataFrame(index=pd.Index(table["Image Index"], name="Image Index"))
    for finding in FINDINGS:
        cells = table[finding].str.strip().str.upper()
        bad = ~cells.isin(list(VALUES))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise PipelineError(f"{path} line {i + 2}, column {finding}: {table[finding].iloc[i]!r}; "
                                "expected YES or NO")
        out[finding] = cells.map(VALUES).to_numpy(dtype=np.int64)
    out["Set Id"] = table["Set Id"].to_numpy() if "Set Id" in table.columns else ""
    return out


def refuse_duplicates(path: Path, table: pd.DataFrame) -> None:
    """One row per image (ids already stripped), even where two rows agree: Google's file has one, so a second is
    a hand edit or a merge, and which of two disagreeing rows is right cannot be told."""
    ids = table["Image Index"]
    dup = ids.duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        lines = [int(k) + 2 for k in np.flatnonzero((ids == ids.iloc[i]).to_numpy())]
        cells = table.loc[ids == ids.iloc[i], list(FINDINGS)].apply(lambda c: c.str.strip().str.upper())
        same = "the same labels" if len(cells.drop_duplicates()) == 1 else "different labels"
        raise PipelineError(f"{path} line {i + 2}: image {ids.iloc[i]} appears twice (lines "
                            f"{', '.join(map(str, lines))}, {same}; ids compared without surrounding spaces); "
                            "expected one row per image")


def expert_columns(names: pd.Series, experts: pd.DataFrame) -> pd.DataFrame:
    """expert_<finding> per mapped finding for these images: 1/0, NaN where the image was not adjudicated."""
    found = experts.reindex(names.to_numpy())
    return pd.DataFrame({EXPERT_PREFIX + f: found[f].to_numpy(dtype=np.float64) for f in MAPPED})


MIN_SHARE = 0.5  # of the file's own test images (all its images without a `Set Id` test)


def check_coverage(path: Path | str, names: pd.Series, experts: pd.DataFrame) -> int:
    """How many of these test images have an expert row; a warning with the counts when that is none, or under
    MIN_SHARE of the images the file marks as test (of all its images where it marks none), since the expert
    AUCs would then rest on a few images or none, or the file belongs to other data (ids of another naming).
    Google's file marks 1,962 of its 4,376 images test, all in NIH's test list: the whole NIH test split has
    every one of them, a sample or a subset of it fewer."""
    matched = int(names.isin(experts.index).sum())
    marked = experts["Set Id"].astype(str).str.strip().str.lower() == "test"
    reference, what = (int(marked.sum()), "images it marks test") if marked.any() else (len(experts), "images")
    if matched == 0 or matched < MIN_SHARE * reference:
        warn(f"{path}: {matched} of the {len(names)} test images have an expert row, against the file's "
             f"{reference} {what} (expected at least {MIN_SHARE:.0%} of them); the expert-label AUCs rest on "
             f"{matched} images")
    return matched


def finding_scores(pred: pd.DataFrame, finding: str, prefix: str = PROB_PREFIX) -> np.ndarray:
    """The model's score for a mapped finding: the largest probability among its NIH classes."""
    return pred[[prefix + c for c in FINDINGS[finding]]].to_numpy(dtype=np.float64).max(axis=1)


def nih_label(pred: pd.DataFrame, finding: str) -> np.ndarray:
    """NIH's report-mined label for a mapped finding: any of its classes."""
    return pred[list(FINDINGS[finding])].to_numpy().max(axis=1).astype(np.int64)


def agreement(truth: np.ndarray, called: np.ndarray) -> dict[str, float | int | None]:
    """Sensitivity, specificity, precision and F1 of 0/1 calls against 0/1 truth (None where undefined)."""
    truth, called = np.asarray(truth).astype(bool), np.asarray(called).astype(bool)
    tp, fp = int((truth & called).sum()), int((~truth & called).sum())
    fn, tn = int((truth & ~called).sum()), int((~truth & ~called).sum())
    sens = tp / (tp + fn) if tp + fn else None
    prec = tp / (tp + fp) if tp + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"sensitivity": sens, "specificity": tn / (tn + fp) if tn + fp else None, "precision": prec, "f1": f1,
            "true_positives": tp, "false_positives": fp, "false_negatives": fn, "true_negatives": tn}


def covered(pred: pd.DataFrame, finding: str) -> np.ndarray:
    """Rows of `pred` that the experts adjudicated for this finding."""
    column = EXPERT_PREFIX + finding
    return pred[column].notna().to_numpy() if column in pred.columns else np.zeros(len(pred), dtype=bool)


def expert_section(pred: pd.DataFrame, source: str, resamples: int, seed: int) -> dict:
    """reports/evaluate.json's `expert` section from test predictions carrying expert_<finding> columns.

    Per mapped finding: the model's AUC (patient-bootstrap 95% interval) against the experts, its AUC against
    NIH's labels on the same images, and NIH's labels scored against the experts.
    """
    out: dict = {"source": source, "findings": {}}
    for finding, classes in FINDINGS.items():
        if not classes:
            out["findings"][finding] = {"nih_classes": [], "note": "no NIH class: the model cannot be scored on it"}
            continue
        rows = covered(pred, finding)
        sub = pred[rows].reset_index(drop=True)
        truth = sub[EXPERT_PREFIX + finding].to_numpy().astype(np.int64)
        scores, noisy = finding_scores(sub, finding), nih_label(sub, finding)
        entry: dict = {"nih_classes": list(classes), "score": "max" if len(classes) > 1 else "probability",
                       "images": int(rows.sum()), "patients": int(sub["Patient ID"].nunique()),
                       "expert_positives": int(truth.sum())}
        if has_both(truth):
            point, low, high = auc_with_interval(scores, truth, PatientBootstrap(sub["Patient ID"].to_numpy(),
                                                                               resamples, seed))
            entry.update(auc=point, auc_ci_low=low, auc_ci_high=high)
        else:
            entry.update(auc=None, auc_ci_low=None, auc_ci_high=None,
                         note="the adjudicated test images lack positives or negatives: no AUC")
        entry["auc_against_nih_labels"] = auc(scores, noisy) if len(sub) else None
        entry["nih_labels_vs_expert"] = agreement(truth, noisy)
        out["findings"][finding] = rounded(entry)
    out["images"] = int(np.any([covered(pred, f) for f in MAPPED], axis=0).sum())
    return out


def prf(truth: np.ndarray, called: np.ndarray) -> dict[str, float | None]:
    """Precision, recall and F1 (calibrate's names) of 0/1 calls."""
    a = agreement(truth, called)
    return {"precision": a["precision"], "recall": a["sensitivity"], "f1": a["f1"]}


def decisions_section(pred: pd.DataFrame, called: np.ndarray) -> dict:
    """reports/calibrate.json's `expert`: precision, recall and F1 of the thresholded decisions (a finding is
    called when any of its classes is) against the expert labels and against NIH's, on the same images."""
    out: dict = {}
    for finding, classes in FINDINGS.items():
        if not classes:
            out[finding] = {"note": "no NIH class: not scored"}
            continue
        rows = covered(pred, finding)
        columns = [CLASSES.index(c) for c in classes]
        call = called[rows][:, columns].any(axis=1)
        sub = pred[rows]
        truth = sub[EXPERT_PREFIX + finding].to_numpy().astype(np.int64)
        out[finding] = rounded({"images": int(rows.sum()), "expert_positives": int(truth.sum()),
                                "against_expert": prf(truth, call),
                                "against_nih_labels": prf(nih_label(sub, finding), call)})
    return out

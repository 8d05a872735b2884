"""Is a difference between two runs real? Paired patient bootstrap and DeLong's test on their test predictions.

`dvc metrics diff` shows that mean ROC-AUC moved by 0.003; whether that is more than the luck of the test
sample depends on how many patients the test split has and how the two models' errors correlate. Both runs
scored the same images, so the comparison is paired: each bootstrap resample draws patients once and scores
both runs on them, which cancels the variation they share (a paired interval is much narrower than two
separate ones). Per class, DeLong's test (DeLong et al. 1988, in the fast midrank form of Sun & Xu 2014)
gives an analytic p-value for two correlated AUCs; it treats images as independent, which patients with
several follow-ups are not, so the bootstrap is the primary figure.

Runs are named as git revisions (a commit, branch or tag), as experiments (the names `dvc exp show` lists:
DVC keeps each as a git ref under refs/exps/, ending in its name), or `workspace`; their test predictions
are read through DVC (`dvc.api.open` at that revision: no checkout).
"""

from __future__ import annotations

import io
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14 import paths
from cxr14.data.nih import CLASSES
from cxr14.evaluation.metrics import PatientBootstrap, auc, bootstrap_aucs, has_both, percentile_interval
from cxr14.evaluation.predictions import PROB_PREFIX, read_prediction_table
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.outputs import rounded

WORKSPACE = "workspace"


def git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def experiment_refs(root: Path) -> dict[str, list[str]]:
    """Experiment name -> commits of the refs with that name (one per baseline it was run on)."""
    out = git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/")
    refs: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        ref, sha = line.rsplit(" ", 1)
        parts = ref.split("/")
        if len(parts) >= 4 and parts[2] not in ("exec", "celery", "temp", "runs"):  # DVC's own bookkeeping refs
            refs.setdefault(parts[-1], []).append(sha)
    return refs


def resolve(root: Path, name: str) -> str:
    """The commit of a git revision or of an experiment; `workspace` stays as it is."""
    if name == WORKSPACE:
        return name
    found = git(root, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    if found.returncode == 0:
        return found.stdout.strip()
    shas = experiment_refs(root).get(name, [])
    if len(shas) == 1:
        return shas[0]
    if len(shas) > 1:
        raise PipelineError(f"experiment {name} exists on {len(shas)} baselines; name it by commit "
                            f"({', '.join(s[:7] for s in shas)})")
    if git(root, "rev-parse", "--git-dir").returncode != 0:
        raise PipelineError(f"{root.absolute()}: not inside a git repository; cxr14-compare reads the runs it "
                            f"compares ({name} here) at git revisions through DVC: run it in the project's git "
                            "clone, or name that with --repo")
    raise PipelineError(f"{name}: unknown revision; expected a git commit, branch or tag, an experiment name "
                        f"(dvc exp list --all-commits) or {WORKSPACE}")


def read_run(root: Path, name: str, split: str = "test") -> pd.DataFrame:
    """A run's predictions for `split` (the evaluate stage's CSV), checked like calibrate checks them."""
    rel = (paths.PREDICTIONS / f"{split}.csv").as_posix()
    rev = resolve(root, name)
    if rev == WORKSPACE:
        path = root / rel
        if not path.is_file():
            raise PipelineError(f"{WORKSPACE}: no {rel}; run dvc repro evaluate")
        return read_prediction_table(path)[0]
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        with dvc.api.open(rel, repo=str(root), rev=rev) as handle:
            text = handle.read()
    except (FileNotFoundError, DvcException) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PipelineError(f"{name}: cannot read its {rel} ({reason}); a revision needs the evaluate stage's "
                            "outputs in the DVC cache (dvc pull, or run it)") from None
    tmp = io.StringIO(text)
    return read_prediction_table(tmp, where=f"{name}:{rel}")[0]


def paired(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str]) -> None:
    """Both runs must have scored the same images with the same labels, in the same order."""
    if a["Image Index"].tolist() != b["Image Index"].tolist():
        only = sorted(set(a["Image Index"]) ^ set(b["Image Index"]))
        detail = f"{len(only)} images in one only (first: {only[0]})" if only else "the same images in another order"
        raise PipelineError(f"{names[0]} and {names[1]} predict different test images: {detail}; a paired "
                            "comparison needs the same split (same data and split params)")
    differ = [c for c in CLASSES if (a[c].to_numpy() != b[c].to_numpy()).any()]
    if differ:
        raise PipelineError(f"{names[0]} and {names[1]} label the test images differently (first: {differ[0]}); "
                            "they were built from different data")


def delong(y: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> tuple[float, float]:
    """DeLong's test of AUC(s2) - AUC(s1) on the same images: (z, two-sided p); midrank form (Sun & Xu 2014)."""
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    v10, v01 = [], []
    for s in (np.asarray(s1, dtype=np.float64), np.asarray(s2, dtype=np.float64)):
        x, z = s[y], s[~y]
        tx, tz = midranks(x), midranks(z)
        t = midranks(np.concatenate([x, z]))
        v10.append((t[:m] - tx) / n)  # each positive's share of negatives it outranks
        v01.append(1.0 - (t[m:] - tz) / m)  # each negative's share of positives that outrank it
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff = float(np.mean(v10[1]) - np.mean(v10[0]))
    if var <= 0:
        return (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    zval = diff / math.sqrt(var)
    return zval, math.erfc(abs(zval) / math.sqrt(2))


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: twice the smaller tail, at least 2/(B+1)."""
    d = diffs[np.isfinite(diffs)]
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return min(1.0, 2 * (tail + 1) / (len(d) + 1))


def compare(a: pd.DataFrame, b: pd.DataFrame, resamples: int, seed: int, level: float = 0.95) -> dict:
    """Mean and per-class ROC-AUC of A and B on the same test images, B - A with a paired patient-bootstrap
    interval and p-value, and per class DeLong's z and p."""
    boot = PatientBootstrap(a["Patient ID"].to_numpy(), resamples, seed)
    per_class, rows_a, rows_b = {}, [], []
    for name in CLASSES:
        y = a[name].to_numpy()
        if not has_both(y):
            per_class[name] = {"auc_a": None, "auc_b": None, "note": "one outcome only in test"}
            continue
        pa, pb = a[PROB_PREFIX + name].to_numpy(), b[PROB_PREFIX + name].to_numpy()
        ba, bb = bootstrap_aucs(pa, y, boot), bootstrap_aucs(pb, y, boot)
        rows_a.append(ba), rows_b.append(bb)
        low, high = percentile_interval(bb - ba, level)
        z, p = delong(y, pa, pb)
        auc_a, auc_b = auc(pa, y), auc(pb, y)
        per_class[name] = {"auc_a": auc_a, "auc_b": auc_b, "difference": auc_b - auc_a, "ci_low": low,
                           "ci_high": high, "p_bootstrap": bootstrap_p(bb - ba), "delong_z": z, "p_delong": p}
    defined = [v for v in per_class.values() if v["auc_a"] is not None]
    if not defined:
        raise PipelineError("no class has both outcomes in test: nothing to compare")
    with np.errstate(all="ignore"):
        diffs = np.nanmean(np.array(rows_b), axis=0) - np.nanmean(np.array(rows_a), axis=0)
    mean_a, mean_b = float(np.mean([v["auc_a"] for v in defined])), float(np.mean([v["auc_b"] for v in defined]))
    low, high = percentile_interval(diffs, level)
    return rounded({"images": len(a), "patients": int(a["Patient ID"].nunique()), "bootstrap_resamples": resamples,
                    "level": level, "mean_auc_a": mean_a, "mean_auc_b": mean_b, "difference": mean_b - mean_a,
                    "ci_low": low, "ci_high": high, "p_bootstrap": bootstrap_p(diffs),
                    "classes": len(defined), "per_class": per_class})

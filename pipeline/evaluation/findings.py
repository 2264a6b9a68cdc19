"""Per-disc Modic findings against expert gradings (``modicscan evaluate-findings``).

Each case of CASES.csv (``case,t1,t2[,stir]``: NIfTI paths, relative to the CSV's folder or absolute; 3-D or one
sagittal slice each, on any grids) runs through the real stages after loading
(:func:`pipeline.batch.study.analyse_volumes`: segmentation, measurement, classification). Its discs are counted
from the bottom as readers count them (SPIDER: 1 = L5-S1): disc 1 lies above the body named S1 or, when no body
was named S1, above the lowest body of the column. Outputs in OUT:

* ``per_disc.csv``: ``case, ivd, level`` (our name, empty if a body is unnamed), ``modic_type``, ``modic_score``
  (0-1), ``confidence``; with ``--gradings`` (``case,ivd,modic`` with modic 0-3) also ``truth_modic``, and one row
  per graded disc we did not find (``found`` false: counted as "no Modic change" in the figures).
* ``per_case.csv``: discs found, graded discs, whether the counts match, error, seconds.
* ``summary.json`` (with gradings): sensitivity, specificity, balanced accuracy and Cohen's kappa of Modic presence
  per disc, AUC of ``modic_score``, type kappa (a mixed type counts as its first component: I/II -> I,
  II/III -> II), confusion matrices, the same by disc level, and how often our disc count matches the readers'.
  All metrics from scikit-learn.
* ``<case>.png`` for each case where we disagree with the reader on a disc's Modic presence.
"""

from __future__ import annotations

import csv
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.errors import StudyError
from pipeline.io.atomic import write_csv_atomic, write_json_atomic

MODIC_TYPES = ("0", "I", "II", "III", "I/II", "II/III")
# Type kappa compares with the readers' 0-3: a mixed type counts as its first (more active) component.
TYPE_CODE = {"0": 0, "I": 1, "II": 2, "III": 3, "I/II": 1, "II/III": 2}


# ---------------------------------------------------------------------------------------------- inputs
def read_cases(cases_csv: Path) -> list[dict]:
    """Rows of CASES.csv with absolute paths. Raises ValueError on a missing column, empty or duplicate case."""
    cases_csv = Path(cases_csv)
    with open(cases_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"case", "t1", "t2"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{cases_csv.name}: missing column(s) {', '.join(sorted(missing))} (need case,t1,t2[,stir])")
        rows = list(reader)
    seen = set()
    out = []
    for n, r in enumerate(rows, start=2):
        case = (r.get("case") or "").strip()
        if not case or case in seen:
            raise ValueError(f"{cases_csv.name} line {n}: {'empty' if not case else 'duplicate'} case name {case!r}")
        seen.add(case)
        paths = {}
        for role, col in (("T1", "t1"), ("T2", "t2"), ("STIR", "stir")):
            value = (r.get(col) or "").strip()
            paths[role] = str(Path(value) if Path(value).is_absolute() else cases_csv.parent / value) if value else None
        out.append({"case": case, "paths": paths, "n_discs": r.get("n_discs")})
    return out


def read_grading_rows(gradings_csv: Path) -> dict[tuple[str, int], dict]:
    """(case, ivd) -> the whole gradings row (column -> text), so that training can also read the readers' other
    gradings (Pfirrmann, endplate changes, ...). Raises ValueError on a missing column, an ivd or modic that is not
    an integer, or a Modic type out of 0-3."""
    name = Path(gradings_csv).name
    with open(gradings_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"case", "ivd", "modic"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{name}: missing column(s) {', '.join(sorted(missing))}")
        out = {}
        for n, r in enumerate(reader, start=2):
            try:
                ivd, modic = int(r["ivd"]), int(r["modic"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name} line {n}: ivd and modic must be integers") from exc
            if modic not in (0, 1, 2, 3):
                raise ValueError(f"{name} line {n}: modic must be 0-3, got {modic}")
            out[r["case"].strip(), ivd] = r
    return out


def read_gradings(gradings_csv: Path) -> dict[tuple[str, int], int]:
    """(case, ivd) -> Modic type 0-3 (:func:`read_grading_rows`, same checks)."""
    return {key: int(r["modic"]) for key, r in read_grading_rows(gradings_csv).items()}


def discs_from_bottom(levels: list[str]) -> tuple[int, str]:
    """Index of the body the disc count starts above, and why: the body named S1, else the lowest body."""
    if "S1" in levels:
        return levels.index("S1"), "S1"
    return len(levels) - 1, "lowest body"


# ---------------------------------------------------------------------------------------------- one case
def _eval_case(args) -> dict:
    row, cfg, truth, out_dir, write_png = args
    from pipeline.batch.study import analyse_volumes
    from pipeline.io.nifti_study import load_nifti_study

    start = time.perf_counter()
    res = {"case": row["case"], "discs": [], "error": "", "anchor": "", "single_slice": None}
    try:
        volumes = load_nifti_study(row["paths"])
        analysis = analyse_volumes(volumes, cfg)
    except StudyError as exc:
        res["error"] = f"{exc.code}: {exc.message}"
        res["seconds"] = time.perf_counter() - start
        return res
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop the evaluation of the others
        res["error"] = f"INTERNAL_ERROR: {type(exc).__name__}: {exc}"[:300]
        res["seconds"] = time.perf_counter() - start
        return res
    seg = analysis.segmentation
    levels = [b.level for b in seg.bodies]
    anchor, res["anchor"] = discs_from_bottom(levels)
    res["single_slice"] = analysis.single_slice
    by_pair = {(d["upper"], d["lower"]): d for d in analysis.findings.discs}
    for a in range(anchor):
        d = by_pair.get((levels[a], levels[a + 1]))
        if d is None:
            continue
        named = not (levels[a].startswith("B") or levels[a + 1].startswith("B"))
        m = d["modic"]
        res["discs"].append({"ivd": anchor - a, "level": d["level"] if named else "", "modic_type": m["modic_type"],
                             "modic_score": m["score"], "confidence": m["confidence"],
                             "_rows": (seg.bodies[a].centroid_vox, seg.bodies[a + 1].centroid_vox)})
    res["seconds"] = time.perf_counter() - start
    if write_png and truth:
        disagree = [d for d in res["discs"] if d["ivd"] in truth and (truth[d["ivd"]] > 0) != (d["modic_type"] != "0")]
        if disagree:
            _png(analysis, res["discs"], truth, Path(out_dir) / f"{row['case']}.png", row["case"])
    for d in res["discs"]:
        d.pop("_rows")
    return res


def _png(analysis, discs: list[dict], truth: dict[int, int], path: Path, title: str) -> None:
    """T2 and T1 of the middle slice, body outlines, ours vs the reader per disc (red where presence differs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = analysis.segmentation.labels
    k = labels.shape[2] // 2
    fig, axes = plt.subplots(1, 2, figsize=(10, 6), dpi=80)
    for ax, role in zip(axes, ("T2", "T1"), strict=True):
        ax.imshow(analysis.volumes[role].data[:, :, k], cmap="gray")
        ax.contour(labels[:, :, k] > 0, levels=[0.5], colors="cyan", linewidths=0.6)
        for d in discs:
            (r0, c0, _), (r1, c1, _) = d["_rows"]
            t = truth.get(d["ivd"])
            wrong = t is not None and (t > 0) != (d["modic_type"] != "0")
            ax.text((c0 + c1) / 2 + 25, (r0 + r1) / 2, f"{d['ivd']}: {d['modic_type']} / {'?' if t is None else t}",
                    color="red" if wrong else "yellow", fontsize=7)
        ax.set_title(f"{title} {role}  ivd: ours / reader", fontsize=8)
        ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- metrics
def presence_metrics(truth: np.ndarray, pred: np.ndarray, score: np.ndarray | None = None) -> dict:
    """Modic presence (type > 0) per disc: sensitivity, specificity, balanced accuracy, kappa, AUC (sklearn)."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        recall_score,
        roc_auc_score,
    )

    y, p = (np.asarray(truth) > 0).astype(int), (np.asarray(pred) > 0).astype(int)
    out = {"n": int(y.size), "n_positive": int(y.sum())}
    if y.size == 0:
        return out
    both = 0 < y.sum() < y.size
    out.update({
        "sensitivity": _r(recall_score(y, p, pos_label=1, zero_division=np.nan)) if y.sum() else None,
        "specificity": _r(recall_score(y, p, pos_label=0, zero_division=np.nan)) if y.sum() < y.size else None,
        "balanced_accuracy": _r(balanced_accuracy_score(y, p)) if both else None,
        "kappa": _r(cohen_kappa_score(y, p)) if len(set(y) | set(p)) > 1 else None,
        "auc_score": _r(roc_auc_score(y, score)) if both and score is not None else None,
        "confusion_matrix": confusion_matrix(y, p, labels=[0, 1]).tolist(),
    })
    return out


def _r(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 4)


def summarise(per_disc: list[dict], per_case: list[dict]) -> dict:
    """summary.json from the graded rows of per_disc (unfound graded discs count as no Modic change)."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    graded = [r for r in per_disc if r.get("truth_modic") not in (None, "")]
    truth = np.array([int(r["truth_modic"]) for r in graded], dtype=int)
    pred = np.array([TYPE_CODE[r["modic_type"] or "0"] for r in graded], dtype=int)
    score = np.array([float(r["modic_score"] or 0.0) for r in graded])
    found = np.array([bool(r["found"]) for r in graded], dtype=bool)
    summary = {
        "what": "Modic presence (type > 0) per graded disc; a graded disc we did not find counts as 'no change'",
        "presence": presence_metrics(truth, pred, score),
        "presence_found_discs_only": presence_metrics(truth[found], pred[found], score[found]),
        "type_kappa": _r(cohen_kappa_score(truth, pred)) if truth.size and len(set(truth) | set(pred)) > 1 else None,
        "type_confusion_matrix": {"labels": [0, 1, 2, 3], "rows": "reader", "columns": "ours",
                                  "matrix": confusion_matrix(truth, pred, labels=[0, 1, 2, 3]).tolist()
                                  if truth.size else []},
        "by_level": {},
        "n_graded_discs": int(truth.size), "n_graded_discs_found": int(found.sum()),
    }
    ivds = np.array([int(r["ivd"]) for r in graded], dtype=int)
    for ivd in sorted(set(ivds.tolist())):
        sel = ivds == ivd
        summary["by_level"][f"ivd{ivd}"] = presence_metrics(truth[sel], pred[sel], score[sel])
    ok = [c for c in per_case if not c["error"]]
    counted = [c for c in ok if c["graded_discs"] not in (None, "")]
    summary["cases"] = {
        "n": len(per_case), "analysed": len(ok), "failed": len(per_case) - len(ok),
        "failures": {c["case"]: c["error"] for c in per_case if c["error"]},
        "disc_count_matches_readers": sum(bool(c["count_matches"]) for c in counted),
        "disc_count_compared": len(counted),
        "count_from": {k: sum(c["anchor"] == k for c in ok) for k in ("S1", "lowest body")},
        "seconds_median": _r(np.median([c["seconds"] for c in per_case])) if per_case else None,
    }
    return summary


# ---------------------------------------------------------------------------------------------- driver
def evaluate_findings(cases_csv: Path, out_dir: Path, *, gradings_csv: Path | None = None, jobs: int = 1,
                      cfg: Config | None = None, write_png: bool = True, limit: int | None = None,
                      progress: bool = True) -> dict:
    """Run every case, write per_disc.csv, per_case.csv, summary.json and the disagreement PNGs (module doc).
    Raises ValueError for a malformed CASES.csv or gradings file (before any case is run)."""
    from tqdm import tqdm

    cfg = cfg or Config()
    rows = read_cases(Path(cases_csv))[: limit or None]
    gradings = read_gradings(Path(gradings_csv)) if gradings_csv else None
    truth_of = {r["case"]: {ivd: m for (c, ivd), m in (gradings or {}).items() if c == r["case"]} for r in rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [(r, cfg, truth_of[r["case"]], str(out_dir), write_png) for r in rows]
    results: dict[str, dict] = {}
    bar = tqdm(total=len(args), unit="case", desc="evaluate-findings", disable=not progress)
    if jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("forkserver")) as ex:
            futures = [ex.submit(_eval_case, a) for a in args]
            for fut in as_completed(futures):
                res = fut.result()
                results[res["case"]] = res
                bar.update()
    else:
        for a in args:
            res = _eval_case(a)
            results[res["case"]] = res
            bar.update()
    bar.close()

    per_disc, per_case = [], []
    for r in rows:
        res = results[r["case"]]
        truth = truth_of[r["case"]]
        found = {d["ivd"] for d in res["discs"]}
        for d in res["discs"]:
            rec = {"case": r["case"], **d}
            if gradings is not None:
                rec.update(truth_modic=truth.get(d["ivd"], ""), found=True)
            per_disc.append(rec)
        if gradings is not None:
            for ivd in sorted(set(truth) - found):
                per_disc.append({"case": r["case"], "ivd": ivd, "level": "", "modic_type": "", "modic_score": "",
                                 "confidence": "", "truth_modic": truth[ivd], "found": False})
        graded = max(truth) if truth else (int(r["n_discs"]) if (r.get("n_discs") or "").isdigit() else None)
        per_case.append({"case": r["case"], "discs_found": len(res["discs"]), "graded_discs": graded,
                         "count_matches": (len(res["discs"]) == graded) if graded is not None and not res["error"]
                         else "", "anchor": res["anchor"], "single_slice": res["single_slice"],
                         "error": res["error"], "seconds": round(res["seconds"], 3)})
    write_csv_atomic(out_dir / "per_disc.csv", per_disc)
    write_csv_atomic(out_dir / "per_case.csv", per_case)
    summary = summarise(per_disc, per_case) if gradings is not None else {
        "n_cases": len(per_case), "n_discs": len(per_disc),
        "modic_types": {t: sum(d["modic_type"] == t for d in per_disc) for t in MODIC_TYPES}}
    write_json_atomic(out_dir / "summary.json", summary)
    return summary

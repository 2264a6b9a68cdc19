"""Level names on single-slice lumbar series without body masks (the SPIDER slices of ../shared/data/modic-spider):
``python -m pipeline.evaluation.levels CASES.csv -o results/ [--reading READING.csv]``.

The SPIDER gradings count discs up from the lowest graded one, normally L5-S1, so per-disc findings need our L5
on the right body. The cases carry no body masks: each case is segmented (T2, with the T1 resampled onto it) and
our L5 (its centroid row, mm from the top of the slice) is written with the flags, for review on the PNGs. A
reading (``case,l5_row_mm``: where a reader put the centroid of L5 on the same slice) scores it: correct when
our L5 lies within ``L5_TOLERANCE_MM`` of it, wrong otherwise; unnamed when we named no L5 (with the flags that
say why), failed when no body was segmented. ``docs/spider_l5_reading.csv`` holds one reader's (a developer's,
not an expert's) reading of the cases the reader could tell.

A second check needs no reading: cases.csv's ``n_discs`` (how many discs the experts graded: every disc in view)
puts the lowest graded disc at the n_discs-th disc counted down from the image's top. Where our bodies allow the
count (:func:`disc_number_from_top`), the disc under our L5, and under the reading's, agrees with it or not.

A third check uses the experts' disc grades (``--gradings``: ``case, ivd, pfirrmann``): the discs' T2 signal along
the spine should follow the Pfirrmann grades best when our discs are numbered from the real L5
(:mod:`pipeline.evaluation.disc_grades`); ``grades_ours`` / ``grades_reading`` say whether that numbering, or one
disc off, fits the grades best.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from pipeline.config import SegmentationConfig
from pipeline.errors import StudyError
from pipeline.io.atomic import write_csv_atomic, write_json_atomic

L5_TOLERANCE_MM = 12.0  # under half a vertebral spacing (30-45 mm): the next body's centroid is always farther
OUTCOMES = ("correct", "wrong", "unnamed", "failed", "not_read")
# The disc count (cases.csv's n_discs): SPIDER grades every disc in view, numbered from the bottom, so its lowest
# graded disc is the n_discs-th counted down from the top of the image. Counted on our bodies only when the count
# is sure: the top body is cut by the image's top edge (no disc above it in view) and no body is missing above.
TOP_EDGE_MM = 4.0
GAP_FACTOR = 1.6  # a centroid gap wider than this x the median gap: a body was missed there
COUNT_OUTCOMES = ("agrees", "disagrees", "not_countable")


def load_case_images(row: dict, root: Path) -> tuple[object, list | None]:
    """(T2 volume, [T1 resampled onto the T2 grid] or None without a T1) of one cases.csv row: what
    ``segment_vertebrae`` segments (image, ``extra_images``)."""
    from pipeline.io.nifti import load_nifti, resample_to

    t2 = load_nifti(root / row["t2"])
    return t2, ([resample_to(load_nifti(root / row["t1"]), t2).data] if row.get("t1") else None)


def segment_case(row: dict, root: Path, cfg: SegmentationConfig) -> tuple[dict, object, object]:
    """(result row, T2 volume, segmentation or None) of one cases.csv row."""
    from pipeline.segmentation.segment import segment_vertebrae

    t2, extra = load_case_images(row, root)
    res = {"case": row["case"], "levels": "", "l5_row_mm": None, "s1_row_mm": None, "flags": "", "confidence": None,
           "error": ""}
    try:
        seg = segment_vertebrae(t2.data, t2.spacing, cfg, extra_images=extra)
    except StudyError as exc:
        res["error"] = str(exc)
        return res, t2, None
    rows_mm = {b.level: round(b.centroid_vox[0] * t2.spacing[0], 1) for b in seg.bodies}
    res.update(levels=" ".join(b.level for b in seg.bodies), l5_row_mm=rows_mm.get("L5"), s1_row_mm=rows_mm.get("S1"),
               flags=" ".join(seg.flags), confidence=round(seg.labelling_confidence, 2))
    return res, t2, seg


def disc_number_from_top(seg, spacing, row_mm: float | None) -> int | None:
    """Number, counted down from the image's top, of the disc under the body nearest ``row_mm`` (mm from the top;
    within ``L5_TOLERANCE_MM``); None when not countable: fewer than three bodies, the top body does not reach
    within ``TOP_EDGE_MM`` of the top edge (a disc or an unsegmented body may lie above it), or a gap above the
    body wider than ``GAP_FACTOR`` x the median centroid gap (a body missed)."""
    bodies = seg.bodies if seg is not None else []  # top to bottom
    if row_mm is None or len(bodies) < 3:
        return None
    rows = np.array([b.centroid_vox[0] for b in bodies]) * float(spacing[0])
    i = int(np.argmin(np.abs(rows - row_mm)))
    if abs(rows[i] - row_mm) > L5_TOLERANCE_MM:
        return None
    top_mm = np.flatnonzero((seg.labels == bodies[0].value).any(axis=(1, 2)))[0] * float(spacing[0])
    gaps = np.diff(rows)
    if top_mm > TOP_EDGE_MM or (i > 0 and gaps[:i].max() > GAP_FACTOR * np.median(gaps)):
        return None
    return i + 1


def count_outcome(disc_number: int | None, n_discs: str | None) -> str:
    """agrees / disagrees / not_countable: is the disc under an L5 the experts' lowest graded one (``n_discs``)?"""
    if disc_number is None or not n_discs:
        return "not_countable"
    return "agrees" if disc_number == int(n_discs) else "disagrees"


def outcome(res: dict, reading_mm: float | None) -> str:
    """correct / wrong / unnamed / failed / not_read (no reading of this case)."""
    if res["error"]:
        return "failed"
    if res["l5_row_mm"] is None:
        return "unnamed"
    if reading_mm is None:
        return "not_read"
    return "correct" if abs(res["l5_row_mm"] - reading_mm) <= L5_TOLERANCE_MM else "wrong"


def nearest_body(seg, spacing, row_mm: float | None) -> int | None:
    """Index (top -> bottom) of the body whose centroid is nearest ``row_mm`` (mm from the top), within
    ``L5_TOLERANCE_MM``; None without one."""
    if seg is None or row_mm is None or not seg.bodies:
        return None
    rows = np.array([b.centroid_vox[0] for b in seg.bodies]) * float(spacing[0])
    i = int(np.argmin(np.abs(rows - row_mm)))
    return i if abs(rows[i] - row_mm) <= L5_TOLERANCE_MM else None


def read_pfirrmann(path: Path | None) -> dict[str, dict[int, int]]:
    """case -> {ivd: Pfirrmann grade} from a gradings CSV (``case, ivd, pfirrmann``); {} without a path.
    Raises ValueError when the columns are missing."""
    if path is None:
        return {}
    out: dict[str, dict[int, int]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"case", "ivd", "pfirrmann"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{Path(path).name}: missing column(s) {', '.join(sorted(missing))}")
        for r in reader:
            if (r.get("pfirrmann") or "").strip():
                out.setdefault(r["case"].strip(), {})[int(r["ivd"])] = int(r["pfirrmann"])
    return out


def grades_check(seg, image: np.ndarray, spacing, row_mm: float | None, grades: dict[int, int]) -> tuple[str, dict]:
    """(:func:`disc_grades.grade_outcome`, correlations by offset) for the numbering from the body at ``row_mm``."""
    from pipeline.evaluation.disc_grades import disc_t2_ratios, grade_correlations, grade_outcome

    l5 = nearest_body(seg, spacing, row_mm)
    if l5 is None or not grades:
        return "not_gradable", {}
    ratios = disc_t2_ratios(seg.labels, image, [b.value for b in seg.bodies])
    corr = grade_correlations(ratios, l5, grades)
    return grade_outcome(corr), corr


def read_reading(path: Path | None) -> dict[str, float]:
    if path is None:
        return {}
    with open(path, newline="") as fh:
        return {r["case"]: float(r["l5_row_mm"]) for r in csv.DictReader(fh) if r.get("l5_row_mm")}


def patient_folds(rows: list[dict], k: int = 2) -> list[int]:
    """Fold of each cases.csv row for k-fold cross-validation over patients: CRC-32 of the ``patient`` column (else
    the case) mod k. A patient's fold does not depend on which other rows are listed, so a training over the read
    cases and an evaluation over all cases split them alike (SPIDER's patient numbers are all even: not mod k)."""
    import zlib

    return [zlib.crc32((r.get("patient") or r["case"]).encode()) % k for r in rows]


def fold_rows(rows: list[dict], fold: int | None, held_out: bool) -> list[dict]:
    """The rows of fold ``fold`` (:func:`patient_folds`, of 2) with ``held_out``, else the others (a training's
    rows); all rows when ``fold`` is None. Training and evaluation split through this one function."""
    if fold is None:
        return list(rows)
    return [r for r, f in zip(rows, patient_folds(rows), strict=True) if (f == fold) == held_out]


def _png(t2, seg, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = t2.data[:, :, t2.data.shape[2] // 2]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=80)
    ax.imshow(image, cmap="gray", aspect=t2.spacing[0] / t2.spacing[1])
    if seg is not None:
        k = min(seg.labels.shape[2] - 1, t2.data.shape[2] // 2)
        ax.contour(seg.labels[:, :, k] > 0, levels=[0.5], colors="red", linewidths=0.6)
        for b in seg.bodies:
            ax.text(b.centroid_vox[1] - 0.12 * image.shape[1], b.centroid_vox[0], b.level, color="yellow", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def evaluate_levels(cases_csv: Path, out_dir: Path, reading: Path | None = None, write_png: bool = True,
                    cfg: SegmentationConfig | None = None, limit: int | None = None,
                    fold: int | None = None, gradings: Path | None = None) -> dict:
    """Segment every case (only fold ``fold``'s of :func:`patient_folds`, when given: the cases a net trained
    with ``train_unet --l5-fold`` left out), write levels.csv (+ a PNG per case) and summary.json; returns the
    summary. ``gradings``: the experts' per-disc grades for the Pfirrmann check (:func:`grades_check`)."""
    cfg = cfg or SegmentationConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(cases_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = fold_rows(rows, fold, held_out=True)[:limit]
    read = read_reading(reading)
    pfirrmann = read_pfirrmann(gradings)
    results = []
    for row in rows:  # one slice per case: ~1 s each
        res, t2, seg = segment_case(row, Path(cases_csv).parent, cfg)
        res["reading_l5_row_mm"] = read.get(row["case"])
        res["outcome"] = outcome(res, read.get(row["case"]))
        for who, row_mm in (("ours", res["l5_row_mm"]), ("reading", res["reading_l5_row_mm"])):
            disc = disc_number_from_top(seg, t2.spacing, row_mm) if seg is not None else None
            res[f"count_{who}"] = count_outcome(disc, row.get("n_discs"))
            if gradings is not None:
                grade, corr = grades_check(seg, t2.data, t2.spacing, row_mm, pfirrmann.get(row["case"], {}))
                res[f"grades_{who}"] = grade
                res[f"grades_r_{who}"] = " ".join(f"{o:+d}:{r:.2f}" for o, r in sorted(corr.items()))
        results.append(res)
        if write_png:
            _png(t2, seg, out_dir / "png" / f"{row['case']}.png", f"{row['case']}: {res['outcome']} {res['flags']}")
    write_csv_atomic(out_dir / "levels.csv", results)
    counts = {k: sum(r["outcome"] == k for r in results) for k in OUTCOMES}
    judged = counts["correct"] + counts["wrong"]
    summary = {"n_cases": len(results), "outcomes": counts,
               "correct_of_read_pct": round(100.0 * counts["correct"] / judged, 1) if judged else None,
               "unnamed_flags": sorted({f for r in results if r["outcome"] == "unnamed" for f in r["flags"].split()}),
               "tolerance_mm": L5_TOLERANCE_MM,
               # the experts' disc count (n_discs) against our L5 and against the reading's, where countable
               "disc_count": {who: {k: sum(r[f"count_{who}"] == k for r in results) for k in COUNT_OUTCOMES}
                              for who in ("ours", "reading")}}
    if gradings is not None:  # which numbering the experts' Pfirrmann grades support (disc_grades)
        from pipeline.evaluation.disc_grades import GRADE_OUTCOMES

        summary["disc_grades"] = {who: {k: sum(r[f"grades_{who}"] == k for r in results) for k in GRADE_OUTCOMES}
                                  for who in ("ours", "reading")}
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases_csv", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--reading", type=Path, help="case,l5_row_mm: a reader's L5 centroid row per case")
    ap.add_argument("--gradings", type=Path,
                    help="case,ivd,pfirrmann: the experts' disc grades, for the Pfirrmann check of the disc numbering")
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--fold", type=int, choices=(0, 1),
                    help="only the patients of this fold (of 2): those a net trained with --l5-fold left out")
    ap.add_argument("--config", type=Path, help="YAML config (its segmentation section is used)")
    ap.add_argument("--unet", type=Path, help="net (.onnx) instead of the shipped one (e.g. a held-out fold's)")
    args = ap.parse_args(argv)
    for path in (args.cases_csv, args.gradings):
        if path is not None and not path.is_file():
            ap.error(f"{path} does not exist")
    cfg = None
    if args.config:
        from pipeline.config import load_config
        from pipeline.errors import ConfigError

        try:
            cfg = load_config(args.config).segmentation
        except ConfigError as exc:
            ap.error(str(exc))
    if args.unet:
        from pipeline.segmentation.unet import use_network

        if (cfg.body_model if cfg else "auto") == "auto":
            # auto runs the one-pass net on these single slices: a cascade fold net would be run in its place
            ap.error("--unet needs --config with segmentation.body_model unet or onepass (the model the net is)")
        use_network(args.unet)
    print(evaluate_levels(args.cases_csv, args.out, args.reading, not args.no_png, cfg=cfg, limit=args.limit,
                          fold=args.fold, gradings=args.gradings))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

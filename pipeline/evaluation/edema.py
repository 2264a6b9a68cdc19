"""Edema rule against expert readers: ``modicscan evaluate-edema CASES.csv -o OUT``.

CASES.csv has the columns ``case, stir, t1, bone_region`` and optionally reader masks ``edema_<reader>`` (any
number; e.g. ``edema_R11`` = reader 1, session 1) and ``normal_marrow`` (a reader's normal-marrow ROI, used only to
check the automatic reference, never by the rule). Paths are relative to the CSV's folder or absolute; an empty
cell means "not given". Every image is brought onto the STIR grid through its affine.

Per case the pipeline's edema rule (:func:`pipeline.classify.edema_mask`, config section ``edema``) runs inside the
bone region and writes ``OUT/<case>_edema.nii.gz`` (uint8, the STIR file's own grid). ``per_case.csv`` gives the Dice
of our mask against each reader mask, their mean, the Dice of every pair of reader masks, voxel precision / recall
(scikit-learn) and the reference; ``summary.json`` the means over cases. Reader agreement is the human ceiling:
``inter_reader_dice`` averages the pairs of masks by different readers (``R<reader><session>`` names; other names
all count as different readers).
"""

from __future__ import annotations

import csv
import itertools
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.classify import edema_mask
from pipeline.config import EdemaConfig
from pipeline.errors import StudyError
from pipeline.io.atomic import write_csv_atomic, write_json_atomic
from pipeline.io.nifti import read_nifti_native, resample_to, save_nifti
from pipeline.types import Volume

REQUIRED_COLUMNS = ("case", "stir", "t1", "bone_region")
READER_PREFIX = "edema_"
_READER_SESSION = re.compile(r"^R(\d)(\d+)$")


class CasesError(ValueError):
    """CASES.csv cannot be used as given (missing column, missing file, duplicate case)."""


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (both say "no edema")."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def reader_of(name: str) -> str:
    """The reader of a mask name: ``R12`` -> ``R1`` (reader 1, session 2); other names are their own reader."""
    m = _READER_SESSION.match(name)
    return f"R{m.group(1)}" if m else name


def read_edema_cases(cases_csv: Path) -> tuple[list[dict], list[str]]:
    """Rows with absolute paths, and the reader mask names (column suffixes after ``edema_``). CasesError if unusable."""
    cases_csv = Path(cases_csv)
    try:
        with open(cases_csv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CasesError(f"{cases_csv}: cannot read: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise CasesError(f"{cases_csv}: missing column(s) {', '.join(missing)} (need {', '.join(REQUIRED_COLUMNS)})")
    if not rows:
        raise CasesError(f"{cases_csv}: no cases")
    readers = [c[len(READER_PREFIX):] for c in columns if c.startswith(READER_PREFIX) and len(c) > len(READER_PREFIX)]
    path_columns = [*REQUIRED_COLUMNS[1:], *(READER_PREFIX + r for r in readers)]
    if "normal_marrow" in columns:
        path_columns.append("normal_marrow")
    seen: set[str] = set()
    out = []
    for n, row in enumerate(rows, start=2):
        case = (row.get("case") or "").strip()
        if not case or "/" in case or "\\" in case:
            raise CasesError(f"{cases_csv}, line {n}: case name {case!r} is empty or holds a path separator")
        if case in seen:
            raise CasesError(f"{cases_csv}, line {n}: case {case!r} appears twice")
        seen.add(case)
        rec = {"case": case}
        for col in path_columns:
            value = (row.get(col) or "").strip()
            if not value:
                if col in REQUIRED_COLUMNS:
                    raise CasesError(f"{cases_csv}, line {n}: case {case!r} has no {col}")
                rec[col] = None
                continue
            path = Path(value) if Path(value).is_absolute() else cases_csv.parent / value
            if not path.is_file():
                raise CasesError(f"{cases_csv}, line {n}: {col} file not found: {path}")
            rec[col] = path
        out.append(rec)
    return out, readers


def on_stir_grid(path: Path, target: Volume, order: int) -> np.ndarray:
    """The image at ``path`` sampled on ``target``'s grid through the affines (order 0 for masks)."""
    return resample_to(read_nifti_native(path), target, order=order).data


def evaluate_case(rec: dict, readers: list[str], cfg: EdemaConfig, out_dir: Path) -> dict:
    """Run the rule on one case, write its mask, return its per_case.csv row (raises ValueError for bad images)."""
    from sklearn.metrics import precision_score, recall_score

    stir = read_nifti_native(rec["stir"])  # its own voxel order: the output mask shares the STIR file's
    spacing = stir.spacing
    region = on_stir_grid(rec["bone_region"], stir, 0) > 0.5
    t1 = on_stir_grid(rec["t1"], stir, 1)
    result = edema_mask(stir.data, region, spacing, cfg, t1=t1)
    save_nifti(result.mask.astype(np.uint8), stir.affine, out_dir / f"{rec['case']}_edema.nii.gz")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    row: dict = {"case": rec["case"], "region_ml": round(float(region.sum()) * voxel_ml, 2),
                 "edema_ml": round(float(result.mask.sum()) * voxel_ml, 3),
                 "reference": round(result.reference, 3), "t1_reference": _round(result.t1_reference, 3)}
    if rec.get("normal_marrow") is not None:
        roi = on_stir_grid(rec["normal_marrow"], stir, 0) > 0.5
        roi_median = float(np.median(stir.data[roi])) if roi.any() else float("nan")
        row["reference_over_roi"] = _round(result.reference / roi_median if roi_median > 0 else None, 3)
    masks = {r: on_stir_grid(rec[READER_PREFIX + r], stir, 0) > 0.5 for r in readers if rec.get(READER_PREFIX + r)}
    ours = result.mask[region]
    for r in readers:
        if r in masks:
            row[f"dice_{r}"] = round(dice(result.mask, masks[r]), 4)
            row[f"reader_ml_{r}"] = round(float(masks[r].sum()) * voxel_ml, 3)
    if masks:
        row["dice_mean"] = round(float(np.mean([row[f"dice_{r}"] for r in masks])), 4)
        truth = [masks[r][region] for r in masks]
        row["precision_mean"] = round(float(np.mean([precision_score(t, ours, zero_division=1.0) for t in truth])), 4)
        row["recall_mean"] = round(float(np.mean([recall_score(t, ours, zero_division=1.0) for t in truth])), 4)
    inter = []
    for a, b in itertools.combinations(sorted(masks), 2):
        d = dice(masks[a], masks[b])
        row[f"dice_{a}_vs_{b}"] = round(d, 4)
        if reader_of(a) != reader_of(b):
            inter.append(d)
    if inter:
        row["inter_reader_dice"] = round(float(np.mean(inter)), 4)
    return row


def _round(x: float | None, n: int) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), n)


def summarise(rows: list[dict], cfg: EdemaConfig) -> dict:
    """Means over the cases that have reader masks (each case counts once, whatever its number of masks)."""
    scored = [r for r in rows if "dice_mean" in r]
    with_pairs = [r for r in rows if "inter_reader_dice" in r]

    def mean_of(key: str, subset: list[dict]) -> float | None:
        vals = [r[key] for r in subset if r.get(key) is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    both = [r for r in scored if "inter_reader_dice" in r]
    return {
        "n_cases": len(rows),
        "n_failed": sum(1 for r in rows if r.get("error")),
        "n_cases_with_readers": len(scored),
        "mean_dice_vs_readers": mean_of("dice_mean", scored),
        "mean_inter_reader_dice": mean_of("inter_reader_dice", with_pairs),
        "mean_precision_vs_readers": mean_of("precision_mean", scored),
        "mean_recall_vs_readers": mean_of("recall_mean", scored),
        "cases_at_or_above_reader_agreement": sum(1 for r in both if r["dice_mean"] >= r["inter_reader_dice"]),
        "mean_reference_over_roi": mean_of("reference_over_roi", rows),
        "per_case": {r["case"]: {k: r.get(k) for k in ("dice_mean", "inter_reader_dice", "edema_ml", "error")
                                 if r.get(k) is not None} for r in rows},
        "config": {"edema": asdict(cfg)},
        "rule": "pipeline.classify.edema_mask: STIR / automatic normal-marrow reference (histogram mode of the bone "
                "region, shaded), hysteresis grow_ratio..seed_ratio, T1 ceiling, minimum volume",
    }


def evaluate_edema(cases_csv: Path, out_dir: Path, cfg: EdemaConfig | None = None, progress: bool = True) -> dict:
    """Every case of CASES.csv (see module doc); writes the masks, per_case.csv and summary.json. Returns the summary.

    A case whose images cannot be read or aligned gets an ``error`` in its row and no mask; the others go on."""
    cfg = cfg or EdemaConfig()
    records, readers = read_edema_cases(cases_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    iterator = records
    from nibabel.filebasedimages import ImageFileError

    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, unit="case", desc="evaluate-edema")
    rows = []
    for rec in iterator:
        try:
            rows.append(evaluate_case(rec, readers, cfg, out_dir))
        except (StudyError, ValueError, OSError, EOFError, ImageFileError) as exc:  # unreadable / misshapen image: record, go on
            rows.append({"case": rec["case"], "error": str(exc).splitlines()[0][:300]})
    write_csv_atomic(out_dir / "per_case.csv", rows)
    summary = summarise(rows, cfg)
    write_json_atomic(out_dir / "summary.json", summary)
    return summary

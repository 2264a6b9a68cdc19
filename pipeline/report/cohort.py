"""Cohort outputs rebuilt from the per-study reports: one row per study x vertebra x endplate."""

from __future__ import annotations

import csv
import io as _io
import json
import logging
from pathlib import Path

from pipeline.io.atomic import write_bytes_atomic

log = logging.getLogger("modicscan")

COHORT_COLUMNS = [
    "study_key", "level", "endplate", "modic_type", "modic_confidence", "extent_height_pct", "extent_volume_pct",
    "fraction_I", "fraction_II", "fraction_III", "disc_level", "disc_modic_type", "disc_modic_score",
    "edema_present", "edema_source", "edema_extent_volume_pct", "edema_confidence",
    "zone_T1_ratio", "zone_T2_ratio", "zone_STIR_ratio", "core_T1_ratio", "core_T2_ratio", "core_STIR_ratio",
    "height_anterior_mm", "height_middle_mm", "height_posterior_mm", "height_ratio_anterior_posterior",
    "review_flags", "labelling_confidence", "overall_confidence",
]


def iter_reports(out_root: Path):
    """Every analysed report under ``out_root`` (one folder per study)."""
    for path in sorted(Path(out_root).glob("*/report.json")):
        try:
            yield json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable report %s: %s", path, exc)


def _ratio(zone: dict, seq: str):
    sig = zone["signal"].get(seq)
    return None if sig is None else sig.get("ratio")


def _disc_columns(disc: dict | None) -> dict:
    modic = (disc or {}).get("modic") or {}
    return {"disc_level": disc["level"] if disc else None, "disc_modic_type": modic.get("modic_type"),
            "disc_modic_score": modic.get("score")}


def cohort_rows(reports) -> list[dict]:
    rows = []
    for rep in reports:
        disc_of = {}  # (level, side) -> the disc next to that endplate
        for d in rep.get("discs", []):
            disc_of[d["upper"], "inferior"] = d
            disc_of[d["lower"], "superior"] = d
        flags_by_level: dict[str, list[str]] = {}
        for f in rep["flags"]:
            for lv in f["levels"]:
                flags_by_level.setdefault(lv, []).append(f["code"])
        for v in rep["vertebrae"]:
            for side in ("superior", "inferior"):
                ep = v["endplates"][side]
                zone = v["zones"][side]
                core = v["zones"]["core"]
                rows.append({
                    "study_key": rep["study"]["key"],
                    "level": v["level"],
                    "endplate": side,
                    "modic_type": ep["modic_type"],
                    "modic_confidence": ep["confidence"],
                    "extent_height_pct": ep["extent_height_pct"],
                    "extent_volume_pct": ep["extent_volume_pct"],
                    "fraction_I": ep["type_fractions"]["I"],
                    "fraction_II": ep["type_fractions"]["II"],
                    "fraction_III": ep["type_fractions"]["III"],
                    **_disc_columns(disc_of.get((v["level"], side))),
                    "edema_present": v["edema"]["present"],
                    "edema_source": v["edema"]["source"],
                    "edema_extent_volume_pct": v["edema"]["extent_volume_pct"],
                    "edema_confidence": v["edema"]["confidence"],
                    "zone_T1_ratio": _ratio(zone, "T1"),
                    "zone_T2_ratio": _ratio(zone, "T2"),
                    "zone_STIR_ratio": _ratio(zone, "STIR"),
                    "core_T1_ratio": _ratio(core, "T1"),
                    "core_T2_ratio": _ratio(core, "T2"),
                    "core_STIR_ratio": _ratio(core, "STIR"),
                    "height_anterior_mm": v["heights_mm"]["anterior"],
                    "height_middle_mm": v["heights_mm"]["middle"],
                    "height_posterior_mm": v["heights_mm"]["posterior"],
                    "height_ratio_anterior_posterior": v["height_ratios"]["anterior_to_posterior"],
                    "review_flags": ";".join(sorted(set(flags_by_level.get(v["level"], [])))),
                    "labelling_confidence": rep["segmentation"]["labelling_confidence"],
                    "overall_confidence": rep["confidence"]["overall"],
                })
    return rows


LITERATURE_NOTE = (
    "For a sanity check against the literature (Jensen et al., Eur Spine J 2008;17:1407-22): any Modic change in "
    "~43 % of people with chronic low back pain and ~6 % of people without; type II most common; most changes at "
    "L4-L5 and L5-S1."
)


def prevalence_summary(rows: list[dict], n_studies: int) -> dict:
    """Prevalence of each Modic type and of edema, overall and by level (per endplate and per study)."""
    levels = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    types = ["I", "II", "III", "I/II", "II/III"]

    def pct(num: int, den: int) -> float | None:
        return round(100.0 * num / den, 2) if den else None

    by_level = {}
    for lv in levels:
        eps = [r for r in rows if r["level"] == lv]
        if not eps:
            continue
        bodies = {(r["study_key"], r["level"]): r for r in eps}
        by_level[lv] = {
            "n_endplates": len(eps),
            "any_modic_pct": pct(sum(r["modic_type"] != "0" for r in eps), len(eps)),
            "by_type_pct": {t: pct(sum(r["modic_type"] == t for r in eps), len(eps)) for t in types},
            "edema_pct_of_vertebrae": pct(sum(bool(r["edema_present"]) for r in bodies.values()), len(bodies)),
        }
    studies_with = {r["study_key"] for r in rows if r["modic_type"] != "0"}
    return {
        "n_studies": n_studies,
        "n_endplates": len(rows),
        "studies_with_any_modic_pct": pct(len(studies_with), n_studies),
        "endplates_any_modic_pct": pct(sum(r["modic_type"] != "0" for r in rows), len(rows)),
        "endplates_by_type_pct": {t: pct(sum(r["modic_type"] == t for r in rows), len(rows)) for t in types},
        "by_level": by_level,
        "literature": LITERATURE_NOTE,
        "disclaimer": "Research output, not a medical device; prevalences of automated findings, not diagnoses.",
    }


def write_cohort(out_root: str | Path) -> Path:
    """Write ``cohort.csv``, ``cohort.parquet`` and ``summary.json`` (each atomically) from the reports found there."""
    out_root = Path(out_root)
    reports = list(iter_reports(out_root))
    rows = cohort_rows(reports)
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COHORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    path = out_root / "cohort.csv"
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))
    import pandas as pd

    table = pd.DataFrame(rows, columns=COHORT_COLUMNS)
    pq = _io.BytesIO()
    table.to_parquet(pq, index=False)
    write_bytes_atomic(out_root / "cohort.parquet", pq.getvalue())
    from pipeline.io.atomic import write_json_atomic

    write_json_atomic(out_root / "summary.json", prevalence_summary(rows, len(reports)))
    return path

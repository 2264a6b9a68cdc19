"""Cohort outputs rebuilt from the per-study reports: one row per study x vertebra x endplate."""

from __future__ import annotations

import csv
import io as _io
import json
import logging
from pathlib import Path

from .report import write_bytes_atomic

log = logging.getLogger("modicscan")

COHORT_COLUMNS = [
    "study_key", "level", "endplate", "modic_type", "modic_confidence", "extent_height_pct", "extent_volume_pct",
    "fraction_I", "fraction_II", "fraction_III",
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


def cohort_rows(reports) -> list[dict]:
    rows = []
    for rep in reports:
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


def write_cohort(out_root: str | Path) -> Path:
    """Write ``out_root/cohort.csv`` (atomically) from the reports found there."""
    out_root = Path(out_root)
    rows = cohort_rows(iter_reports(out_root))
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COHORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    path = out_root / "cohort.csv"
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))
    return path

"""Stage 6: the per-study JSON report and the error record — built from typed pieces, free of direct identifiers
unless asked for (validation: :mod:`pipeline.report.schema`; atomic writes: :mod:`pipeline.io.atomic`).
"""

from __future__ import annotations

import datetime as _dt
import functools
import platform
from importlib import metadata
from typing import Any

from pipeline import DISCLAIMER, __version__
from pipeline.io.atomic import finite_json
from pipeline.report.identity import Identity
from pipeline.report.schema import SCHEMA_VERSION
from pipeline.types import RoleAssignment, Segmentation, StudyFiles, Volume, level_value

UNITS = {
    "heights_mm": "mm",
    "volume_mm3": "mm^3",
    "extent_height_pct": "% of the local vertebral body height",
    "extent_volume_pct": "% of the vertebral body volume (edema: of the body's interior, the voxels at least classification.cortex_exclusion_mm from its surface)",
    "ratio": "zone median / study normal-marrow reference median, same sequence (1 = like normal marrow)",
    "signal": "scanner units after DICOM rescale (relative only)",
    "confidence": "0..1, higher is more certain",
    "timings_s": "s",
}


_PACKAGES = ("numpy", "scipy", "pydicom", "nibabel", "scikit-image", "scikit-learn", "jsonschema")


# ---------------------------------------------------------------------------------------------- pieces
@functools.cache
def software_info() -> dict:
    pkgs = {}
    for name in _PACKAGES:
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = "not installed"
    return {"name": "modicscan", "version": __version__, "python": platform.python_version(), "packages": pkgs}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _role_block(roles: RoleAssignment, volumes: dict[str, Volume], resampled: dict[str, bool], identity: Identity) -> dict:
    out: dict[str, Any] = {"T1": None, "T2": None, "STIR": None}
    for role, choice in roles.roles.items():
        vol = volumes.get(role)
        out[role] = {
            "series_uid": identity.uid(choice.series_uid, "series"),
            # Free text: left out when pseudonymising; by default the redactor strips the patient's identifiers
            "series_description": "" if identity.key else choice.series_description,
            "series_number": (vol.meta.get("series_number") if vol is not None else None),
            "confidence": float(choice.confidence),
            "evidence": list(choice.evidence),
            "kind": choice.kind or role,
            "n_slices": int(vol.meta.get("n_slices", vol.shape[2])) if vol is not None else 1,
            "resampled_to_reference": bool(resampled.get(role, False)),
        }
    return out


def _geometry_block(ref: Volume) -> dict:
    return {
        "reference_series": "T2",
        "shape": [int(s) for s in ref.shape],
        "spacing_mm": [round(float(s), 6) for s in ref.spacing],
        "affine_ras": [[round(float(v), 6) for v in row] for row in ref.affine],
        "axcodes": ["I", "P", "R"],
        "convention": (
            "Arrays and masks are stored with axes (superior->inferior, anterior->posterior, left->right); "
            "affine_ras maps voxel indices to RAS+ mm (nibabel convention; DICOM LPS converted with diag(-1,-1,1,1))."
        ),
    }


def _segmentation_block(seg: Segmentation, method: str) -> dict:
    return {
        "method": method,
        "n_bodies": len(seg.bodies),
        "levels_found": [b.level for b in seg.bodies],
        "labelling_confidence": float(seg.labelling_confidence),
        "flags": list(seg.flags),
        "label_values": {b.level: level_value(b.level) for b in seg.bodies},
        "notes": list(seg.notes),
    }


def _level_list(levels: list[str]) -> str:
    if not levels:
        return ""
    return levels[0] if len(levels) == 1 else ", ".join(levels[:-1]) + " and " + levels[-1]


def plain_summary(vertebrae: list[dict], flags: list[dict], fluid_role: str, seg: Segmentation) -> str:
    """One paragraph a researcher can read without opening the tables."""
    levels = [v["level"] for v in vertebrae]
    parts = [
        f"{len(levels)} vertebral bodies were segmented ({levels[0]} to {levels[-1]})"
        if levels else "No vertebral bodies were segmented"
    ]
    if seg.labelling_confidence < 0.6:
        parts[-1] += f"; level labelling is uncertain (confidence {seg.labelling_confidence:.2f})"
    parts[-1] += "."
    modic = [
        f"Modic type {ep['modic_type']} at the {side} endplate of {v['level']}"
        for v in vertebrae for side, ep in v["endplates"].items() if ep["modic_type"] != "0"
    ]
    parts.append(("Findings: " + "; ".join(modic) + ".") if modic else "No Modic changes were detected.")
    edema = [v["level"] for v in vertebrae if v["edema"]["present"]]
    if edema:
        src = "STIR" if fluid_role == "STIR" else "T2 (no STIR series; lower confidence)"
        parts.append(f"Marrow edema was detected at {_level_list(edema)} (from {src}).")
    else:
        parts.append("No marrow edema was detected.")
    if flags:
        parts.append("Flagged for expert review: " + "; ".join(f["message"] for f in flags) + ".")
    parts.append("Automated research output, not a diagnosis.")
    return " ".join(parts)


def build_report(
    *,
    study: StudyFiles,
    identity: Identity,
    config_hash: str,
    config_values: dict,
    input_hash: str,
    n_files: int,
    source_folder: str | None,
    roles: RoleAssignment,
    volumes: dict[str, Volume],
    resampled: dict[str, bool],
    seg: Segmentation,
    seg_method: str,
    findings: Any,
    qc_flags: list[str],
    warnings: list[str],
    timings: dict[str, float],
    single_slice: bool = False,
) -> dict:
    """Assemble the analysed-study report (the shape is fixed by schemas/report.schema.json)."""
    fluid_role = findings.fluid_role
    role_conf = min(c.confidence for c in roles.roles.values())
    confidences = [ep["confidence"] for v in findings.vertebrae for ep in v["endplates"].values()]
    overall = float(min(role_conf, seg.labelling_confidence, (sum(confidences) / len(confidences)) if confidences else 0.0))
    if fluid_role != "STIR":
        overall *= 0.8
    rep = {
        "schema_version": SCHEMA_VERSION,
        "report_type": "modicscan.study_report",
        "status": "analysed",
        "disclaimer": DISCLAIMER,
        "generated_at": _now(),
        "software": software_info(),
        "config": {"hash": config_hash, "values": config_values},
        "study": identity.study_block(study, input_hash, n_files, source_folder),
        "series": _role_block(roles, volumes, resampled, identity),
        "geometry": {**_geometry_block(volumes["T2"]), "single_slice": bool(single_slice)},
        "segmentation": _segmentation_block(seg, seg_method),
        "reference_marrow": findings.reference,
        "vertebrae": findings.vertebrae,
        "discs": findings.discs,
        "flags": findings.flags,
        "qc": {"flags": sorted(set(qc_flags) | set(seg.flags)), "warnings": list(dict.fromkeys(warnings))},
        "confidence": {
            "overall": round(max(0.0, min(1.0, overall)), 3),
            "edema_source": fluid_role,
            "labelling": float(seg.labelling_confidence),
            "roles": float(role_conf),
        },
        "summary": plain_summary(findings.vertebrae, findings.flags, fluid_role, seg),
        "timings_s": {k: round(float(v), 4) for k, v in timings.items()},
        "units": UNITS,
    }
    return finite_json(rep)


def build_error_record(
    *,
    study: StudyFiles,
    identity: Identity,
    config_hash: str,
    config_values: dict,
    input_hash: str,
    n_files: int,
    source_folder: str | None,
    code: str,
    message: str,
    details: dict | None = None,
    warnings: list[str] | None = None,
) -> dict:
    return finite_json({
        "schema_version": SCHEMA_VERSION,
        "report_type": "modicscan.study_error",
        "status": "failed",
        "disclaimer": DISCLAIMER,
        "generated_at": _now(),
        "software": software_info(),
        "config": {"hash": config_hash, "values": config_values},
        "study": identity.study_block(study, input_hash, n_files, source_folder),
        "error": {"code": code, "message": message, "details": details or {}},
        "warnings": list(warnings or []),
    })

"""Stage 6: the per-study JSON report — built from typed pieces, validated against the shipped schema,
written atomically, free of direct identifiers unless asked for.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import hmac
import json
import math
import os
import platform
import tempfile
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import jsonschema

from . import DISCLAIMER, __version__
from .types import RoleAssignment, Segmentation, StudyFiles, Volume, level_value

SCHEMA_VERSION = "1.0.0"
REPORT_SCHEMA = "report.schema.json"
ERROR_SCHEMA = "error.schema.json"

UNITS = {
    "heights_mm": "mm",
    "volume_mm3": "mm^3",
    "extent_height_pct": "% of the local vertebral body height",
    "extent_volume_pct": "% of the vertebral body volume",
    "ratio": "zone median / study normal-marrow reference median, same sequence (1 = like normal marrow)",
    "signal": "scanner units after DICOM rescale (relative only)",
    "confidence": "0..1, higher is more certain",
    "timings_s": "s",
}

_PACKAGES = ("numpy", "scipy", "pydicom", "nibabel", "scikit-image", "scikit-learn", "jsonschema")


# ---------------------------------------------------------------------------------------------- schema
@functools.cache
def load_schema(name: str = REPORT_SCHEMA) -> dict:
    text = resources.files("pipeline").joinpath("schemas", name).read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_errors(obj: Any, name: str | None = None) -> list[str]:
    """Every way ``obj`` breaks its schema, as 'path: message' strings (empty list = valid).

    ``name`` defaults to the schema matching ``obj['report_type']``.
    """
    if name is None:
        rtype = obj.get("report_type") if isinstance(obj, dict) else None
        name = ERROR_SCHEMA if rtype == "modicscan.study_error" else REPORT_SCHEMA
    errors = sorted(_validator(name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]


def validate_report(obj: Any, name: str | None = None) -> None:
    """Raise ``ValueError`` listing the schema violations, if any."""
    errs = schema_errors(obj, name)
    if errs:
        raise ValueError("report does not validate against its schema:\n  " + "\n  ".join(errs[:20]))


# ---------------------------------------------------------------------------------------------- writing
def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: turn them into null so the report stays valid (schema then says where)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # NumPy scalar
        return _finite(obj.item())
    return obj


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid is in the temp name so a later run can remove temp files of killed writers.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete temp files left by writers that were killed mid-write (their pid no longer runs)."""
    import re

    n = 0
    pat = re.compile(r"^\..+?\.(\d+)\.(?:[^.]+\.)?tmp(?:\..*)?$")
    for p in Path(folder).rglob(".*tmp*"):
        m = pat.match(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            p.unlink(missing_ok=True)
            n += 1
    return n


def write_json_atomic(path: str | Path, obj: Any) -> None:
    text = json.dumps(_finite(obj), indent=2, allow_nan=False, ensure_ascii=False)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


# ---------------------------------------------------------------------------------------------- identity
def keyed_hash(value: str, key: str, n: int = 16) -> str:
    """HMAC-SHA256 of ``value`` under ``key``: stable across runs, not reversible without the key."""
    return hmac.new(key.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:n]


def study_key(study_uid: str, pseudonymise_key: str = "") -> str:
    """Name of the study's output folder: a hash of the StudyInstanceUID, never a patient name or ID."""
    if pseudonymise_key:
        return keyed_hash("study:" + study_uid, pseudonymise_key)
    return hashlib.sha256(("modicscan-study:" + study_uid).encode("utf-8")).hexdigest()[:16]


class Identity:
    """Decides which identifiers reach the outputs: removed (default), pseudonymised (HMAC) or original."""

    def __init__(self, pseudonymise_key: str = "", keep_identifiers: bool = False):
        if pseudonymise_key and keep_identifiers:
            raise ValueError("--pseudonymise and --keep-identifiers exclude each other")
        self.key = pseudonymise_key
        self.keep = keep_identifiers

    @property
    def mode(self) -> str:
        return "original" if self.keep else "pseudonymised" if self.key else "removed"

    def uid(self, uid: str, kind: str) -> str | None:
        """Study / series UIDs: kept by default (they are not direct identifiers), hashed when pseudonymising."""
        if self.key:
            return "2.25." + str(int(keyed_hash(f"{kind}:{uid}", self.key, 30), 16))
        return uid

    def patient_id(self, value: str) -> str | None:
        if self.keep:
            return value or None
        if self.key and value:
            return keyed_hash("patient:" + value, self.key)
        return None

    def study_block(self, study: StudyFiles, input_hash: str, n_files: int, source_folder: str | None) -> dict:
        return {
            "key": study_key(study.study_uid, self.key),
            "study_uid": self.uid(study.study_uid, "study"),
            "identifiers": self.mode,
            "patient_id": self.patient_id(study.patient_id),
            "patient_name": (study.patient_name or None) if self.keep else None,
            "study_date": (study.study_date or None) if self.keep else None,
            "input_hash": input_hash,
            "n_files": n_files,
            # Folder names can carry patient names: only with --keep-identifiers.
            "source_folder": source_folder if self.keep else None,
        }


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
            "series_description": choice.series_description,
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
        "geometry": _geometry_block(volumes["T2"]),
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
    return _finite(rep)


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
    return _finite({
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

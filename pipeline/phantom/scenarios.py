"""Phantom scenarios: tissue signals per sequence, finding factors, anatomy constants, the planted
findings of each seed and their normalisation."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

SEQUENCES: tuple[str, ...] = ("T1", "T2", "STIR")


_SEQ_INDEX = {name: i for i, name in enumerate(SEQUENCES)}


# Relative signal per tissue on (T1, T2, STIR).  Orders of magnitude follow the usual lumbar appearance
# (fatty adult marrow bright on T1 / intermediate on T2 / dark on STIR; CSF dark on T1, very bright on
# T2 and STIR; fat very bright on T1 and T2, suppressed on STIR) and were checked by eye against the
# real sagittal scans in ../shared/data/vertebral-bodies.
TISSUES: dict[str, tuple[float, float, float]] = {
    "air": (0.0, 0.0, 0.0),
    "fat": (1.00, 0.80, 0.05),
    "muscle": (0.34, 0.24, 0.16),
    "abdomen": (0.42, 0.45, 0.30),  # bowel / retroperitoneum average, textured
    "marrow": (0.68, 0.46, 0.12),  # normal adult vertebral marrow
    "element_marrow": (0.60, 0.40, 0.12),  # posterior elements: more cortex per voxel
    "cortex": (0.10, 0.08, 0.05),
    "annulus": (0.34, 0.20, 0.22),
    "nucleus": (0.38, 0.86, 0.80),
    "nucleus_degenerated": (0.32, 0.24, 0.24),
    "csf": (0.14, 1.00, 1.00),
    "cord": (0.36, 0.34, 0.22),
    "epidural_fat": (0.90, 0.70, 0.05),
    "ligament": (0.12, 0.10, 0.08),
    "interspinous": (0.45, 0.35, 0.15),
    "vessel": (0.06, 0.05, 0.04),  # flow void (aorta, IVC)
}


# Signal of marrow findings as a factor times normal marrow on (T1, T2, STIR): the Modic definitions
# (I = low / high / high, II = high / iso-high / low, III = low / low / low) with margins well clear of
# the default classification thresholds (0.8 / 1.2 on T1, 1.5 / 0.8 on the fluid sequence).
FINDING_FACTORS: dict[str, tuple[float, float, float]] = {
    "I": (0.55, 1.70, 3.00),
    "II": (1.38, 1.20, 0.45),
    "III": (0.45, 0.50, 0.55),
    "edema": (0.55, 1.60, 3.00),  # fracture / infection bone-marrow edema
}


# Disc signal replacing the nucleus and annulus in discitis (bright on T2 and STIR).
_INFECTED_DISC = (0.30, 0.95, 0.95)


_LEVELS_ALL: tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")


_SACRAL_SEGMENTS: tuple[str, ...] = ("S2", "S3", "S4")


# Nominal posterior body height, AP depth and lateral width (mm), adult lumbar morphometry
# (e.g. Zhou et al. 2000, Spine 25:1501: L1-L5 heights 25-28 mm, depths 33-40 mm, widths 40-50 mm).
_BODY_HEIGHT = {"T11": 23.0, "T12": 24.0, "L1": 25.5, "L2": 26.5, "L3": 27.0, "L4": 27.0, "L5": 26.0,
                "S1": 27.0, "S2": 21.0, "S3": 16.0, "S4": 13.0}


_BODY_DEPTH = {"T11": 30.0, "T12": 32.0, "L1": 34.0, "L2": 36.0, "L3": 38.0, "L4": 39.0, "L5": 38.0,
               "S1": 37.0, "S2": 30.0, "S3": 24.0, "S4": 18.0}


_BODY_WIDTH = {"T11": 38.0, "T12": 40.0, "L1": 42.0, "L2": 44.0, "L3": 47.0, "L4": 49.0, "L5": 50.0,
               "S1": 46.0, "S2": 38.0, "S3": 30.0, "S4": 22.0}


# Tilt of each body's long axis from vertical (deg, + = going down moves posteriorly): lumbar lordosis
# of ~45 deg between L1 and S1 and a sacral slope of ~35-40 deg, increasing along the sacrum.
_BODY_TILT = {"T11": -20.0, "T12": -16.0, "L1": -12.0, "L2": -7.0, "L3": -1.0, "L4": 6.0, "L5": 15.0,
              "S1": 34.0, "S2": 42.0, "S3": 52.0, "S4": 62.0}


# Mid-disc heights (mm) below each level; sacral "discs" are thin remnant lines.
_DISC_GAP = {"T11": 6.0, "T12": 7.0, "L1": 8.0, "L2": 9.0, "L3": 10.0, "L4": 10.5, "L5": 9.5,
             "S1": 1.6, "S2": 1.4, "S3": 1.2}


# Scenario catalogue for seeds 0-3 (other seeds draw a random mix).
SCENARIOS: dict[int, list[dict[str, Any]]] = {
    0: [
        {"kind": "modic", "type": "I", "level": "L4", "endplate": "inferior", "depth_mm": 8.0},
        {"kind": "modic", "type": "I", "level": "L5", "endplate": "superior", "depth_mm": 8.0},
    ],
    1: [
        {"kind": "modic", "type": "II", "level": "L5", "endplate": "inferior", "depth_mm": 8.0},
        {"kind": "modic", "type": "II", "level": "S1", "endplate": "superior", "depth_mm": 8.0},
    ],
    2: [
        {"kind": "modic", "type": "III", "level": "L3", "endplate": "inferior", "depth_mm": 7.0},
        {"kind": "modic", "type": "III", "level": "L4", "endplate": "superior", "depth_mm": 7.0},
        {"kind": "fracture", "level": "L1", "height_loss": 0.3, "edema": True},
    ],
    3: [],
}


SAMPLE_SEEDS: tuple[int, ...] = (0, 1, 2, 3)


_VENDORS: tuple[dict[str, Any], ...] = (
    {
        "manufacturer": "SIEMENS", "model": "Avanto", "field": 1.5, "bits": 12,
        "desc": {"T1": "t1_tse_sag", "T2": "t2_tse_sag", "STIR": "t2_tirm_sag"},
        "desc_axial": {"T1": "t1_tse_tra", "T2": "t2_tse_tra", "STIR": "t2_tirm_tra"},
        "seqname": {"T1": "*tse2d1_3", "T2": "*tse2d1_15", "STIR": "*tir2d1_13"},
        "image_type": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
    },
    {
        "manufacturer": "GE MEDICAL SYSTEMS", "model": "Signa HDxt", "field": 1.5, "bits": 16,
        "desc": {"T1": "SAG T1 FSE", "T2": "SAG T2 FSE", "STIR": "SAG STIR"},
        "desc_axial": {"T1": "AX T1 FSE", "T2": "AX T2 FSE", "STIR": "AX STIR"},
        "seqname": {"T1": "fse-xl", "T2": "fse-xl", "STIR": "fse-ir"},
        "image_type": ["ORIGINAL", "PRIMARY", "OTHER"],
    },
    {
        "manufacturer": "Philips Medical Systems", "model": "Ingenia", "field": 3.0, "bits": 12,
        "desc": {"T1": "T1W_TSE SAG", "T2": "T2W_TSE SAG", "STIR": "STIR SAG"},
        "desc_axial": {"T1": "T1W_TSE TRA", "T2": "T2W_TSE TRA", "STIR": "STIR TRA"},
        "seqname": {"T1": "TSE", "T2": "TSE", "STIR": "IR_TSE"},
        "image_type": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
    },
)


_TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}


def scenario_findings(seed: int) -> list[dict[str, Any]]:
    """The planted findings for ``seed`` when none are given (catalogue for 0-3, random mix otherwise)."""
    if seed in SCENARIOS:
        return [dict(f) for f in SCENARIOS[seed]]
    rng = np.random.default_rng([seed, 7919])
    findings: list[dict[str, Any]] = []
    # Modic changes cluster at the lower two discs; usually both endplates of one disc are involved.
    discs = ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    disc_p = np.array([0.05, 0.08, 0.17, 0.35, 0.35])
    n_modic = int(rng.choice([0, 1, 1, 2]))
    chosen = rng.choice(len(discs), size=n_modic, replace=False, p=disc_p)
    for di in sorted(int(c) for c in chosen):
        upper, lower = discs[di].split("-")
        mtype = str(rng.choice(["I", "II", "III", "I/II", "II/III"], p=[0.35, 0.35, 0.1, 0.12, 0.08]))
        depth = float(np.round(rng.uniform(6.0, 10.0), 1))
        sides = rng.choice(["both", "upper", "lower"], p=[0.6, 0.2, 0.2])
        if sides in ("both", "upper"):
            findings.append({"kind": "modic", "type": mtype, "level": upper, "endplate": "inferior", "depth_mm": depth})
        if sides in ("both", "lower"):
            findings.append({"kind": "modic", "type": mtype, "level": lower, "endplate": "superior", "depth_mm": depth})
    used = {f["level"] for f in findings}
    if rng.random() < 0.2:
        free = [lv for lv in ("L1", "L2", "L3") if lv not in used]
        if free:
            lv = str(rng.choice(free))
            findings.append({"kind": "fracture", "level": lv, "height_loss": float(np.round(rng.uniform(0.2, 0.4), 2)),
                             "edema": bool(rng.random() < 0.8)})
            used.add(lv)
    if rng.random() < 0.08:
        free_discs = [d for d in discs[:4] if not (set(d.split("-")) & used)]
        if free_discs:
            findings.append({"kind": "infection", "disc": str(rng.choice(free_discs))})
    return findings


_MODIC_TYPES = ("I", "II", "III", "I/II", "II/III")


_BODY_LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")


def normalise_findings(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate finding dicts and fill defaults; raises ValueError naming the bad entry."""
    out: list[dict[str, Any]] = []
    for i, f in enumerate(findings):
        if not isinstance(f, dict) or "kind" not in f:
            raise ValueError(f"finding #{i} must be a dict with a 'kind' key, got {f!r}")
        kind = f["kind"]
        g = dict(f)
        if kind == "modic":
            if g.get("type") not in _MODIC_TYPES:
                raise ValueError(f"finding #{i}: Modic type must be one of {_MODIC_TYPES}, got {g.get('type')!r}")
            if g.get("level") not in _BODY_LEVELS:
                raise ValueError(f"finding #{i}: level must be one of {_BODY_LEVELS}, got {g.get('level')!r}")
            if g.get("endplate") not in ("inferior", "superior"):
                raise ValueError(f"finding #{i}: endplate must be 'inferior' or 'superior', got {g.get('endplate')!r}")
            if g["level"] == "S1" and g["endplate"] == "inferior":
                raise ValueError(f"finding #{i}: S1 has no free inferior endplate in this phantom")
            g["depth_mm"] = float(g.get("depth_mm", 8.0))
            if not 2.0 <= g["depth_mm"] <= 15.0:
                raise ValueError(f"finding #{i}: depth_mm must be within 2..15 mm, got {g['depth_mm']}")
        elif kind == "fracture":
            if g.get("level") not in _BODY_LEVELS[:-1]:
                raise ValueError(f"finding #{i}: fracture level must be one of {_BODY_LEVELS[:-1]}, got {g.get('level')!r}")
            g["height_loss"] = float(g.get("height_loss", 0.3))
            if not 0.05 <= g["height_loss"] <= 0.6:
                raise ValueError(f"finding #{i}: height_loss must be within 0.05..0.6, got {g['height_loss']}")
            g["edema"] = bool(g.get("edema", True))
        elif kind == "infection":
            disc = g.get("disc", "")
            parts = disc.split("-") if isinstance(disc, str) else []
            if len(parts) != 2 or parts[0] not in _BODY_LEVELS or parts[1] not in _BODY_LEVELS or \
                    _BODY_LEVELS.index(parts[1]) != _BODY_LEVELS.index(parts[0]) + 1:
                raise ValueError(f"finding #{i}: infection disc must name two adjacent levels like 'L4-L5', got {disc!r}")
            g["depth_mm"] = float(g.get("depth_mm", 12.0))
        else:
            raise ValueError(f"finding #{i}: unknown kind {kind!r} (modic, fracture, infection)")
        out.append(g)
    return out

"""Synthetic lumbar spine MRI studies with known truth (DICOM files + NIfTI labels + findings JSON).

The phantom is an analytic 3-D model of the lumbar spine evaluated on the acquisition grid:

* Anatomy lives in *model millimetres* ``(s, a, x)``: ``s`` runs superior -> inferior from the top of the
  field of view, ``a`` anterior -> posterior from the anterior edge of the field of view, ``x`` is the
  lateral offset from the mid-sagittal plane, positive to the patient's Right.  An array indexed
  ``[s, a, x]`` with increasing coordinates is exactly the working frame ``("I", "P", "R")`` of
  ``pipeline.types``; sagittal slices are ``[:, :, k]`` and axial slices are ``[k, :, :]``.
* Every structure is a soft-edged solid (a signed distance in mm turned into a 0..1 occupancy), painted
  in anatomical order (torso, fat, muscle, canal, posterior elements, discs, bodies, marrow findings)
  into three images at once (T1, T2, STIR), each tissue carrying its relative signal per sequence.
* Vertebral bodies are rounded boxes in their own tilted frame (lumbar lordosis), with concave endplates,
  an anterior waist, a dark cortical rim and a kidney-shaped axial section (so lateral slices show a
  narrower body and the outermost slices none).  Discs fill the space between two endplate planes
  (so lordotic discs are wedge shaped), with a nucleus whose T2 signal drops when degenerated.
* Findings are painted into the marrow: a Modic band of ``depth_mm`` next to an endplate (following its
  concave shape), whole-body edema plus wedge collapse for a fracture, edema on both sides of a bright
  disc for infection.  Signal of a finding is a factor times the study's normal marrow on each sequence,
  so the expected contrast holds whatever the study's intensity scale.
* Acquisition effects: coil shading (posterior surface coil), mild in-plane blur (partial volume),
  Rician noise, 12-bit unsigned storage; optionally RescaleSlope / Intercept, compressed transfer
  syntaxes and the enhanced multi-frame IOD.

Everything is a pure function of the seed and the options: rerunning writes byte-identical files
(UIDs come from ``generate_uid(entropy_srcs=...)``; no clock is read).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

from .types import level_value

__all__ = [
    "SEQUENCES",
    "SCENARIOS",
    "TISSUES",
    "FINDING_FACTORS",
    "SAMPLE_SEEDS",
    "make_study",
    "make_sample_data",
    "cli_phantom",
    "scenario_findings",
    "normalise_findings",
]

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


# --------------------------------------------------------------------------------------------------
# Findings: catalogue, validation
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------------

@dataclass
class _Body:
    name: str
    label: int  # value in the truth label image (0 for fused sacral segments)
    cs: float  # centre, model mm
    ca: float
    theta: float  # tilt (rad), + = going down moves posteriorly
    height: float  # posterior height (mm)
    depth: float  # AP depth (mm)
    width: float  # lateral width (mm)
    concavity: float = 1.2  # endplate concavity at the centre (mm)
    waist: float = 1.0  # anterior surface concavity (mm)
    rim: float = 1.3  # cortical rim thickness (mm)
    wedge: float = 0.0  # fraction of height lost anteriorly at the superior endplate (fracture)
    bands: list[dict[str, Any]] = field(default_factory=list)  # marrow findings next to an endplate
    whole_edema: bool = False

    @property
    def t(self) -> np.ndarray:  # downward axis in (s, a)
        return np.array([math.cos(self.theta), math.sin(self.theta)])

    @property
    def n(self) -> np.ndarray:  # posterior axis in (s, a)
        return np.array([-math.sin(self.theta), math.cos(self.theta)])

    def point(self, u: float, v: float) -> np.ndarray:
        return np.array([self.cs, self.ca]) + u * self.t + v * self.n


@dataclass
class _Disc:
    upper: _Body
    lower: _Body
    degenerated: bool = False
    infected: bool = False
    remnant: bool = False  # fused sacral disc remnant: a thin dark line


@dataclass
class _Anatomy:
    bodies: list[_Body]
    discs: list[_Disc]
    a_ant_skin: float
    post_depth: float  # canal centre -> posterior skin (mm)
    fat_post: float
    fat_ant: float
    canal_ap: float
    sac_ap: float
    aorta_x: float


def _build_anatomy(rng: np.random.Generator, fov_mm: float, findings: list[dict[str, Any]]) -> _Anatomy:
    size = float(rng.normal(1.0, 0.04))
    lordosis = float(rng.uniform(0.8, 1.2))
    tilt0 = float(rng.uniform(-4.0, 4.0))
    frac = {f["level"]: f for f in findings if f["kind"] == "fracture"}
    degenerate_discs: set[str] = set()
    for f in findings:
        if f["kind"] == "modic":
            i = _LEVELS_ALL.index(f["level"])
            degenerate_discs.add(f["level"] if f["endplate"] == "inferior" else _LEVELS_ALL[i - 1])
    infected = {f["disc"].split("-")[0] for f in findings if f["kind"] == "infection"}
    names = list(_LEVELS_ALL) + list(_SACRAL_SEGMENTS)
    bodies: list[_Body] = []
    for name in names:
        label = level_value(name) if name in _LEVELS_ALL else 0
        jit = rng.normal(1.0, 0.03, size=3)
        b = _Body(
            name=name, label=label, cs=0.0, ca=0.0,
            theta=math.radians(_BODY_TILT[name] * lordosis + tilt0 + rng.normal(0.0, 1.0)),
            height=_BODY_HEIGHT[name] * size * jit[0], depth=_BODY_DEPTH[name] * size * jit[1],
            width=_BODY_WIDTH[name] * size * jit[2],
            concavity=float(rng.uniform(0.8, 1.6)) if name in _LEVELS_ALL else 0.3,
        )
        if name in frac:
            b.wedge = frac[name]["height_loss"]
            b.whole_edema = frac[name]["edema"]
        bodies.append(b)
    # Chain the bodies bottom-up from S1 so that a wedge fracture tips everything above it forward.
    gaps = {}
    for name in names[:-1]:
        g = _DISC_GAP[name] * size * float(rng.normal(1.0, 0.06))
        if name in degenerate_discs:
            g *= 0.6  # degenerated discs at Modic levels lose height
        gaps[name] = g
    # Anchor: L5-S1 disc centre at fov/2 + 64 mm (S-I) so that T12 (partly) to S3/S4 fit a 280 mm FOV;
    # AP position set after chaining (L3 centre slightly anterior of the FOV centre).
    i_s1 = names.index("S1")
    s1 = bodies[i_s1]
    s1.cs, s1.ca = 0.0, 0.0
    extra_tilt = 0.0
    for i in range(i_s1 - 1, -1, -1):
        lower, upper = bodies[i + 1], bodies[i]
        upper.theta += extra_tilt
        if lower.wedge > 0:
            k = lower.wedge * lower.height / lower.depth
            upper.theta += math.atan(k)
            extra_tilt += math.atan(k)
        top_mid = lower.point(-lower.height / 2 + lower.wedge * lower.height * 0.5, 0.0)
        tm = 0.5 * (upper.theta + lower.theta)
        mid_dir = np.array([math.cos(tm), math.sin(tm)])
        c = top_mid - gaps[upper.name] * mid_dir - (upper.height / 2) * upper.t
        upper.cs, upper.ca = float(c[0]), float(c[1])
    for i in range(i_s1 + 1, len(bodies)):
        upper, lower = bodies[i - 1], bodies[i]
        bot_mid = upper.point(upper.height / 2, 0.0)
        tm = 0.5 * (upper.theta + lower.theta)
        c = bot_mid + gaps[upper.name] * np.array([math.cos(tm), math.sin(tm)]) + (lower.height / 2) * lower.t
        lower.cs, lower.ca = float(c[0]), float(c[1])
    l5, l3 = bodies[names.index("L5")], bodies[names.index("L3")]
    ls_disc = 0.5 * (l5.point(l5.height / 2, 0) + s1.point(-s1.height / 2, 0))
    shift_s = fov_mm / 2 + 64.0 + rng.uniform(-8, 8) - ls_disc[0]
    shift_a = fov_mm / 2 - 14.0 + rng.uniform(-6, 6) - l3.ca
    for b in bodies:
        b.cs += shift_s
        b.ca += shift_a
    # Marrow findings.
    by_name = {b.name: b for b in bodies}
    for f in findings:
        if f["kind"] == "modic":
            by_name[f["level"]].bands.append({"endplate": f["endplate"], "type": f["type"], "depth": f["depth_mm"]})
        elif f["kind"] == "infection":
            up, lo = f["disc"].split("-")
            by_name[up].bands.append({"endplate": "inferior", "type": "edema", "depth": f["depth_mm"]})
            by_name[lo].bands.append({"endplate": "superior", "type": "edema", "depth": f["depth_mm"]})
    discs = []
    for i in range(len(bodies) - 1):
        up = bodies[i]
        discs.append(_Disc(up, bodies[i + 1], degenerated=up.name in degenerate_discs or up.name == "S1",
                           infected=up.name in infected, remnant=up.name in ("S1", "S2", "S3")))
    return _Anatomy(
        bodies=bodies, discs=discs,
        a_ant_skin=float(l3.ca - l3.depth / 2 - rng.uniform(90.0, 125.0)),
        post_depth=float(rng.uniform(75.0, 95.0)),
        fat_post=float(rng.uniform(10.0, 30.0)),
        fat_ant=float(rng.uniform(12.0, 35.0)),
        canal_ap=float(rng.uniform(14.0, 18.0)),
        sac_ap=float(rng.uniform(10.0, 13.0)),
        aorta_x=float(rng.uniform(-24.0, -17.0)),
    )


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

class _Canvas:
    """Three images (T1, T2, STIR) on a grid given by 1-D model coordinates per axis, plus labels."""

    def __init__(self, s: np.ndarray, a: np.ndarray, x: np.ndarray):
        self.s, self.a, self.x = (np.asarray(c, dtype=np.float32) for c in (s, a, x))
        shape = (len(s), len(a), len(x))
        self.img = np.zeros((3,) + shape, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.int16)
        self.step = float(min(abs(s[1] - s[0]) if len(s) > 1 else 1, abs(a[1] - a[0]) if len(a) > 1 else 1))

    def block(self, s_rng: tuple[float, float], a_rng: tuple[float, float], x_rng: tuple[float, float]):
        """Index slices of the sub-grid inside the given model-mm ranges (None when empty) + broadcast coords."""
        out = []
        for coords, (lo, hi) in zip((self.s, self.a, self.x), (s_rng, a_rng, x_rng), strict=True):
            idx = np.nonzero((coords >= lo) & (coords <= hi))[0]
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        sl = tuple(out)
        S = self.s[sl[0]][:, None, None]
        A = self.a[sl[1]][None, :, None]
        X = self.x[sl[2]][None, None, :]
        return sl, S, A, X

    def full(self):
        return self.block((-1e9, 1e9), (-1e9, 1e9), (-1e9, 1e9))

    def paint(self, sl, occ: np.ndarray, values, texture: np.ndarray | None = None) -> None:
        """Blend tissue ``values`` (3 numbers, or 3 arrays) into the block with occupancy ``occ``."""
        occ = np.asarray(occ, dtype=np.float32)
        for q in range(3):
            v = values[q]
            if texture is not None:
                v = v * texture
            region = self.img[q][sl]
            region += occ * (np.float32(v) - region) if np.isscalar(v) else occ * (v - region)


def _occ(sd: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Signed distance (mm, + inside) -> partial-volume occupancy 0..1 over ~``soft`` mm."""
    return np.clip(0.5 + sd / soft, 0.0, 1.0).astype(np.float32)


def _rounded_box_sd(d1: np.ndarray, d2: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (+ inside) of a box given the distances to its two pairs of sides, corners rounded by r."""
    e1 = r - d1
    e2 = r - d2
    outside = np.sqrt(np.maximum(e1, 0) ** 2 + np.maximum(e2, 0) ** 2)
    inside = np.minimum(np.maximum(e1, e2), 0)
    return r - outside - inside


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], corr_vox: float) -> np.ndarray:
    """Smooth random field, zero mean / unit std, correlation length ~corr_vox voxels (cheap: coarse grid + zoom)."""
    factor = max(1, int(corr_vox // 2))
    coarse = tuple(max(2, int(math.ceil(n / factor)) + 2) for n in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma=max(corr_vox / factor / 2, 0.7))
    zoom = [(n + 2 * factor) / c for n, c in zip(shape, coarse, strict=True)]
    big = ndimage.zoom(f, zoom, order=1)[tuple(slice(factor, factor + n) for n in shape)]
    big = big[tuple(slice(0, n) for n in shape)]
    if big.shape != shape:  # guard against rounding in zoom
        big = np.pad(big, [(0, n - m) for n, m in zip(shape, big.shape, strict=True)], mode="edge")
    big -= big.mean()
    return (big / (big.std() + 1e-6)).astype(np.float32)


def _body_local(b: _Body, S, A):
    ct, st = math.cos(b.theta), math.sin(b.theta)
    dS = S - b.cs
    dA = A - b.ca
    return dS * ct + dA * st, -dS * st + dA * ct


def _body_surfaces(b: _Body, u, v, X):
    """Endplate positions u_top(v), u_bot(v) and AP limits v_ant, v_post for a body in its local frame."""
    half_d = b.depth / 2
    cup = b.concavity * np.clip(1 - (v / half_d) ** 2, 0, 1)
    u_top = -b.height / 2 + cup
    if b.wedge > 0:  # anterior collapse of the superior endplate, linear to zero at the posterior wall
        u_top = u_top + b.wedge * b.height * np.clip((half_d - v) / b.depth, 0, 1)
    u_bot = b.height / 2 - cup
    # kidney-shaped axial section: the anterior wall recedes laterally
    lat = np.clip(1 - np.abs(X / (b.width / 2)) ** 2.2, 0, 1) ** 0.5
    v_post = half_d - 1.5 * (X / (b.width / 2)) ** 2
    v_ant = v_post - b.depth * lat + b.waist * np.clip(1 - (2 * u / b.height) ** 2, 0, 1)
    return u_top, u_bot, v_ant, v_post


def _paint_body(cv: _Canvas, b: _Body, marrow_tex: np.ndarray, band_noise: np.ndarray) -> None:
    r = math.hypot(b.height, b.depth) / 2 + 4
    blk = cv.block((b.cs - r, b.cs + r), (b.ca - r, b.ca + r), (-b.width / 2 - 2, b.width / 2 + 2))
    if blk is None:
        return
    sl, S, A, X = blk
    u, v = _body_local(b, S, A)
    u_top, u_bot, v_ant, v_post = _body_surfaces(b, u, v, X)
    d_vert = np.minimum(u - u_top, u_bot - u)
    d_ap = np.minimum(v - v_ant, v_post - v)
    sd = _rounded_box_sd(d_vert, d_ap, 3.0)
    sd = np.minimum(sd, (b.width / 2 - np.abs(X)) * 2.0)
    occ = _occ(sd, cv.step)
    cv.paint(sl, occ, TISSUES["cortex"])
    marrow_occ = _occ(sd - b.rim, cv.step)
    tex = marrow_tex[sl]
    base = np.array(TISSUES["marrow"], dtype=np.float32)
    cv.paint(sl, marrow_occ, base, texture=tex)
    if b.label:
        region = cv.labels[sl]
        region[occ >= 0.5] = b.label
    for band in b.bands:
        # distance into the marrow from the endplate, following the endplate's concave shape
        from_plate = (u - u_top) if band["endplate"] == "superior" else (u_bot - u)
        depth = band["depth"] * (1.0 + 0.12 * band_noise[sl])
        # cover most of the endplate: taper over the outer 15 % of the AP depth and lateral width
        v_mid = 0.5 * (v_ant + v_post)
        half_ap = 0.5 * (v_post - v_ant)
        cover = np.minimum(0.85 * half_ap - np.abs(v - v_mid), (0.8 * b.width / 2 - np.abs(X)))
        band_occ = _occ(depth - from_plate, 1.5) * _occ(cover, 2.0) * marrow_occ
        for mtype, weight in _band_types(band["type"], band_noise[sl]):
            cv.paint(sl, band_occ * weight, base * np.array(FINDING_FACTORS[mtype], dtype=np.float32), texture=tex)
    if b.whole_edema:
        cv.paint(sl, marrow_occ, base * np.array(FINDING_FACTORS["edema"], dtype=np.float32), texture=tex)


def _band_types(mtype: str, noise: np.ndarray):
    """Split a mixed band (``I/II``) into two patchy halves using the smooth noise field."""
    if "/" not in mtype:
        return [(mtype, 1.0)]
    a, b = mtype.split("/")
    w = np.clip(0.5 + noise, 0, 1).astype(np.float32)
    return [(a, w), (b, 1.0 - w)]


def _paint_disc(cv: _Canvas, d: _Disc) -> None:
    up, lo = d.upper, d.lower
    c = 0.5 * (up.point(up.height / 2, 0) + lo.point(-lo.height / 2, 0))
    depth = 0.5 * (up.depth + lo.depth)
    width = 0.5 * (up.width + lo.width)
    r = depth / 2 + 14
    blk = cv.block((c[0] - r, c[0] + r), (c[1] - r, c[1] + r), (-width / 2 - 2, width / 2 + 2))
    if blk is None:
        return
    sl, S, A, X = blk
    u1, v1 = _body_local(up, S, A)
    u2, v2 = _body_local(lo, S, A)
    _, u_bot, _, _ = _body_surfaces(up, u1, v1, X)
    u_top, _, _, _ = _body_surfaces(lo, u2, v2, X)
    a1 = u1 - u_bot  # below the upper body's inferior endplate
    a2 = u_top - u2  # above the lower body's superior endplate
    tm = 0.5 * (up.theta + lo.theta)
    vm = -(S - c[0]) * math.sin(tm) + (A - c[1]) * math.cos(tm)
    lat = np.clip(1 - np.abs(X / (width / 2)) ** 2.2, 0, 1) ** 0.5
    bulge = 1.2 if d.degenerated else 0.6  # degenerated discs bulge a little more posteriorly
    v_post = depth / 2 + bulge - 1.5 * (X / (width / 2)) ** 2
    v_ant = v_post - (depth + 1.2) * lat
    overlap = 2.5  # run under the bodies; they are painted on top and their edges blend into the disc
    sd = np.minimum(np.minimum(a1 + overlap, a2 + overlap), np.minimum(vm - v_ant, v_post - vm))
    sd = np.minimum(sd, (width / 2 - np.abs(X)) * 2.0)
    occ = _occ(sd, cv.step)
    if d.remnant:
        cv.paint(sl, occ, TISSUES["annulus"] if d.upper.name != "S1" else TISSUES["nucleus_degenerated"])
        return
    cv.paint(sl, occ, _INFECTED_DISC if d.infected else TISSUES["annulus"])
    # nucleus: ellipsoid in (fraction across the disc height, AP, lateral), slightly posterior
    tau = np.clip(a1, 0, None) / np.maximum(np.clip(a1, 0, None) + np.clip(a2, 0, None), 1e-3)
    q = ((tau - 0.5) / 0.36) ** 2 + ((vm - 0.06 * depth) / (0.33 * depth)) ** 2 + (X / (0.33 * width)) ** 2
    inside = (a1 > 0) & (a2 > 0)
    n_occ = np.where(inside, np.clip((1 - np.sqrt(q)) * 4.0, 0, 1), 0).astype(np.float32) * occ
    if d.infected:
        nucleus = _INFECTED_DISC
    elif d.degenerated:
        nucleus = TISSUES["nucleus_degenerated"]
    else:
        nucleus = TISSUES["nucleus"]
    cv.paint(sl, n_occ, nucleus)
    if not (d.infected or d.degenerated):
        # intranuclear cleft: the thin dark horizontal band of adult discs on T2
        cleft = n_occ * _occ(0.6 - np.abs(tau - 0.5) * (a1 + a2), 0.8) * 0.6
        cv.paint(sl, cleft, TISSUES["annulus"])


def _spine_curves(anat: _Anatomy):
    """Posterior-wall line of the column and its tilt as functions of s (model mm), for the canal etc."""
    pts = []
    for b in anat.bodies:
        for uu in np.linspace(-b.height / 2, b.height / 2, 5):
            p = b.point(float(uu), b.depth / 2)
            pts.append((p[0], p[1], b.theta))
    pts.sort()
    ps = np.array([p[0] for p in pts])
    pa = np.array([p[1] for p in pts])
    pt = np.array([p[2] for p in pts])
    return ps, pa, pt


def _interp(s: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp with linear extrapolation beyond the ends (the column continues above T11)."""
    out = np.interp(s, xp, fp)
    lo_slope = (fp[1] - fp[0]) / max(xp[1] - xp[0], 1e-6)
    hi_slope = (fp[-1] - fp[-2]) / max(xp[-1] - xp[-2], 1e-6)
    out = np.where(s < xp[0], fp[0] + (s - xp[0]) * lo_slope, out)
    return np.where(s > xp[-1], fp[-1] + (s - xp[-1]) * hi_slope, out)


def _render(anat: _Anatomy, cv: _Canvas, rng: np.random.Generator) -> None:
    sl, S, A, X = cv.full()
    shape = cv.labels.shape
    px = cv.step
    corr = max(2.0, 6.0 / px)
    tex_abd = _smooth_field(rng, shape, max(2.0, 9.0 / px))
    tex_gas = _smooth_field(rng, shape, max(2.0, 5.0 / px))
    # marrow: gentle large-scale variation plus fine trabecular / fatty-focus grain (CV ~8 %, as on the real T1
    # scans); the fine grain averages out over a zone, so zone medians of normal marrow stay within a few %
    tex_marrow = 1.0 + 0.03 * _smooth_field(rng, shape, corr) + 0.07 * _smooth_field(rng, shape, max(1.0, 1.5 / px))
    band_noise = _smooth_field(rng, shape, max(2.0, 4.0 / px))

    ps, pa, pt = _spine_curves(anat)
    s1 = cv.s
    wall = _interp(s1, ps, pa)  # posterior wall of the column (a, mm) per row
    theta = np.interp(s1, ps, pt)
    sec = 1.0 / np.cos(np.clip(theta, -1.3, 1.3))  # horizontal widths of tilted tubes grow by 1/cos
    canal_c = wall + (1.0 + anat.canal_ap / 2) * sec
    canal_half = anat.canal_ap / 2 * sec
    post_skin = _smooth1d(canal_c + anat.post_depth, 25.0 / px)
    by_name = {b.name: b for b in anat.bodies}
    # the lumbar back is lordotic but the skin is smoother; the abdomen wall sags a little
    ant_skin = anat.a_ant_skin + 8.0 * np.sin(np.clip((s1 - by_name["L1"].cs) / 200.0, -1, 1) * math.pi)
    ant_skin = np.broadcast_to(ant_skin.astype(np.float32), s1.shape)

    def col(arr):  # per-row function -> broadcastable array
        return np.asarray(arr, dtype=np.float32)[:, None, None]

    # torso (abdomen texture), then subcutaneous fat, then muscle compartment behind the column
    # torso: AP between the skins, laterally an ellipse ~300 mm wide (only axial views reach its sides)
    torso_half_w = 150.0 * np.sqrt(np.clip(1 - ((A - col(0.5 * (ant_skin + post_skin))) / col(0.62 * (post_skin - ant_skin))) ** 2, 0, 1))
    torso = _occ(np.minimum(np.minimum(A - col(ant_skin), col(post_skin) - A), torso_half_w - np.abs(X)), px)
    abd = np.array(TISSUES["abdomen"], dtype=np.float32)
    gas = _occ((tex_gas - 2.3) * 3.0, 1.0)  # scattered bowel gas: no signal
    cv.paint(sl, torso, abd, texture=np.clip(1.0 + 0.25 * tex_abd, 0.3, None) * (1.0 - gas))
    fat_occ = torso * np.maximum(_occ(col(ant_skin) + anat.fat_ant - A, 2.0), _occ(A - (col(post_skin) - anat.fat_post), 2.0))
    cv.paint(sl, fat_occ, TISSUES["fat"], texture=1.0 + 0.04 * tex_abd)
    # paraspinal muscles from the column back to the posterior fat; midline gets interspinous tissue
    back = _occ(A - (col(wall) - 2.0), px) * _occ(col(post_skin) - anat.fat_post - A, 2.0)
    cv.paint(sl, back, TISSUES["muscle"], texture=1.0 + 0.05 * tex_abd)
    mid = back * _occ(5.0 - np.abs(X), px) * _occ(A - col(canal_c + canal_half), px)
    cv.paint(sl, mid * 0.8, TISSUES["interspinous"], texture=1.0 + 0.2 * tex_abd)
    # psoas: grows from L1 down to L5, lateral to the bodies
    l1, l5 = by_name["L1"], by_name["L5"]
    grow = np.clip((s1 - l1.cs) / max(l5.cs - l1.cs, 1.0), 0, 1.2)
    psoas_r = col(6.0 + 16.0 * grow)
    psoas_a = col(wall - 28.0 * sec)
    psoas_x = col(26.0 + 10.0 * grow)
    psoas_sd = psoas_r - np.sqrt((A - psoas_a) ** 2 + (np.abs(X) - psoas_x) ** 2)
    psoas_sd = np.where(((s1 > l1.cs - 20) & (s1 < by_name["S1"].cs))[:, None, None], psoas_sd, -10)
    cv.paint(sl, _occ(psoas_sd, px), TISSUES["muscle"])
    # aorta (left of midline, down to L4 where it divides) and IVC (right), anterior to the column
    ant_wall = _interp(s1, *_anterior_wall(anat))
    for xc, rad, end in ((anat.aorta_x, 10.0, by_name["L4"].cs), (18.0, 8.0, by_name["L5"].cs)):
        sd_v = rad - np.sqrt((A - col(ant_wall - rad - 2.0)) ** 2 + (X - xc) ** 2)
        sd_v = np.minimum(sd_v, col(end - s1))
        cv.paint(sl, _occ(sd_v, px), TISSUES["vessel"])
    # spinal canal: epidural fat, dural sac (CSF) ending at S2, conus above L1/L2
    in_canal = _occ(col(canal_half) - np.abs(A - col(canal_c)), px) * _occ(11.0 - np.abs(X), px)
    cv.paint(sl, in_canal, TISSUES["epidural_fat"])
    sac_end = by_name["S2"].cs
    sac_half = np.where(s1 < sac_end, anat.sac_ap / 2, 0.0) * np.clip((sac_end - s1) / 15.0, 0, 1) * sec
    sac = _occ(col(sac_half) - np.abs(A - col(canal_c - 1.0 * sec)), px) * _occ(8.0 - np.abs(X), px) * in_canal
    cv.paint(sl, sac, TISSUES["csf"])
    conus_half = np.clip((by_name["L1"].cs + 10 - s1) / 25.0, 0, 1) * 4.0 * sec
    cord = _occ(col(conus_half) - np.abs(A - col(canal_c - 1.0 * sec)), px) * _occ(4.5 - np.abs(X), px) * sac
    cv.paint(sl, cord, TISSUES["cord"])
    # cauda equina: a few roots layered in the dependent (posterior) sac below the conus, dark on T2
    below_conus = col(np.clip((s1 - by_name["L1"].cs - 5.0) / 20.0, 0, 1) * (s1 < sac_end - 10))
    for xr, ar in ((-3.0, 0.25), (2.5, 0.35), (-0.5, 0.55), (4.0, 0.6)):
        root_sd = 0.8 - np.sqrt((A - col(canal_c - 1.0 * sec + ar * sac_half)) ** 2 + (X - xr) ** 2)
        cv.paint(sl, _occ(root_sd, px) * below_conus * sac, TISSUES["cord"])
    # urinary bladder in the pelvis, anterior to the lower sacrum (fluid: dark T1, bright T2 / STIR)
    s2 = by_name["S2"]
    bl_c = (s2.cs + 35.0, s2.ca - 85.0)
    bl = 1.0 - np.sqrt(((S - bl_c[0]) / 35.0) ** 2 + ((A - bl_c[1]) / 40.0) ** 2 + (X / 55.0) ** 2)
    cv.paint(sl, _occ(bl * 35.0, px) * torso, TISSUES["csf"])
    # posterior elements (laminae + spinous processes) of T11..L5
    for b in anat.bodies:
        if b.name in ("T11", "T12", "L1", "L2", "L3", "L4", "L5"):
            _paint_pedicles(cv, b, anat.canal_ap, tex_marrow)
            _paint_arch(cv, b, canal_c, canal_half, tex_marrow)
    for d in anat.discs:
        _paint_disc(cv, d)
    for b in anat.bodies:
        _paint_body(cv, b, tex_marrow, band_noise)


def _anterior_wall(anat: _Anatomy):
    pts = []
    for b in anat.bodies:
        for uu in np.linspace(-b.height / 2, b.height / 2, 5):
            p = b.point(float(uu), -b.depth / 2)
            pts.append((p[0], p[1]))
    pts.sort()
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _smooth1d(y: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter1d(np.asarray(y, dtype=np.float32), sigma=max(sigma, 0.5), mode="nearest")


def _paint_pedicles(cv: _Canvas, b: _Body, canal_ap: float, tex) -> None:
    """Parasagittal posterior column: foraminal fat with the exiting root, pedicle, articular pillar + facet joint."""
    r = b.depth / 2 + canal_ap + 24
    blk = cv.block((b.cs - r, b.cs + r), (b.ca - r, b.ca + r), (-28, 28))
    if blk is None:
        return
    sl, S, A, X = blk
    u, v = _body_local(b, S, A)
    ax = np.abs(X)
    h2, d2 = b.height / 2, b.depth / 2
    lateral = np.minimum(ax - 9.0, 22.0 - ax)
    # neural foramen: fat between the pedicles, behind the body and disc
    foramen = np.minimum(_rounded_box_sd(np.minimum(u + h2 + 5, h2 + 5 - u), np.minimum(v - d2 + 1, d2 + canal_ap + 2 - v), 2.0),
                         lateral)
    cv.paint(sl, _occ(foramen, cv.step), TISSUES["epidural_fat"])
    root = 2.5 - np.sqrt((u - 0.25 * h2) ** 2 + (v - d2 - 5.0) ** 2)
    cv.paint(sl, _occ(np.minimum(root, np.minimum(ax - 12.0, 21.0 - ax)), cv.step), TISSUES["cord"])
    # pedicle from the upper half of the body's posterior wall, then the articular pillar spanning the disc
    pedicle = _rounded_box_sd(np.minimum(u + h2 - 1.0, 0.0 - u), np.minimum(v - d2 + 3, d2 + canal_ap + 4 - v), 2.5)
    pillar = _rounded_box_sd(np.minimum(u + h2 + 2.0, h2 + 6.0 - u),
                             np.minimum(v - d2 - canal_ap + 1, d2 + canal_ap + 17 - v), 3.0)
    bone = np.maximum(np.minimum(pedicle, lateral), np.minimum(pillar, np.minimum(ax - 10.0, 26.0 - ax)))
    cv.paint(sl, _occ(bone, cv.step), TISSUES["cortex"])
    cv.paint(sl, _occ(bone - 1.2, cv.step), TISSUES["element_marrow"], texture=tex[sl])
    # facet joint line between this pillar and the next one down
    facet = np.minimum(np.minimum(1.0 - np.abs(u - h2 - 3.0), np.minimum(v - d2 - canal_ap, d2 + canal_ap + 16 - v)),
                       np.minimum(ax - 11.0, 25.0 - ax))
    cv.paint(sl, _occ(facet, cv.step) * 0.9, TISSUES["annulus"])


def _paint_arch(cv: _Canvas, b: _Body, canal_c, canal_half, tex) -> None:
    """Lamina + spinous process as a rounded slab pointing posteriorly and a little caudally."""
    i_row = int(np.argmin(np.abs(cv.s - (b.cs + 0.1 * b.height))))
    root_a = float(canal_c[i_row] + canal_half[i_row])
    root = np.array([b.cs + 0.1 * b.height, root_a])
    phi = b.theta * 0.5 + math.radians(14.0)  # caudal slant of the spinous process
    direction = np.array([math.sin(phi), math.cos(phi)])  # (s, a)
    length = 33.0 if b.name != "L5" else 26.0
    blk = cv.block((root[0] - 25, root[0] + 40), (root[1] - 12, root[1] + length + 8), (-20, 20))
    if blk is None:
        return
    sl, S, A, X = blk
    p = (S - root[0]) * direction[0] + (A - root[1]) * direction[1]  # along the process
    q = (S - root[0]) * direction[1] - (A - root[1]) * direction[0]  # across it (+ = cranial)
    half_h = 6.0 + 4.0 * np.clip(p / length, 0, 1)  # hatchet-shaped: taller at the tip
    sd2 = _rounded_box_sd(np.minimum(p + 3.0, length - p), half_h - np.abs(q + 1.0), 3.0)
    # lamina wide near the canal, spinous process thin further back
    half_w = 4.5 + 9.0 * np.clip((9.0 - p) / 5.0, 0, 1)
    sd = np.minimum(sd2, half_w - np.abs(X))
    occ = _occ(sd, cv.step)
    cv.paint(sl, occ, TISSUES["cortex"])
    cv.paint(sl, _occ(sd - 1.2, cv.step), TISSUES["element_marrow"], texture=tex[sl])
    # ligamentum flavum: dark band along the canal's back wall just below the lamina
    lf = _occ(2.0 - np.abs(p + 1.0), cv.step) * _occ(b.height * 0.45 - np.abs(q + 14.0), cv.step) * _occ(11 - np.abs(X), 1)
    cv.paint(sl, lf * 0.8, TISSUES["ligament"])


# --------------------------------------------------------------------------------------------------
# Acquisition: intensities, shading, noise
# --------------------------------------------------------------------------------------------------

def _acquire(cv: _Canvas, anat: _Anatomy, rng: np.random.Generator, series: tuple[str, ...],
             in_plane_axes: tuple[int, int], noise_frac: float) -> dict[str, np.ndarray]:
    """Blur, coil shading, Rician noise and scaling -> float32 magnitude images (stored units) per series."""
    ps, pa, _ = _spine_curves(anat)
    canal = _interp(cv.s, ps, pa) + 10.0
    post_skin = _smooth1d(canal + anat.post_depth, 20.0)
    # posterior surface coil: sensitivity falls with depth from the back; mild S-I ripple of the elements
    depth = np.clip(post_skin[:, None, None] - cv.a[None, :, None], 0, None)
    shade = 0.55 + 0.75 * np.exp(-depth / 150.0)
    shade = shade * (1.0 + 0.03 * np.cos(2 * np.pi * cv.s[:, None, None] / 180.0 + rng.uniform(0, 6.28)))
    shade = shade * (1.0 - 0.08 * (cv.x[None, None, :] / 60.0) ** 2)
    out = {}
    for name in series:
        q = _SEQ_INDEX[name]
        img = ndimage.gaussian_filter(cv.img[q], sigma=[0.6 if ax in in_plane_axes else 0.0 for ax in range(3)])
        img = img * shade.astype(np.float32)
        scale = float(rng.uniform(1200.0, 1900.0))
        sigma = noise_frac * (0.7 if name == "STIR" else 1.0)
        n1 = rng.standard_normal(img.shape, dtype=np.float32)
        n2 = rng.standard_normal(img.shape, dtype=np.float32)
        mag = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2) * np.float32(scale)
        out[name] = mag.astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------

_SEQ_PARAMS = {
    # TR, TE, TI (ms), echo train length, flip angle, ScanningSequence, SequenceVariant, ScanOptions
    "T1": {"tr": 550.0, "te": 10.0, "ti": None, "etl": 3, "flip": 150.0, "ss": ["SE"], "sv": ["SK", "SP", "OSP"],
           "so": ["PFP"], "contrast": "T1"},
    "T2": {"tr": 3500.0, "te": 100.0, "ti": None, "etl": 15, "flip": 150.0, "ss": ["SE"], "sv": ["SK", "SP", "OSP"],
           "so": ["PFP"], "contrast": "T2"},
    "STIR": {"tr": 4000.0, "te": 60.0, "ti": 150.0, "etl": 13, "flip": 150.0, "ss": ["SE", "IR"],
             "sv": ["SK", "SP", "MP"], "so": ["IR"], "contrast": "T2"},
}


def _ds_str(v: float) -> str:
    """DICOM DS value, at most 16 characters, deterministic."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def _uid(*parts: Any) -> str:
    return generate_uid(entropy_srcs=["modicscan-phantom"] + [str(p) for p in parts])


def _fake_date(rng: np.random.Generator, start_year: int, end_year: int) -> str:
    y = int(rng.integers(start_year, end_year + 1))
    m = int(rng.integers(1, 13))
    d = int(rng.integers(1, 29))
    return f"{y:04d}{m:02d}{d:02d}"


def _study_header(seed: int, vendor: dict[str, Any], patient_name: str, patient_id: str, rng: np.random.Generator,
                  key: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    study_date = _fake_date(rng, 2016, 2024)
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    ds.AccessionNumber = f"ACC{seed:07d}"
    ds.Modality = "MR"
    ds.Manufacturer = vendor["manufacturer"]
    ds.ManufacturerModelName = vendor["model"]
    ds.InstitutionName = "PHANTOM GENERAL HOSPITAL"
    ds.ReferringPhysicianName = "PHANTOM^REFERRER"
    ds.StationName = f"PHMR{seed % 10}"
    ds.StudyDescription = "LUMBAR SPINE"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = _fake_date(rng, 1940, 1995)
    ds.PatientSex = "F" if seed % 2 else "M"
    ds.PatientAge = f"{int(study_date[:4]) - int(ds.PatientBirthDate[:4]):03d}Y"
    ds.PatientWeight = _ds_str(float(np.round(rng.uniform(55, 105), 0)))
    ds.BodyPartExamined = "LSPINE"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(key, "study")
    ds.FrameOfReferenceUID = _uid(key, "for")
    ds.PositionReferenceIndicator = ""
    ds.StudyID = f"{seed % 100000}"
    return ds


def _write_dataset(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    ts = _TRANSFER_SYNTAXES[transfer_syntax]
    if ts != ExplicitVRLittleEndian:
        # pydicom's RLE encoder / pylibjpeg-openjpeg / pyjpegls, all lossless; keep our deterministic UID
        ds.compress(ts, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "MODICSCAN_PH1"
    return meta


def _store(values: np.ndarray, bits: int, slope: float, intercept: float) -> np.ndarray:
    """Physical values -> stored uint16 (rounded, clipped to BitsStored)."""
    stored = np.rint((values - intercept) / slope)
    return np.clip(stored, 0, 2 ** bits - 1).astype(np.uint16)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def make_study(
    out_dir: str | os.PathLike,
    seed: int,
    *,
    findings: list[dict[str, Any]] | None = None,
    n_slices: int = 15,
    matrix: int = 256,
    fov_mm: float = 280.0,
    slice_thickness_mm: float = 4.0,
    series: tuple[str, ...] | list[str] = ("T1", "T2", "STIR"),
    orientation: str = "sagittal",
    transfer_syntax: str = "explicit",
    enhanced: bool = False,
    patient_name: str | None = None,
    patient_id: str | None = None,
    extra_tags: dict[str, Any] | None = None,
    study_name: str | None = None,
    shuffle_instances: bool | None = None,
    rescale: bool | None = None,
    noise: float = 0.018,
    series_matrix: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write one synthetic study and its truth; return the truth dict (also in ``truth/findings.json``).

    Layout: ``out_dir/<study_name>/DICOM/SE<nnn>/IM_0001.dcm ...`` (one multi-frame file per series when
    ``enhanced``), ``out_dir/<study_name>/truth/labels.nii.gz`` (vertebral bodies, label values of
    ``types.level_value``, on the T2 grid in the working frame with its RAS affine; the grid of the first
    series when there is no T2) and ``truth/findings.json``.

    ``findings=None`` picks the seed's scenario (:data:`SCENARIOS`, random mix for seeds >= 4).
    ``shuffle_instances`` (default: seed-dependent) makes InstanceNumber disagree with slice position;
    ``rescale`` (default: Philips seeds) stores values with RescaleSlope / RescaleIntercept.
    ``noise`` is the Rician noise sigma relative to the T1 fat signal.
    ``series_matrix`` gives some roles their own in-plane matrix over the same FOV and slices, e.g.
    ``{"STIR": 192}`` (the truth labels stay on the T2 grid, so consumers must resample).
    """
    seed = int(seed)
    if orientation not in ("sagittal", "axial"):
        raise ValueError(f"orientation must be 'sagittal' or 'axial', got {orientation!r}")
    if transfer_syntax not in _TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(_TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    series = tuple(series)
    if not series or any(s not in SEQUENCES for s in series) or len(set(series)) != len(series):
        raise ValueError(f"series must be distinct names among {SEQUENCES}, got {series!r}")
    if not (8 <= matrix <= 1024 and 1 <= n_slices <= 256 and 50.0 <= fov_mm <= 600.0 and 0.5 <= slice_thickness_mm <= 20):
        raise ValueError("matrix 8..1024, n_slices 1..256, fov_mm 50..600 and slice_thickness_mm 0.5..20 are supported")
    series_matrix = {str(r): int(m) for r, m in (series_matrix or {}).items()}
    if any(r not in series or not 8 <= m <= 1024 for r, m in series_matrix.items()):
        raise ValueError(f"series_matrix must map roles of {series!r} to a matrix 8..1024, got {series_matrix!r}")
    planted = normalise_findings(scenario_findings(seed) if findings is None else findings)
    patient_name = patient_name or f"PHANTOM^SEED{seed}"
    patient_id = patient_id or f"PH{seed:06d}"
    study_name = study_name or f"phantom_seed{seed:04d}"
    vendor = _VENDORS[seed % len(_VENDORS)]
    if shuffle_instances is None:
        shuffle_instances = seed % 2 == 1
    if rescale is None:
        rescale = vendor["manufacturer"].startswith("Philips")

    # A key over every option that changes the content keeps UIDs unique across variants of one seed.
    opts = dict(findings=planted, n=n_slices, m=matrix, fov=fov_mm, th=slice_thickness_mm, series=series,
                o=orientation, ts=transfer_syntax, mf=enhanced, pn=patient_name, pid=patient_id, sh=shuffle_instances,
                rs=rescale, noise=noise, extra=sorted((extra_tags or {}).items(), key=lambda kv: kv[0]))
    if series_matrix:
        opts["sm"] = sorted(series_matrix.items())
    key = hashlib.sha256(json.dumps([seed, opts], sort_keys=True, default=str).encode()).hexdigest()[:24]

    rng_anat = np.random.default_rng([seed, 1])
    rng_tex = np.random.default_rng([seed, 2])
    rng_acq = np.random.default_rng([seed, 3])
    rng_hdr = np.random.default_rng([seed, 4])
    anat = _build_anatomy(rng_anat, fov_mm, planted)

    # Acquisition grids in model mm (pixel centres).  Sagittal: rows = s, columns = a, slices = x.
    # Every series shares the slice positions; a role listed in ``series_matrix`` gets its own in-plane
    # matrix over the same FOV (as when STIR is acquired at a lower resolution than T1 / T2).
    slice_pos = (np.arange(n_slices, dtype=np.float64) - (n_slices - 1) / 2) * slice_thickness_mm
    lateral_shift = float(rng_anat.uniform(-1.5, 1.5))  # the mid slice is rarely exactly mid-sagittal
    in_plane_axes = (0, 1) if orientation == "sagittal" else (1, 2)
    by = {b.name: b for b in anat.bodies}

    def grid_for(m: int):
        pxm = fov_mm / m
        in_plane = (np.arange(m, dtype=np.float64) + 0.5) * pxm
        if orientation == "sagittal":
            return in_plane, in_plane, slice_pos + lateral_shift, pxm
        # axial block through L3-S1 (the usual axial coverage of the lower discs)
        s_mid = 0.5 * (by["L3"].cs + by["L5"].cs)
        return s_mid + slice_pos, in_plane, in_plane - fov_mm / 2 + lateral_shift, pxm

    role_matrix = {role: series_matrix.get(role, matrix) for role in series}
    grids: dict[int, tuple] = {}
    canvases: dict[int, _Canvas] = {}
    images: dict[str, np.ndarray] = {}
    for m in [matrix] + sorted(set(role_matrix.values()) - {matrix}):
        roles_m = tuple(r for r in series if role_matrix[r] == m)
        if not roles_m:
            continue
        first = m == matrix  # the main grid keeps the seed's original random streams
        grids[m] = grid_for(m)
        canvases[m] = _Canvas(*grids[m][:3])
        _render(anat, canvases[m], rng_tex if first else np.random.default_rng([seed, 2, m]))
        images.update(_acquire(canvases[m], anat, rng_acq if first else np.random.default_rng([seed, 3, m]),
                               roles_m, in_plane_axes, noise))

    # Model mm -> patient LPS: L = -x + offL, P = a + offP, S = -s + offS (isocentre near L3, table offsets).
    off = np.array([float(rng_hdr.uniform(-5, 5)), -fov_mm / 2 + float(rng_hdr.uniform(-10, 10)) + 40.0,
                    fov_mm / 2 + float(rng_hdr.uniform(-20, 20))])
    grid_role = "T2" if "T2" in series else series[0]
    label_m = role_matrix[grid_role]
    cv = canvases[label_m]
    affine = _grid_affine(*grids[label_m], slice_thickness_mm, off)

    study_dir = Path(out_dir) / study_name
    if study_dir.exists():
        # only ever replace a previous phantom study, never an unrelated folder of the same name
        if not (study_dir / "truth" / "findings.json").is_file():
            raise FileExistsError(f"{study_dir} exists and is not a phantom study; choose another out_dir or study_name")
        shutil.rmtree(study_dir)
    header = _study_header(seed, vendor, patient_name, patient_id, rng_hdr, key)
    series_truth: dict[str, Any] = {}
    order_rng = np.random.default_rng([seed, 5])
    for num, role in enumerate(series, start=2):  # series 1 is conventionally the localizer
        stored_images, slope, intercept, bits = _to_stored(images[role], vendor, rescale)
        desc = (vendor["desc"] if orientation == "sagittal" else vendor["desc_axial"])[role]
        folder = f"SE{num:03d}"
        series_uid = _uid(key, "series", role)
        grid_s, grid_a, grid_x, px = grids[role_matrix[role]]
        frames = _frames(stored_images, grid_s, grid_a, grid_x, orientation, off)
        n = len(frames)
        if shuffle_instances:
            perm = order_rng.permutation(n) if seed % 4 == 3 else np.arange(n)[::-1]
        else:
            perm = np.arange(n)
        common = dict(role=role, num=num, desc=desc, series_uid=series_uid, vendor=vendor, px=px,
                      thickness=slice_thickness_mm, slope=slope, intercept=intercept, bits=bits, key=key, orientation=orientation,
                      values=images[role])
        if enhanced:
            ds = _enhanced_dataset(header, frames, perm, common)
            _apply_extra(ds, extra_tags)
            _write_dataset(ds, study_dir / "DICOM" / folder / "IM_0001.dcm", transfer_syntax)
        else:
            for inst, pos in enumerate(perm, start=1):
                ds = _classic_dataset(header, frames[int(pos)], inst, common)
                _apply_extra(ds, extra_tags)
                _write_dataset(ds, study_dir / "DICOM" / folder / f"IM_{inst:04d}.dcm", transfer_syntax)
        series_truth[role] = {"series_uid": series_uid, "series_number": num, "series_description": desc,
                              "folder": f"DICOM/{folder}", "n_frames": n, "rescale_slope": slope,
                              "rescale_intercept": intercept, "instances_shuffled": bool(shuffle_instances),
                              "matrix": role_matrix[role], "pixel_spacing_mm": round(px, 6)}

    truth = _truth(seed, study_name, header, vendor, anat, planted, cv, affine, series_truth, orientation,
                   transfer_syntax, enhanced, matrix, n_slices, fov_mm, slice_thickness_mm)
    truth_dir = study_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(cv.labels.astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = truth_dir / "labels.tmp.nii.gz"
    nib.save(img, tmp)
    os.replace(tmp, truth_dir / "labels.nii.gz")
    (truth_dir / "findings.json").write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return truth


def _to_stored(values: np.ndarray, vendor: dict[str, Any], rescale: bool):
    bits = vendor["bits"]
    if rescale:
        # Philips-style: stored integers use the full 12-bit range and RescaleSlope maps them back
        slope = float(np.round(max(float(values.max()), 1.0) / 4000.0, 6)) or 1.0
        intercept = 0.0
    else:
        slope, intercept = 1.0, 0.0
    return _store(values, bits, slope, intercept), slope, intercept, bits


def _grid_affine(grid_s, grid_a, grid_x, px: float, thickness: float, off: np.ndarray) -> np.ndarray:
    """voxel (i, j, k) of a model-frame (I, P, R) array -> RAS mm, given the LPS offsets of the model origin."""
    spacing = np.array([abs(grid_s[1] - grid_s[0]) if len(grid_s) > 1 else thickness,
                        px, abs(grid_x[1] - grid_x[0]) if len(grid_x) > 1 else thickness])
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, -spacing[0]]
    affine[:3, 1] = [0.0, -spacing[1], 0.0]
    affine[:3, 2] = [spacing[2], 0.0, 0.0]
    lps0 = np.array([-grid_x[0] + off[0], grid_a[0] + off[1], -grid_s[0] + off[2]])
    affine[:3, 3] = [-lps0[0], -lps0[1], lps0[2]]
    return affine


def _frames(stored, grid_s, grid_a, grid_x, orientation, off) -> list[dict[str, Any]]:
    """2-D frames in acquisition order (ascending along the slice normal) with their geometry."""
    frames = []
    if orientation == "sagittal":
        # row cosine +P, column cosine -S (= I); normal = row x col = -L = patient Right
        iop = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        for k in range(stored.shape[2]):
            ipp = [-grid_x[k] + off[0], grid_a[0] + off[1], -grid_s[0] + off[2]]
            # SliceLocation = position along the normal (patient Right), i.e. -L
            frames.append({"pixels": np.ascontiguousarray(stored[:, :, k]), "ipp": ipp, "iop": iop,
                           "slice_location": float(-ipp[0]), "index": k})
    else:
        # row cosine +L, column cosine +P; normal = +S: ascending position = going up = descending s
        iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        for k in range(stored.shape[0] - 1, -1, -1):
            # pixel column c runs toward patient Left, i.e. toward decreasing x (model) -> reversed columns
            ipp = [-grid_x[-1] + off[0], grid_a[0] + off[1], -grid_s[k] + off[2]]
            frames.append({"pixels": np.ascontiguousarray(stored[k, :, ::-1]), "ipp": ipp, "iop": iop,
                           "slice_location": float(-grid_s[k] + off[2]), "index": k})
    return frames


def _mr_params(role: str, vendor: dict[str, Any]) -> dict[str, Any]:
    p = dict(_SEQ_PARAMS[role])
    if vendor["field"] >= 3.0 and role == "STIR":
        p["ti"] = 210.0  # fat nulls later at 3 T
    if vendor["manufacturer"].startswith("GE"):
        p["ss"] = ["IR"] if role == "STIR" else ["SE"]
        p["so"] = ["IR_GEMS", "FAST_GEMS"] if role == "STIR" else ["FAST_GEMS", "FC"]
        p["sv"] = ["SK"]
    elif vendor["manufacturer"].startswith("Philips"):
        p["ss"] = ["IR"] if role == "STIR" else ["SE"]
        p["so"] = ["IR"] if role == "STIR" else ["OTHER"]
        p["sv"] = ["SK"] if role != "STIR" else ["SK", "MP"]
    return p


def _window(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values[::2, ::2, ::2], [1, 99.5])
    return float(np.round((lo + hi) / 2)), float(np.round(max(hi - lo, 1.0)))


def _classic_dataset(header: Dataset, frame: dict[str, Any], instance: int, c: dict[str, Any]) -> Dataset:
    role, vendor = c["role"], c["vendor"]
    p = _mr_params(role, vendor)
    sop_uid = _uid(c["key"], "sop", role, frame["index"])
    ds = Dataset()
    ds.update(header)
    ds.file_meta = _file_meta(MRImageStorage, sop_uid)
    ds.ImageType = vendor["image_type"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesDescription = c["desc"]
    ds.ProtocolName = c["desc"]
    ds.ScanningSequence = p["ss"]
    ds.SequenceVariant = p["sv"]
    ds.ScanOptions = p["so"]
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = vendor["seqname"][role]
    ds.SliceThickness = _ds_str(c["thickness"])
    ds.RepetitionTime = _ds_str(p["tr"])
    ds.EchoTime = _ds_str(p["te"])
    if p["ti"] is not None:
        ds.InversionTime = _ds_str(p["ti"])
    ds.NumberOfAverages = "2" if role == "T1" else "1"
    ds.ImagingFrequency = _ds_str(42.577478 * vendor["field"])
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds_str(vendor["field"])
    ds.SpacingBetweenSlices = _ds_str(c["thickness"])
    ds.EchoTrainLength = p["etl"]
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "190" if role == "T1" else "220"
    ds.FlipAngle = _ds_str(p["flip"])
    ds.SeriesInstanceUID = c["series_uid"]
    ds.SeriesNumber = c["num"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds_str(v) for v in frame["ipp"]]
    ds.ImageOrientationPatient = [_ds_str(v) for v in frame["iop"]]
    ds.SliceLocation = _ds_str(frame["slice_location"])
    _pixel_module(ds, frame["pixels"], c)
    return ds


def _pixel_module(ds: Dataset, pixels: np.ndarray, c: dict[str, Any]) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.PixelSpacing = [_ds_str(c["px"]), _ds_str(c["px"])]
    ds.BitsAllocated = 16
    ds.BitsStored = c["bits"]
    ds.HighBit = c["bits"] - 1
    ds.PixelRepresentation = 0
    center, width = _window(c["values"])
    ds.WindowCenter = _ds_str(center)
    ds.WindowWidth = _ds_str(width)
    if c["slope"] != 1.0 or c["intercept"] != 0.0:
        ds.RescaleIntercept = _ds_str(c["intercept"])
        ds.RescaleSlope = _ds_str(c["slope"])
        ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()


def _enhanced_dataset(header: Dataset, frames: list[dict[str, Any]], perm: np.ndarray, c: dict[str, Any]) -> Dataset:
    """Enhanced MR Image (multi-frame) with shared / per-frame functional groups."""
    role, vendor = c["role"], c["vendor"]
    p = _mr_params(role, vendor)
    sop_uid = _uid(c["key"], "sop-mf", role)
    ds = Dataset()
    ds.update(header)
    ds.file_meta = _file_meta(EnhancedMRImageStorage, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ContentTime = header.StudyTime
    ds.AcquisitionDateTime = header.StudyDate + header.StudyTime
    ds.SeriesDescription = c["desc"]
    ds.ProtocolName = c["desc"]
    ds.SeriesInstanceUID = c["series_uid"]
    ds.SeriesNumber = c["num"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    ds.MagneticFieldStrength = _ds_str(vendor["field"])
    ds.ContentQualification = "PRODUCT"
    ds.ImagedNucleus = "1H"
    ds.ImagingFrequency = _ds_str(42.577478 * vendor["field"])
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = p["contrast"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PulseSequenceName = vendor["seqname"][role]
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "YES"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    # legacy-style acquisition tags kept at top level as many scanners do (role detection reads either)
    ds.ScanningSequence = p["ss"]
    ds.SequenceVariant = p["sv"]
    ds.ScanOptions = p["so"]
    ds.SliceThickness = _ds_str(c["thickness"])
    ds.SpacingBetweenSlices = _ds_str(c["thickness"])

    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [_ds_str(c["px"]), _ds_str(c["px"])]
    pm.SliceThickness = _ds_str(c["thickness"])
    pm.SpacingBetweenSlices = _ds_str(c["thickness"])
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = [_ds_str(v) for v in frames[0]["iop"]]
    shared.PlaneOrientationSequence = Sequence([po])
    timing = Dataset()
    timing.RepetitionTime = p["tr"]
    timing.FlipAngle = p["flip"]
    timing.EchoTrainLength = p["etl"]
    timing.RFEchoTrainLength = p["etl"]
    timing.GradientEchoTrainLength = 0
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = p["te"]
    shared.MREchoSequence = Sequence([echo])
    mod = Dataset()
    mod.InversionRecovery = "YES" if p["ti"] is not None else "NO"
    if p["ti"] is not None:
        mod.InversionTimes = [p["ti"]]
    mod.FlowCompensation = "NONE"
    mod.T2Preparation = "NO"
    mod.SpatialPresaturation = "NONE"
    mod.PartialFourier = "NO"
    mod.ParallelAcquisition = "NO"
    shared.MRModifierSequence = Sequence([mod])
    fc = Dataset()
    fc.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    fc.PixelPresentation = "MONOCHROME"
    fc.VolumetricProperties = "VOLUME"
    fc.VolumeBasedCalculationTechnique = "NONE"
    fc.ComplexImageComponent = "MAGNITUDE"
    fc.AcquisitionContrast = p["contrast"]
    shared.MRImageFrameTypeSequence = Sequence([fc])
    pvt = Dataset()
    pvt.WindowCenter, pvt.WindowWidth = (_ds_str(v) for v in _window(c["values"]))
    shared.FrameVOILUTSequence = Sequence([pvt])
    if c["slope"] != 1.0 or c["intercept"] != 0.0:
        pvx = Dataset()
        pvx.RescaleIntercept = _ds_str(c["intercept"])
        pvx.RescaleSlope = _ds_str(c["slope"])
        pvx.RescaleType = "US"
        shared.PixelValueTransformationSequence = Sequence([pvx])
    fov = Dataset()
    fov.InPlanePhaseEncodingDirection = "ROW"  # sagittal spine: phase encoding anterior-posterior
    fov.MRAcquisitionFrequencyEncodingSteps = int(frames[0]["pixels"].shape[0])
    fov.MRAcquisitionPhaseEncodingStepsInPlane = int(frames[0]["pixels"].shape[1])
    fov.MRAcquisitionPhaseEncodingStepsOutOfPlane = 1
    fov.PercentSampling = 100.0
    fov.PercentPhaseFieldOfView = 100.0
    shared.MRFOVGeometrySequence = Sequence([fov])
    avg = Dataset()
    avg.NumberOfAverages = 2.0 if role == "T1" else 1.0
    shared.MRAveragesSequence = Sequence([avg])
    rx = Dataset()
    rx.ReceiveCoilName = "SPINE"
    rx.ReceiveCoilManufacturerName = vendor["manufacturer"]
    rx.ReceiveCoilType = "MULTICOIL"
    rx.QuadratureReceiveCoil = "NO"
    shared.MRReceiveCoilSequence = Sequence([rx])
    txc = Dataset()
    txc.TransmitCoilName = "BODY"
    txc.TransmitCoilManufacturerName = vendor["manufacturer"]
    txc.TransmitCoilType = "BODY"
    shared.MRTransmitCoilSequence = Sequence([txc])
    imod = Dataset()
    imod.PixelBandwidth = 190.0 if role == "T1" else 220.0
    imod.TransmitterFrequency = 42.577478 * vendor["field"]
    imod.MagnetizationTransfer = "NONE"
    imod.BloodSignalNulling = "NO"
    imod.Tagging = "NONE"
    shared.MRImagingModifierSequence = Sequence([imod])
    anat = Dataset()
    region = Dataset()
    region.CodeValue = "122496003"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Lumbar spine"
    anat.AnatomicRegionSequence = Sequence([region])
    anat.FrameLaterality = "U"
    shared.FrameAnatomySequence = Sequence([anat])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.AcquisitionContextSequence = Sequence([])
    ds.PresentationLUTShape = "IDENTITY"

    stack_uid = "1"
    dim_org = _uid(c["key"], "dimorg", role)
    org = Dataset()
    org.DimensionOrganizationUID = dim_org
    ds.DimensionOrganizationSequence = Sequence([org])
    ds.DimensionOrganizationType = "3D"
    idx = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111)):  # StackID, InStackPositionNumber
        d = Dataset()
        d.DimensionOrganizationUID = dim_org
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = group
        idx.append(d)
    ds.DimensionIndexSequence = Sequence(idx)

    per_frame = []
    pixel_stack = []
    for pos in perm:  # frame order may differ from spatial order, like InstanceNumber in classic files
        fr = frames[int(pos)]
        f = Dataset()
        content = Dataset()
        content.StackID = stack_uid
        content.InStackPositionNumber = int(pos) + 1
        content.DimensionIndexValues = [1, int(pos) + 1]
        content.FrameAcquisitionDateTime = header.StudyDate + header.StudyTime
        content.FrameReferenceDateTime = header.StudyDate + header.StudyTime
        content.FrameAcquisitionDuration = 180000.0 / len(frames)  # ms, a 3-minute series
        f.FrameContentSequence = Sequence([content])
        pp = Dataset()
        pp.ImagePositionPatient = [_ds_str(v) for v in fr["ipp"]]
        f.PlanePositionSequence = Sequence([pp])
        per_frame.append(f)
        pixel_stack.append(fr["pixels"])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    _pixel_module(ds, np.stack(pixel_stack), c)
    # PixelSpacing / WindowCenter / Rescale belong in the functional groups for this IOD
    for kw in ("PixelSpacing", "WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope", "RescaleType"):
        if kw in ds:
            delattr(ds, kw)
    return ds


def _apply_extra(ds: Dataset, extra_tags: dict[str, Any] | None) -> None:
    for kw, value in (extra_tags or {}).items():
        if value is None:
            if kw in ds:
                delattr(ds, kw)
        else:
            setattr(ds, kw, value)


def _truth(seed, study_name, header, vendor, anat, planted, cv: _Canvas, affine, series_truth, orientation,
           transfer_syntax, enhanced, matrix, n_slices, fov_mm, thickness) -> dict[str, Any]:
    labels = cv.labels
    counts = np.bincount(labels.ravel(), minlength=16)
    vox_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    present = [int(v) for v in np.nonzero(counts)[0] if v > 0]
    centroids = ndimage.center_of_mass(np.ones_like(labels, dtype=np.float32), labels, present) if present else []
    cen = dict(zip(present, centroids, strict=True))
    vertebrae: dict[str, Any] = {}
    flags: list[dict[str, Any]] = []
    for b in anat.bodies:
        if not b.label:
            continue
        ep = {"superior": {"modic": "0", "edema": False}, "inferior": {"modic": "0", "edema": False}}
        for band in b.bands:
            if band["type"] == "edema":
                ep[band["endplate"]]["edema"] = True
            else:
                ep[band["endplate"]]["modic"] = band["type"]
                ep[band["endplate"]]["edema"] = "I" in band["type"].split("/")
        if b.whole_edema:
            for e in ep.values():
                e["edema"] = True
        pattern = []
        if b.whole_edema and b.wedge > 0:
            pattern.append("POSSIBLE_ACUTE_FRACTURE")
        # the full volume of this body (as if the FOV were unlimited) to report how much of it is visible
        full_ml = _full_volume_ml(b)
        n = int(counts[b.label]) if b.label < len(counts) else 0
        vertebrae[b.name] = {
            "value": b.label,
            "present": n > 0,
            "voxels": n,
            "volume_ml": round(n * vox_ml, 3),
            "in_fov_fraction": round(min(1.0, n * vox_ml / full_ml), 3) if full_ml > 0 else 0.0,
            "centroid_vox": [round(float(c), 2) for c in cen[b.label]] if n else None,
            "endplates": ep,
            "whole_body_edema": b.whole_edema,
            "height_loss": b.wedge,
            "posterior_height_mm": round(b.height, 2),
            "ap_depth_mm": round(b.depth, 2),
            "tilt_deg": round(math.degrees(b.theta), 2),
            "pattern_flags": pattern,
        }
        if pattern:
            flags.append({"flag": "POSSIBLE_ACUTE_FRACTURE", "level": b.name})
    for f in planted:
        if f["kind"] == "infection":
            up, lo = f["disc"].split("-")
            for lv in (up, lo):
                if lv in vertebrae and "POSSIBLE_INFECTION" not in vertebrae[lv]["pattern_flags"]:
                    vertebrae[lv]["pattern_flags"].append("POSSIBLE_INFECTION")
            flags.append({"flag": "POSSIBLE_INFECTION", "disc": f["disc"], "levels": [up, lo]})
    discs = {}
    for d in anat.discs:
        if d.remnant or not (d.upper.label and d.lower.label):
            continue
        discs[f"{d.upper.name}-{d.lower.name}"] = {"degenerated": d.degenerated, "infected": d.infected}
    return {
        "generator": "modicscan.phantom",
        "version": 1,
        "seed": seed,
        "study_name": study_name,
        "study_uid": str(header.StudyInstanceUID),
        "patient": {"name": str(header.PatientName), "id": str(header.PatientID),
                    "birth_date": str(header.PatientBirthDate), "accession_number": str(header.AccessionNumber),
                    "study_date": str(header.StudyDate)},
        "vendor": {"manufacturer": vendor["manufacturer"], "model": vendor["model"], "field_T": vendor["field"]},
        "acquisition": {"orientation": orientation, "matrix": matrix, "n_slices": n_slices, "fov_mm": fov_mm,
                        "slice_thickness_mm": thickness, "transfer_syntax": transfer_syntax, "enhanced": enhanced},
        "series": series_truth,
        "labels": {"file": "truth/labels.nii.gz", "axcodes": list(nib.aff2axcodes(affine)), "shape": list(labels.shape),
                   "affine": [[round(float(v), 6) for v in row] for row in affine],
                   "grid_of": "T2" if "T2" in series_truth else next(iter(series_truth))},
        "findings": planted,
        "vertebrae": vertebrae,
        "discs": discs,
        "pattern_flags": flags,
        "finding_factors": {k: list(v) for k, v in FINDING_FACTORS.items()},
    }


def _full_volume_ml(b: _Body) -> float:
    """Volume of a body on an unlimited 0.5 mm grid (for the in-FOV fraction in the truth)."""
    r = math.hypot(b.height, b.depth) / 2 + 3
    step = 0.5
    s = np.arange(b.cs - r, b.cs + r, step)
    a = np.arange(b.ca - r, b.ca + r, step)
    x = np.arange(-b.width / 2 - 1, b.width / 2 + 1, 2 * step)
    S, A, X = s[:, None, None], a[None, :, None], x[None, None, :]
    u, v = _body_local(b, S, A)
    u_top, u_bot, v_ant, v_post = _body_surfaces(b, u, v, X)
    sd = _rounded_box_sd(np.minimum(u - u_top, u_bot - u), np.minimum(v - v_ant, v_post - v), 3.0)
    sd = np.minimum(sd, (b.width / 2 - np.abs(X)) * 2.0)
    return float((sd >= 0).sum()) * step * step * 2 * step / 1000.0


def make_sample_data(out_dir: str | os.PathLike = "sample_data") -> list[dict[str, Any]]:
    """Regenerate the committed sample set: seeds 0-3, 256 x 256 x 15, seed 1 RLE-compressed."""
    truths = []
    for seed in SAMPLE_SEEDS:
        truths.append(make_study(out_dir, seed, transfer_syntax="rle" if seed == 1 else "explicit"))
    return truths


def cli_phantom(out: str | os.PathLike, seed: int, **opts: Any) -> dict[str, Any]:
    """Entry point for ``modicscan phantom OUT --seed N [...]``: options are make_study keyword arguments."""
    opts = {k: v for k, v in opts.items() if v is not None}
    if "series" in opts and isinstance(opts["series"], str):
        opts["series"] = tuple(s.strip() for s in opts["series"].split(",") if s.strip())
    return make_study(out, seed, **opts)


if __name__ == "__main__":  # pragma: no cover - manual regeneration helper
    import sys

    make_sample_data(sys.argv[1] if len(sys.argv) > 1 else "sample_data")

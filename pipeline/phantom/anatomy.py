"""Phantom anatomy in model millimetres: bodies, discs and the column drawn from the seed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.phantom.scenarios import (
    _BODY_DEPTH,
    _BODY_HEIGHT,
    _BODY_TILT,
    _BODY_WIDTH,
    _DISC_GAP,
    _LEVELS_ALL,
    _SACRAL_SEGMENTS,
)
from pipeline.types import level_value


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

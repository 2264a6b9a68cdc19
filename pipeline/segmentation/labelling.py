"""Level names (L1..L5, S1, T12, ...) for the bodies along the column, counted from the sacrum or the
column's end, with a labelling confidence, flags and notes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.config import SegmentationConfig
from pipeline.types import LUMBAR_LEVELS

COLUMN_END_SPACINGS = 1.5  # image under the column's last body (in body spacings) needed to call it S1 without a sacrum


# A piece cut by the image's edge closer than this (in body spacings) under the last body may be the next body.
CUT_NEXT_BODY_SPACINGS = 1.5


def endplate_tilts(lab: np.ndarray, ids: np.ndarray, spacing_work) -> np.ndarray:
    """Endplate tilt (degrees, signed, image coordinates) of each component in its mid slab."""
    out = np.zeros(len(ids))
    boxes = ndimage.find_objects(lab)
    for n, lid in enumerate(ids):  # loop over <= ~12 bodies
        box = boxes[lid - 1]
        ii, jj, kk = np.nonzero(lab[box] == lid)  # box coordinates: slopes and the median slice are shift-free
        kc = int(np.median(kk))
        sel = np.abs(kk - kc) <= 1
        ii, jj = ii[sel], jj[sel]
        if jj.size < 10:
            continue
        order = np.lexsort((ii, jj))
        jj_s, ii_s = jj[order], ii[order]
        first = np.r_[True, jj_s[1:] != jj_s[:-1]]
        last = np.r_[jj_s[1:] != jj_s[:-1], True]
        slopes = []
        for pick in (first, last):
            x, y = jj_s[pick] * spacing_work[1], ii_s[pick] * spacing_work[0]
            if x.size >= 5 and np.ptp(x) > 0:
                # the central 60 % of the AP extent: the corners are rounded
                lo, hi = np.percentile(x, [20, 80])
                c = (x >= lo) & (x <= hi)
                if c.sum() >= 3:
                    slopes.append(np.polyfit(x[c], y[c], 1)[0])
        if slopes:
            out[n] = np.degrees(np.arctan(np.mean(slopes)))
    return out


def _fill_rhythm_gaps(chain: list[int], centroids_mm: np.ndarray, volumes_ml: np.ndarray, spacing: float,
                      min_ml: float) -> list[int]:
    """Insert a smaller body where the chain skips a level: between two chain bodies about two spacings apart,
    the largest component (>= ``min_ml``) near the midpoint is the missing vertebra (a compressed, fractured
    body is too small to count as major; leaving it out shifts every level name above it)."""
    if spacing <= 0 or len(chain) < 2:
        return chain
    out = [chain[0]]
    for a, b in zip(chain[:-1], chain[1:], strict=True):
        gap = centroids_mm[b] - centroids_mm[a]
        if gap > 1.6 * spacing:
            mid = 0.5 * (centroids_mm[a] + centroids_mm[b])
            cand = [i for i in range(len(centroids_mm)) if i not in chain and volumes_ml[i] >= min_ml
                    and abs(centroids_mm[i] - mid) <= 0.25 * gap]
            if cand:
                out.append(max(cand, key=lambda i: volumes_ml[i]))
        out.append(b)
    return out


# A piece reaching this close (mm) to the bottom edge of the field of view counts as cut by it. Not 0: the
# classifier fades over the last few mm of an image (its filters see the edge), so a body cut by the edge ends
# some mm above it. On the 42 real scans (`evaluate-segmentation --first-level`), 2 mm left 84 of 135 vb3 bodies
# (L1-L5) named one or two levels too low (109 without the rule), 8 mm 59, 12 mm 49, 16 mm 30; vb2 (T11-L5): 14
# wrong at 2 mm, 0 from 8 mm, the same 14 correct throughout. Not more: a clinical field of view that ends in
# the sacrum has S2 not far above its edge, and S2 is what tells S1 from L5 there.
FOV_EDGE_MM = 12.0


def _s1_at_column_end(chain: list[int], centroids_mm: np.ndarray, tilts: np.ndarray, volumes_ml: np.ndarray,
                      spacing: float, pool: np.ndarray, cut: np.ndarray, fov_end_mm: float | None,
                      min_ml: float) -> int | None:
    """Index of the body that ends the column when it can be taken for S1 without a sacrum below it, else None.

    The U-Net finds S1 (often only its top, a piece too small for the chain) but, unlike the pixel classifier, not
    the fused segments under it, so "something body-like below the last body" rarely holds. The column's last
    body is S1 when (1) the image goes on for >= ``COLUMN_END_SPACINGS`` body spacings under it and nothing
    body-like is found there (a lumbar body would be: the models rarely miss one), and (2) the steepest endplate
    tilt of the column is at its last two bodies (the lumbosacral junction: L5's wedge or the sacral slope; on the
    36 real scans whose levels are known the steepest body is L5 or below in 33). An uncut piece 0.6-1.3 spacings
    under the last major body (>= ``min_ml``) counts as that last body. It fails when S1 is missed altogether and
    L5 is the steepest (2 of those 36 scans): L5 is then named S1."""
    if fov_end_mm is None or len(chain) < 2:
        return None
    last = chain[-1]
    gap = centroids_mm - centroids_mm[last]
    nxt = np.flatnonzero(~cut & (gap >= 0.6 * spacing) & (gap <= 1.3 * spacing) & (volumes_ml >= min_ml))
    if nxt.size:
        last = int(nxt[np.argmax(volumes_ml[nxt])])
    ends = [*chain, last] if last != chain[-1] else chain
    # A body running out of view has its centroid within a spacing under the last one; a cut piece farther down
    # (the lower sacrum or the coccyx at the image's edge) is not the column going on.
    under = centroids_mm - centroids_mm[last]
    if (len(ends) < 3 or np.any(pool > centroids_mm[last] + 0.3 * spacing)
            or np.any(cut & (under > 0.3 * spacing) & (under <= CUT_NEXT_BODY_SPACINGS * spacing))):
        return None  # something below it: the sacrum (the usual rule decides), or a body running out of view
    if fov_end_mm - centroids_mm[last] < COLUMN_END_SPACINGS * spacing:
        return None  # the image stops too soon under it to tell S1 from L5 with S1 out of view
    if min(tilts[ends[-2]], tilts[ends[-1]]) > np.min(tilts[ends]):
        return None
    return last


def label_levels(centroids_mm: np.ndarray, tilts: np.ndarray, volumes_ml: np.ndarray,
                 cfg: SegmentationConfig, others_mm: np.ndarray | None = None,
                 cut: np.ndarray | None = None, fov_end_mm: float | None = None) -> tuple[list[str], float, list[str], list[str]]:
    """Level names for components ordered top -> bottom (``""`` = not reported); (names, confidence, flags, notes).

    The vertebral column is the chain of *major* components (volume >= ``major_body_fraction`` of the typical
    large body) spaced like vertebrae (>= 75 % of the median centroid spacing); smaller pieces are fragments
    or fused sacral segments. S1 is the last body of that chain when something (the rest of the sacrum) lies
    below it; levels are then counted upward: L5, L4, ... L1, T12, ...

    ``cut``: components cut by the bottom edge of the field of view (``others_mm`` should hold no such piece).
    They are no evidence of a sacrum: a small piece at the edge is as likely the next body, cut short (on the
    42 real scans, the water-fat ones (vb3) end just below L5 with S1 cut, and counting from the cut S1 as the
    "sacrum" named L5 as S1 and every level one too low).

    ``fov_end_mm``: where the image ends (same axis as the centroids); with it, a column that ends well inside the
    image may end at S1 without a sacrum below (:func:`_s1_at_column_end`; flag ``S1_AT_COLUMN_END``).
    """
    n = len(centroids_mm)
    flags: list[str] = []
    notes: list[str] = []
    names = [""] * n
    if n == 0:
        return names, 0.0, ["NO_BODIES"], notes
    typical = float(np.median(np.sort(volumes_ml)[-5:]))
    major = np.flatnonzero(volumes_ml >= cfg.major_body_fraction * typical)
    if major.size == 0:
        return names, 0.0, ["NO_BODIES"], notes
    gaps = np.diff(centroids_mm[major])
    spacing = float(np.median(gaps)) if gaps.size else 0.0
    chain = [int(major[0])]
    for m in major[1:]:
        # Vertebrae follow each other at the usual spacing; fused sacral segments (S2..) are closer together.
        if centroids_mm[m] - centroids_mm[chain[-1]] >= 0.75 * spacing:
            chain.append(int(m))
        elif volumes_ml[m] > volumes_ml[chain[-1]]:
            chain[-1] = int(m)  # two pieces of one level: keep the larger
    chain = _fill_rhythm_gaps(chain, centroids_mm, volumes_ml, spacing, 0.15 * typical)
    last = chain[-1]
    cut = np.zeros(n, bool) if cut is None else np.asarray(cut, bool)
    # Anything body-like below the last body (the rest of the sacrum), including small pieces on the column.
    pool = centroids_mm[~cut]
    pool = pool if others_mm is None else np.concatenate([pool, others_mm])
    below = [c for c in pool if c > centroids_mm[last] + 0.3 * spacing]
    end_s1 = _s1_at_column_end(chain, centroids_mm, tilts, volumes_ml, spacing, pool, cut, fov_end_mm,
                               0.5 * cfg.min_body_volume_ml)
    if end_s1 is not None:
        chain = [*chain, end_s1] if end_s1 != last else chain
        flags.append("S1_AT_COLUMN_END")
        notes.append("S1 taken as the lowest body of the column: nothing body-like below it, and the column's most "
                     "steeply tilted body is at its end (the lumbosacral junction)")
    elif not below or len(chain) < 2:
        flags += ["NO_SACRUM_FOUND", "PARTIAL_FOV"]
        notes.append("no sacrum below the lowest body: levels cannot be counted from S1; bodies are numbered B1.. from the top")
        for idx in chain:
            names[idx] = f"B{idx + 1}"  # position among all components, so names stay unique
        return names, 0.3, flags, notes
    conf = 0.8 if end_s1 is None else 0.6
    for r, idx in enumerate(reversed(chain)):  # r = 0 for S1
        if r == 0:
            names[idx] = "S1"
        elif r <= 5:
            names[idx] = LUMBAR_LEVELS[5 - r]
        elif r - 6 < 12:
            names[idx] = f"T{12 - (r - 6)}"
    if len(chain) < 6:
        flags.append("PARTIAL_FOV")
        notes.append(f"only {len(chain) - 1} bodies above S1 are in view")
    chain_gaps = np.diff(centroids_mm[chain])
    if chain_gaps.size >= 3 and (chain_gaps.max() > 1.6 * np.median(chain_gaps)):
        flags.append("COUNT_AMBIGUOUS")
        notes.append("uneven spacing between bodies: a level may be missing")
        conf -= 0.3
    if len(chain) >= 2 and volumes_ml[chain[-1]] < 0.6 * np.median(volumes_ml[chain[:-1]]):
        notes.append("the body taken as S1 is small for a first sacral body")
        conf -= 0.1
    if abs(tilts[chain[-2]]) >= cfg.sacral_tilt_deg if len(chain) >= 2 else False:
        flags.append("POSSIBLE_TRANSITIONAL_VERTEBRA")
        notes.append("the lowest lumbar body is steeply tilted (possible lumbosacral transitional vertebra)")
        conf -= 0.2
    return names, float(max(0.1, conf)), flags, notes

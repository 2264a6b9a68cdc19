"""Stage 4: zones, robust signal statistics, normal-marrow reference, heights and disc signal.

Everything is computed over all bodies at once from the flat indices of body voxels:

* A *column* is one (body, anterior-posterior position, slice) line along axis 0 (superior -> inferior).
  Its top (superior endplate) and bottom (inferior endplate) rows are the minimum and maximum row of its
  voxels, gathered without a loop on the dense (body, row, slice) grid of columns (``np.minimum.at``).
* A voxel's *lateral depth* is its distance across slices (axis 2) to the body's outermost slice on its
  (body, row, anterior-posterior position) line: 0 on that outermost slice, which always straddles the lateral
  surface (a 3-4 mm sagittal slice averages marrow with whatever lies beside the body); infinite in a body
  that spans fewer than 3 slices (a one- or two-slice volume), whose lateral surface is not resolved. It is
  measured to the voxel's near face (the endplate depth to its centre): at 4 mm slices the outermost slice is
  out, at 1 mm slices the outer two. A body cut by the field of view's first or last slice loses that slice too.
* Zones: superior band = within ``endplate_band_mm`` of the column top (capped at a fraction of the
  column height), inferior band likewise from the bottom, core = far from both endplates and from the
  anterior / posterior rim.  ``zone_map`` = body label value * 10 + zone code (1 core, 2 superior, 3 inferior).
* Statistics per (body, zone, sequence) come from one grouped sort (voxels grouped by a stable radix sort of
  the group number, then each group sorted): percentiles are read at group offsets with linear interpolation
  (the same definition as ``np.percentile``'s default).

Heights are column heights along axis 0 (the scanner's superior-inferior axis); for a body tilted by
lordosis they overestimate the true height by 1/cos(tilt) (~3 % at 15 deg) — equally for anterior and
posterior, so the ratios that drive the fracture flag are unaffected.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import MeasurementConfig
from pipeline.types import Segmentation

ZONE_CORE, ZONE_SUPERIOR, ZONE_INFERIOR = 1, 2, 3
ZONE_NAMES = {ZONE_CORE: "core", ZONE_SUPERIOR: "superior", ZONE_INFERIOR: "inferior"}
SEQUENCES = ("T1", "T2", "STIR")
QUANTILES = (0.5, 0.10, 0.90, 0.25, 0.75)
# A body's lateral surface is read across slices only when the body spans at least this many (vox_lateral_mm).
MIN_LATERAL_SLICES = 3

# Bodies that may contribute to the normal-marrow reference: the lumbar bodies and the lower thoracic
# ones; the sacrum's marrow is normally fattier and partly out of the sagittal slab.
_REFERENCE_EXCLUDED = ("S1",)


@dataclass
class StudyMeasurements:
    levels: list[str]
    values: np.ndarray  # label value per body (top -> bottom)
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    vertebrae: list[dict]  # measurement part of the per-vertebra records
    discs: list[dict]
    reference: dict
    zone_map: np.ndarray  # int16, body value * 10 + zone code
    # Per body voxel (aligned arrays): flat index, body ordinal, zone, depths from the endplates (mm),
    # column height (mm), ratio to the reference per sequence (None when that reference is undefined).
    vox_index: np.ndarray
    vox_body: np.ndarray
    vox_zone: np.ndarray
    vox_depth_sup_mm: np.ndarray
    vox_depth_inf_mm: np.ndarray
    vox_col_height_mm: np.ndarray
    vox_rim_mm: np.ndarray  # distance to the anterior / posterior edge of the body in its slice
    vox_ratio: dict[str, np.ndarray | None]
    body_voxels: np.ndarray  # voxels per body
    labelling_confidence: float
    warnings: list[str] = field(default_factory=list)
    # Distance (mm) from the voxel's near face to the body's lateral surface across slices (module doc); None:
    # not measured (treated as deep).
    vox_lateral_mm: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------- kernels
def group_quantiles(values: np.ndarray, groups: np.ndarray, n_groups: int, qs=QUANTILES) -> np.ndarray:
    """Quantiles of ``values`` per group in one grouped sort; rows of NaN for empty groups.

    Linear interpolation between order statistics, identical to ``np.percentile(..., method='linear')``.
    """
    out = np.full((n_groups, len(qs)), np.nan, dtype=np.float64)
    if values.size == 0:
        return out
    # Grouped by a stable sort of the group numbers (radix sort on a small integer type), then each group's
    # values sorted in place: the same sorted values as one lexsort of (value, group), ten times faster.
    order = np.argsort(groups.astype(np.min_scalar_type(max(n_groups - 1, 0)), copy=False), kind="stable")
    v = values[order]
    counts = np.bincount(groups, minlength=n_groups)
    ends = np.cumsum(counts)
    starts = ends - counts
    for g in np.flatnonzero(counts > 1):  # a loop over groups (bodies x zones), not voxels
        v[starts[g]:ends[g]].sort()
    v = v.astype(np.float64)
    has = counts > 0
    for qi, q in enumerate(qs):
        pos = q * (counts[has] - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, counts[has] - 1)
        frac = pos - lo
        base = starts[has]
        out[has, qi] = v[base + lo] * (1 - frac) + v[base + hi] * frac
    return out


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


# ---------------------------------------------------------------------------------------------- main
def measure_study(images: dict[str, np.ndarray], seg: Segmentation, spacing, cfg: MeasurementConfig) -> StudyMeasurements:
    """Zones, statistics, reference, ratios, heights and discs for every body of ``seg`` (see module doc)."""
    labels = seg.labels
    shape = labels.shape
    sp = tuple(float(s) for s in spacing)
    ni, nj, nk = shape
    bodies = list(seg.bodies)
    values = np.array([b.value for b in bodies], dtype=np.int64)
    levels = [b.level for b in bodies]
    n = len(bodies)
    warnings: list[str] = []

    lut = np.full(int(max(values.max(initial=0), labels.max(initial=0))) + 1, -1, dtype=np.int64)
    lut[values] = np.arange(n)
    flat_labels = labels.reshape(-1)
    idx = np.flatnonzero(flat_labels > 0)
    body = lut[flat_labels[idx]]
    keep = body >= 0
    idx, body = idx[keep], body[keep]
    i, rem = np.divmod(idx, nj * nk)
    j, k = np.divmod(rem, nk)

    # Columns along axis 0: top / bottom rows, height.
    # (body, row, slice) columns are few next to the voxels: their top and bottom rows live on that dense grid
    # (-1: the body has no voxel in the column), which the discs read too.
    col_key = (body * nj + j) * nk + k
    col_top = np.full(n * nj * nk, ni, dtype=np.int64)
    col_bottom = np.full(n * nj * nk, -1, dtype=np.int64)
    np.minimum.at(col_top, col_key, i)
    np.maximum.at(col_bottom, col_key, i)
    col_top[col_top == ni] = -1
    top, bottom = col_top[col_key], col_bottom[col_key]
    col_h = (bottom - top + 1).astype(np.float32)
    depth_sup = (i - top).astype(np.float32)
    depth_inf = (bottom - i).astype(np.float32)

    band = np.minimum(np.float32(cfg.endplate_band_mm / sp[0]), np.float32(cfg.endplate_band_max_fraction) * col_h)
    zone = np.zeros(idx.size, dtype=np.int8)
    in_sup = depth_sup < band
    in_inf = depth_inf < band
    zone[in_sup & (~in_inf | (depth_sup <= depth_inf))] = ZONE_SUPERIOR
    zone[in_inf & (~in_sup | (depth_inf < depth_sup))] = ZONE_INFERIOR

    # Core: away from both endplates and from the anterior / posterior rim of the body in that slice.
    ak_inv = body * nk + k  # (body, slice) pairs are few (bodies x slices): indexed directly
    jmin = np.full(n * nk, nj, dtype=np.int64)
    jmax = np.full(n * nk, -1, dtype=np.int64)
    np.minimum.at(jmin, ak_inv, j)
    np.maximum.at(jmax, ak_inv, j)
    width = (jmax - jmin + 1)[ak_inv].astype(np.float32)
    rim = np.float32(0.15) * width
    margin = np.float32(cfg.core_margin_fraction) * col_h
    rim_mm = np.minimum(j - jmin[ak_inv], jmax[ak_inv] - j).astype(np.float32) * np.float32(sp[1])
    core = (depth_sup >= margin) & (depth_inf >= margin) & (j - jmin[ak_inv] >= rim) & (jmax[ak_inv] - j >= rim)
    zone[core & (zone == 0)] = ZONE_CORE
    lateral_mm = _lateral_depth_mm(body, i, j, k, n, ni, nj, nk, sp[2])

    zone_map = np.zeros(shape, dtype=np.int16)
    zflat = zone_map.reshape(-1)
    zsel = zone > 0
    zflat[idx[zsel]] = (values[body[zsel]] * 10 + zone[zsel]).astype(np.int16)

    body_voxels = np.bincount(body, minlength=n)
    voxel_mm3 = sp[0] * sp[1] * sp[2]

    # Statistics per (body, zone) for each sequence in one sort each.
    groups = body[zsel] * 3 + (zone[zsel] - 1)
    n_groups = n * 3
    group_n = np.bincount(groups, minlength=n_groups)
    stats: dict[str, np.ndarray] = {}
    for seq in SEQUENCES:
        img = images.get(seq)
        if img is None:
            continue
        vals = img.reshape(-1)[idx[zsel]].astype(np.float32)
        stats[seq] = group_quantiles(vals, groups, n_groups)

    central = _central_slices(body, k, n, nk, sp)  # used by the heights and the discs
    heights = _heights(body, i, j, k, top, bottom, n, sp, central, cfg)
    height_ratios = _height_ratios(heights, levels)

    reference, in_ref = _reference(images, stats, idx, body, zone, levels, height_ratios, n, warnings)

    vox_ratio: dict[str, np.ndarray | None] = {}
    for seq in SEQUENCES:
        img = images.get(seq)
        ref = reference.get(seq)
        if img is None:
            continue
        if ref is None:
            vox_ratio[seq] = None
            continue
        vox_ratio[seq] = (img.reshape(-1)[idx].astype(np.float32) / np.float32(ref))

    vertebrae = []
    for b in range(n):
        zones = {}
        for z in (ZONE_CORE, ZONE_SUPERIOR, ZONE_INFERIOR):
            g = b * 3 + (z - 1)
            signal: dict[str, dict | None] = {}
            for seq in SEQUENCES:
                if seq not in stats or group_n[g] == 0:
                    signal[seq] = None
                    continue
                med, p10, p90, p25, p75 = stats[seq][g]
                ref = reference.get(seq)
                signal[seq] = {
                    "median": float(med), "p10": float(p10), "p90": float(p90), "iqr": float(p75 - p25),
                    "ratio": _none_if_nan(med / ref) if ref else None,
                }
            zones[ZONE_NAMES[z]] = {"n_voxels": int(group_n[g]), "signal": signal}
        vertebrae.append({
            "level": levels[b],
            "label_value": int(values[b]),
            "n_voxels": int(body_voxels[b]),
            "volume_mm3": round(float(body_voxels[b] * voxel_mm3), 1),
            "heights_mm": {k2: _none_if_nan(v) for k2, v in heights[b].items()},
            "height_ratios": height_ratios[b],
            "zones": zones,
            "in_reference": bool(in_ref[b]),
        })

    discs = _discs(images.get("T2"), col_top.reshape(n, nj, nk), col_bottom.reshape(n, nj, nk), levels, n, shape, sp,
                   central, reference.get("T2"))

    return StudyMeasurements(
        levels=levels, values=values, spacing=sp, shape=shape, vertebrae=vertebrae, discs=discs, reference=reference,
        zone_map=zone_map, vox_index=idx, vox_body=body, vox_zone=zone,
        vox_depth_sup_mm=depth_sup * np.float32(sp[0]), vox_depth_inf_mm=depth_inf * np.float32(sp[0]),
        vox_col_height_mm=col_h * np.float32(sp[0]), vox_rim_mm=rim_mm, vox_ratio=vox_ratio, body_voxels=body_voxels,
        labelling_confidence=float(seg.labelling_confidence), warnings=warnings, vox_lateral_mm=lateral_mm,
    )


def _lateral_depth_mm(body, i, j, k, n, ni, nj, nk, slice_mm) -> np.ndarray:
    """Per body voxel, slices (in mm) between it and the outermost slice of its (body, row, AP position) line
    (module doc); +inf in a body that spans fewer than ``MIN_LATERAL_SLICES`` slices (a one- or two-slice volume,
    a body cut by the field of view): its lateral surface is not resolved, and excluding its outer slices would
    leave nothing to read. The lines live on a dense grid of each body's own (row, AP) bounding box, one after the
    other (a few bodies' boxes, not bodies x the whole plane)."""
    if nk < MIN_LATERAL_SLICES:
        return np.full(body.size, np.inf, dtype=np.float32)
    lo_i, hi_i = np.full(n, ni, np.int64), np.full(n, -1, np.int64)
    lo_j, hi_j = np.full(n, nj, np.int64), np.full(n, -1, np.int64)
    np.minimum.at(lo_i, body, i)
    np.maximum.at(hi_i, body, i)
    np.minimum.at(lo_j, body, j)
    np.maximum.at(hi_j, body, j)
    rows, cols = np.maximum(hi_i - lo_i + 1, 0), np.maximum(hi_j - lo_j + 1, 0)
    start = np.concatenate([[0], np.cumsum(rows * cols)])
    line = start[body] + (i - lo_i[body]) * cols[body] + (j - lo_j[body])
    kmin = np.full(int(start[-1]), nk, dtype=np.int32)
    kmax = np.full(int(start[-1]), -1, dtype=np.int32)
    np.minimum.at(kmin, line, k.astype(np.int32))
    np.maximum.at(kmax, line, k.astype(np.int32))
    steps = np.minimum(k - kmin[line], kmax[line] - k)
    depth = steps.astype(np.float32) * np.float32(slice_mm)
    span = np.zeros(n, dtype=np.int64)
    np.maximum.at(span, body, kmax[line] - kmin[line] + 1)
    depth[span[body] < MIN_LATERAL_SLICES] = np.inf
    return depth


def _central_slices(body, k, n, nk, sp) -> tuple[np.ndarray, np.ndarray]:
    """Per body, the centre slice and a half-width of ~3 mm, so heights come from the mid-sagittal part."""
    counts = np.maximum(np.bincount(body, minlength=n), 1)
    kc = np.rint(np.bincount(body, weights=k, minlength=n) / counts).astype(np.int64)
    half = max(0, int(round(3.0 / sp[2])))
    return kc, np.full(n, half)


def _heights(body, i, j, k, top, bottom, n, sp, central_slices, cfg) -> list[dict[str, float]]:
    """Anterior / middle / posterior heights (mm) in the mid-sagittal slab of each body.

    Lordosis tilts the bodies, so heights are taken perpendicular to the body's own endplate direction:
    the tilt is fitted to the column tops and bottoms (least squares, all bodies at once), voxels are
    rotated into (AP, height) body coordinates, and the height is the extent along the height axis in
    bins along AP. The outermost 5 % at each end (rounded corners) are left out.
    """
    kc, half = central_slices
    central = np.abs(k - kc[body]) <= half[body]
    nan = {"anterior": float("nan"), "middle": float("nan"), "posterior": float("nan")}
    if not central.any():
        return [dict(nan) for _ in range(n)]
    b, ii, jj = body[central], i[central].astype(np.float64), j[central].astype(np.float64)
    is_top = (i == top)[central]
    is_bot = (i == bottom)[central]
    slopes = []
    for sel in (is_top, is_bot):  # fit row = a + slope * col per body on the top and bottom surfaces
        w = np.bincount(b[sel], minlength=n).astype(np.float64)
        sx = np.bincount(b[sel], weights=jj[sel], minlength=n)
        sy = np.bincount(b[sel], weights=ii[sel], minlength=n)
        sxx = np.bincount(b[sel], weights=jj[sel] ** 2, minlength=n)
        sxy = np.bincount(b[sel], weights=jj[sel] * ii[sel], minlength=n)
        den = w * sxx - sx**2
        slopes.append(np.where(den > 0, (w * sxy - sx * sy) / np.where(den > 0, den, 1), 0.0))
    slope_mm = (slopes[0] + slopes[1]) / 2 * sp[0] / sp[1]  # d(row mm) / d(col mm)
    theta = np.arctan(slope_mm)
    c, s_ = np.cos(theta)[b], np.sin(theta)[b]
    y, x = ii * sp[0], jj * sp[1]
    a = x * c + y * s_  # along the endplates (anterior -> posterior)
    h = -x * s_ + y * c  # across the endplates (height)
    amin = np.full(n, np.inf)
    amax = np.full(n, -np.inf)
    np.minimum.at(amin, b, a)
    np.maximum.at(amax, b, a)
    nbins = 20
    rel = (a - amin[b]) / np.maximum(amax[b] - amin[b], 1e-6)
    key = b * nbins + np.minimum((rel * nbins).astype(np.int64), nbins - 1)
    hmin = np.full(n * nbins, np.inf)
    hmax = np.full(n * nbins, -np.inf)
    np.minimum.at(hmin, key, h)
    np.maximum.at(hmax, key, h)
    ext = (hmax - hmin + sp[0] * np.abs(np.cos(theta)).repeat(nbins)).reshape(n, nbins)
    ext[~np.isfinite(ext)] = np.nan
    f = cfg.height_zone_fraction
    lo_bins = slice(1, max(2, int(round((0.05 + f) * nbins))))  # 5 % .. 5 % + f of the AP depth
    hi_bins = slice(nbins - max(2, int(round((0.05 + f) * nbins))), nbins - 1)
    mid_bins = slice(int(nbins / 2 - f * nbins / 2), int(np.ceil(nbins / 2 + f * nbins / 2)))
    out = []
    with warnings.catch_warnings():  # a zone with no column of the body (degenerate mask): height NaN, unmeasured
        warnings.simplefilter("ignore", RuntimeWarning)
        ant = np.nanmedian(ext[:, lo_bins], axis=1) if n else np.array([])
        mid = np.nanmedian(ext[:, mid_bins], axis=1) if n else np.array([])
        post = np.nanmedian(ext[:, hi_bins], axis=1) if n else np.array([])
    for bi in range(n):
        out.append({"anterior": float(ant[bi]), "middle": float(mid[bi]), "posterior": float(post[bi])})
    return out


def _height_ratios(heights: list[dict[str, float]], levels: list[str]) -> list[dict]:
    post = np.array([h["posterior"] for h in heights], dtype=np.float64)
    out = []
    for b, h in enumerate(heights):
        neighbours = [post[x] for x in (b - 1, b + 1) if 0 <= x < len(heights) and levels[x] != "S1"
                      and np.isfinite(post[x])]
        own = np.nanmin([h["anterior"], h["middle"], h["posterior"]]) if np.isfinite(
            [h["anterior"], h["middle"], h["posterior"]]).any() else np.nan
        out.append({
            "anterior_to_posterior": _none_if_nan(h["anterior"] / h["posterior"]) if h["posterior"] else None,
            "middle_to_posterior": _none_if_nan(h["middle"] / h["posterior"]) if h["posterior"] else None,
            "to_neighbours": _none_if_nan(own / np.mean(neighbours)) if neighbours and levels[b] != "S1" else None,
        })
    return out


def _reference(images, stats, idx, body, zone, levels, height_ratios, n, warnings):
    """Normal-marrow reference per sequence from the cores of bodies that are not themselves abnormal."""
    candidates = np.array([lv not in _REFERENCE_EXCLUDED for lv in levels], dtype=bool)
    for b, hr in enumerate(height_ratios):
        vals = [v for v in hr.values() if v is not None]
        if vals and min(vals) < 0.8:  # collapsed body: its marrow is not a normal reference
            candidates[b] = False
    core_g = np.arange(n) * 3  # core group of each body
    for st in stats.values():
        med = st[core_g, 0]
        ok = candidates & np.isfinite(med)
        if ok.sum() >= 3:
            centre = np.median(med[ok])
            mad = np.median(np.abs(med[ok] - centre)) * 1.4826
            # The MAD of 4-6 bodies can be tiny; a floor of 10 % of the level keeps normal variation in.
            scale = max(mad, 0.10 * abs(centre), 1e-6)
            outlier = np.abs(med - centre) / scale > 2.5
            candidates &= ~(outlier & np.isfinite(med))
    if not candidates.any():
        candidates = np.array([lv not in _REFERENCE_EXCLUDED for lv in levels], dtype=bool)
        warnings.append("every vertebral core looked abnormal; the reference uses all lumbar cores")
    sel = (zone == ZONE_CORE) & candidates[body]
    ref: dict = {"T1": None, "T2": None, "STIR": None}
    for seq in SEQUENCES:
        img = images.get(seq)
        if img is None:
            continue
        vals = img.reshape(-1)[idx[sel]]
        value = float(np.median(vals)) if vals.size else float("nan")
        if not np.isfinite(value) or value <= 0:
            warnings.append(f"no usable normal-marrow reference on {seq} (median {value}); its ratios are undefined")
            continue
        ref[seq] = value
    ref["levels_used"] = [levels[b] for b in range(n) if candidates[b]]
    ref["n_voxels"] = int(sel.sum())
    ref["method"] = ("median of the central-core voxels of bodies whose core median is within 2.5 robust SD "
                     "(MAD, floor 10 %) of the others on every sequence, excluding S1 and collapsed bodies")
    return ref, candidates


def _discs(t2, top_g, bot_g, levels, n, shape, sp, central_slices, ref_t2) -> list[dict]:
    """Disc between consecutive bodies: rows between the upper body's bottom and the lower body's top.
    ``top_g`` / ``bot_g``: (body, row, slice) top and bottom rows of every column, -1 where the body has none."""
    if n < 2:
        return []
    ni, nj, nk = shape
    kc, half = central_slices
    out = []
    medians = []
    for a in range(n - 1):  # loop over disc levels (<= ~9), not voxels
        b = a + 1
        both = (bot_g[a] >= 0) & (top_g[b] >= 0)
        kk = np.arange(nk)
        centre_k = (np.abs(kk - kc[a]) <= half[a]) | (np.abs(kk - kc[b]) <= half[b])
        both &= centre_k[None, :]
        jj = np.nonzero(both.any(axis=1))[0]
        if jj.size:
            lo, hi = jj.min(), jj.max()
            w = hi - lo + 1
            central_j = np.zeros(nj, dtype=bool)
            central_j[lo + w // 4: hi - w // 4 + 1] = True
            both &= central_j[:, None]
        cj, ck = np.nonzero(both)
        gap_lo = bot_g[a][cj, ck] + 1
        gap_hi = top_g[b][cj, ck]  # exclusive
        gaps = gap_hi - gap_lo
        valid = gaps > 0
        height = float(np.median(gaps[valid]) * sp[0]) if valid.any() else None
        t2_median = None
        if t2 is not None and valid.any():
            maxgap = int(gaps[valid].max())
            rows = gap_lo[valid][None, :] + np.arange(maxgap)[:, None]
            inside = rows < gap_hi[valid][None, :]
            vals = t2[np.clip(rows, 0, ni - 1), cj[valid][None, :], ck[valid][None, :]][inside]
            t2_median = float(np.median(vals)) if vals.size else None
        medians.append(t2_median)
        out.append({
            "level": f"{levels[a]}-{levels[b]}", "upper": levels[a], "lower": levels[b],
            "height_mm": _none_if_nan(height) if height is not None else None,
            "t2_median": t2_median,
            "t2_ratio_to_marrow": (t2_median / ref_t2) if (t2_median is not None and ref_t2) else None,
            "t2_ratio_to_discs": None,
            "bright": False,
        })
    ok = [m for m in medians if m is not None]
    if ok:
        centre = float(np.median(ok))
        for d, m in zip(out, medians, strict=True):
            if m is not None and centre > 0:
                d["t2_ratio_to_discs"] = m / centre
    return out

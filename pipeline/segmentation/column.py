"""The spinal column: a curve fitted through the body probability (RANSAC) and the column cut into
bodies at the disc dips of the probability along it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.segmentation.grid import keep_largest_piece


# ---------------------------------------------------------------------------------------------- instances
def spine_curve(mask: np.ndarray, sp, band_mm: float = 15.0, inlier_mm: float = 12.0,
                seed: int = 0) -> np.ndarray | None:
    """Polynomial AP(SI) position (mm) of the spinal column through the body-like voxels of ``mask``.

    Candidate points: the mask is cut into ``band_mm`` horizontal bands; in each band the voxel count per AP
    column (summed over rows and slices, smoothed) has a peak wherever a tall structure stands — the column
    is one of them, however the mask's 3-D components are merged. RANSAC over quadratics through three peaks
    keeps the curve with the largest sum, over bands, of the largest peak within ``inlier_mm`` (the column
    runs through the whole field of view with a strong peak in every band; bowel, muscle and pelvis do not);
    it is refitted on those inliers. Curves steeper than 50 degrees from the SI axis are rejected (the column
    runs head to foot in a sagittal image). ``None`` when fewer than two peaks are found.
    """
    from scipy import signal

    n_bands = int(np.ceil(mask.shape[0] * sp[0] / band_mm))
    band_rows = (np.arange(mask.shape[0]) * sp[0] // band_mm).astype(np.int64)
    per_row = mask.sum(axis=2, dtype=np.float64)  # rows x AP columns
    mass = np.zeros((n_bands, mask.shape[1]))
    np.add.at(mass, band_rows, per_row)
    mass = ndimage.gaussian_filter1d(mass, 5.0 / sp[1], axis=1) * float(np.prod(sp)) / 1000.0  # ml per column
    ys, xs, ws, bs = [], [], [], []
    for b in range(n_bands):  # loop over ~25 bands
        peaks, props = signal.find_peaks(mass[b], height=0.05, distance=max(1, int(20.0 / sp[1])))
        top = peaks[np.argsort(props["peak_heights"])[::-1][:4]]
        ys += [(b + 0.5) * band_mm] * top.size
        xs += list(top * sp[1])
        ws += list(mass[b, top])
        bs += [b] * top.size
    y, x, w, band_of = np.asarray(ys), np.asarray(xs, float), np.asarray(ws), np.asarray(bs, np.int64)
    if y.size < 2 or np.ptp(y) == 0:
        return None
    if y.size < 3 or np.ptp(y) < 2 * band_mm:
        return np.polyfit(y, x, 1, w=np.sqrt(w))
    rng = np.random.default_rng(seed)
    yr = np.linspace(y.min(), y.max(), 8)
    prob = w / w.sum()
    # RANSAC: 300 draws of three peaks (drawn one after the other, as the seed fixes them), each a quadratic through
    # its three points; the fits and scores are computed for all draws at once.
    picks = np.stack([rng.choice(y.size, 3, replace=False, p=prob) for _ in range(300)])
    py, px = y[picks], x[picks]
    ok = (py[:, 0] != py[:, 1]) & (py[:, 0] != py[:, 2]) & (py[:, 1] != py[:, 2])  # three bands, or undetermined
    best = None
    if ok.any():
        py, px = py[ok], px[ok]
        coefs = np.linalg.solve(np.stack([py * py, py, np.ones_like(py)], axis=2), px[:, :, None])[:, :, 0]
        slopes = 2 * coefs[:, :1] * yr[None, :] + coefs[:, 1:2]
        coefs = coefs[np.abs(slopes).max(axis=1) <= 1.2]  # steeper than ~50 degrees: not a column
        if coefs.size:
            fit = coefs[:, :1] * y[None, :] ** 2 + coefs[:, 1:2] * y[None, :] + coefs[:, 2:]
            inl = np.abs(x[None, :] - fit) <= inlier_mm
            per_band = np.zeros((coefs.shape[0], n_bands))
            draw, point = np.nonzero(inl)
            np.maximum.at(per_band, (draw, band_of[point]), w[point])
            best = coefs[int(np.argmax(per_band.sum(axis=1)))]  # the first of equal scores, as a loop would keep
    if best is None:
        return np.polyfit(y, x, 1, w=np.sqrt(w))
    for _ in range(2):
        inl = np.abs(x - np.polyval(best, y)) <= inlier_mm
        if inl.sum() < 3:
            break
        refit = np.polyfit(y[inl], x[inl], 2 if np.ptp(y[inl]) >= 3 * band_mm else 1, w=np.sqrt(w[inl]))
        if np.abs(np.polyval(np.polyder(refit), yr)).max() > 1.2:
            break
        best = refit
    return best


def column_coordinates(coef: np.ndarray, shape, sp) -> tuple[np.ndarray, np.ndarray]:
    """In-plane (rows x cols) coordinates relative to the column curve x = f(y): signed perpendicular distance
    (mm, + = posterior) and position along the column (mm, foot of the perpendicular, first order)."""
    y = (np.arange(shape[0]) * sp[0])[:, None]
    x = (np.arange(shape[1]) * sp[1])[None, :]
    fy = np.polyval(coef, y)
    slope = np.polyval(np.polyder(coef), y)
    norm2 = 1.0 + slope * slope
    return (x - fy) / np.sqrt(norm2), y + slope * (x - fy) / norm2


SHALLOW_CUT = 0.3  # a disc empties the column profile (<= 0.11 of a body's peak on real scans); a dark band in a body does not


MERGED_BODY_MAX = 1.3  # two pieces form one body when together they span at most this many typical disc-to-disc intervals


def _disc_rhythm(profile: np.ndarray, minima: np.ndarray) -> tuple[float, float] | None:
    """(median height of the profile's maxima, typical disc-to-disc interval in bins from the minima at most
    ``SHALLOW_CUT`` of that height deep), or None when fewer than three minima are that deep."""
    from scipy import signal

    if minima.size < 3:
        return None
    peaks, _ = signal.find_peaks(profile)
    if peaks.size == 0:
        return None
    med = float(np.median(profile[peaks]))
    deep = minima[profile[minima] / med <= SHALLOW_CUT]
    if deep.size < 3:
        return None
    return med, float(np.median(np.diff(deep)))


def drop_shallow_cuts(profile: np.ndarray, minima: np.ndarray) -> np.ndarray:
    """The profile minima (indices, sorted) that are discs: a shallow minimum whose two neighbouring intervals
    together span no more than one body (``MERGED_BODY_MAX`` typical disc-to-disc intervals) lies inside a
    body (a dark band of marrow, a Schmorl node, the basivertebral vein) and is dropped.

    Depth is relative to the median of the profile's maxima: on held-out real scans the discs were 0.00-0.11 of
    it, the cuts through a body 0.38-1.41, and these cuts split 11 of 249 bodies in two (each half scoring
    ~0.5 Dice). The typical interval comes from the deep minima only; a cut next to either end of the profile is
    kept (the interval beyond it is cut by the field of view), so is every cut when fewer than three are deep.
    """
    rhythm = _disc_rhythm(profile, minima)
    if rhythm is None:
        return minima
    med, typical = rhythm
    depth = profile[minima] / med
    kept = list(minima)
    for x in minima[np.argsort(-depth)][: int((depth > SHALLOW_CUT).sum())]:  # the shallow ones, shallowest first
        i = kept.index(x)
        if 0 < i < len(kept) - 1 and kept[i + 1] - kept[i - 1] <= MERGED_BODY_MAX * typical:
            kept.pop(i)
    return np.asarray(kept, dtype=minima.dtype)


LONG_INTERVAL = 1.7  # a stretch of the column this many typical disc-to-disc intervals long holds two bodies


MISSED_CUT_DEPTH = 0.8  # ... and is cut at its lowest profile minimum if that is at most this deep (cf. SHALLOW_CUT)


def add_missed_cuts(profile: np.ndarray, minima: np.ndarray) -> np.ndarray:
    """The minima plus a cut in every stretch of the profile (between cuts, or a cut and an end of the profile)
    at least ``LONG_INTERVAL`` typical intervals long: at its lowest local minimum at least 0.6 of an interval from
    both ends, when that minimum is below ``MISSED_CUT_DEPTH`` of the peaks' median.

    The peak finder's prominence test misses a disc that dips the profile only part way (a steep lumbosacral
    junction seen through a slightly different column curve: a held-out scan's L4 + L5 became one 89 ml body
    named S1, its neighbours 40-45 ml). Typical interval and depth as in :func:`drop_shallow_cuts`.
    """
    from scipy import signal

    rhythm = _disc_rhythm(profile, minima)
    if rhythm is None:
        return minima
    med, typical = rhythm
    margin = int(np.ceil(0.6 * typical))
    bounds = np.r_[0, minima, profile.size - 1]
    added = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b - a < LONG_INTERVAL * typical or b - a <= 2 * margin:
            continue
        inner, _ = signal.find_peaks(-profile[a + margin: b - margin + 1])
        if inner.size:
            x = a + margin + int(inner[np.argmin(profile[a + margin + inner])])
            if profile[x] <= MISSED_CUT_DEPTH * med:
                added.append(x)
    return np.sort(np.r_[minima, np.asarray(added, dtype=minima.dtype)]) if added else minima


def split_column(prob: np.ndarray, sp, threshold: float = 0.5, tube_mm: float = 35.0,
                 min_gap_mm: float = 18.0, core_mm: float = 4.0,
                 low_threshold: float = 0.2, grow_threshold: float | None = None,
                 grow_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Instances (one label per body, top -> bottom) of ``prob > threshold`` along the spinal column, and the
    column curve (:func:`spine_curve` coefficients, None when no column was found).

    The column curve is fitted through the mask (:func:`spine_curve`); mask voxels within ``tube_mm`` of it are
    projected onto it, and the probability mass per mm along the column drops at every disc. The minima of
    that profile (at least ``min_gap_mm`` apart) are the discs; voxels more than ``core_mm`` from a disc seed
    their body, and a watershed on the probability grows the seeds through the rest of the mask, so the split
    follows the actual (tilted, wedge-shaped) disc rather than a straight cut. Each body keeps its largest
    connected piece. Thin discs that a pixel classifier bridges no longer merge bodies, and everything off the
    column (bowel, iliac bone, pelvis) is gone. A body missing from the rhythm is looked for at
    ``low_threshold`` (:func:`_recover_missing_bodies`).

    With ``grow_threshold`` below ``threshold``, the watershed also floods voxels above ``grow_threshold`` within
    ``grow_mm`` of the mask: the classifier is under-confident at the edge of bodies it has not seen (held out on
    real scans, the bodies came out too small), while the curve, the disc cuts and the seeds still come from the
    confident mask, so a lower cut cannot bridge two bodies. The distance limit keeps a body from flooding
    along a low-probability tongue into tissue it merely touches (a phantom's S2 below S1).
    """
    from scipy import signal
    from skimage.segmentation import watershed

    mask = ndimage.binary_opening(prob > threshold, structure=np.ones((3, 3, 1), bool))
    out = np.zeros(prob.shape, np.int32)
    coef = spine_curve(mask, sp)
    if coef is None:
        return out, None
    dist, along = column_coordinates(coef, prob.shape, sp)
    tube = (np.abs(dist) <= tube_mm)[:, :, None]
    mask &= tube
    if not mask.any():
        return out, coef
    # crop to the tube (and the growth margin): the rest of the field of view is empty from here on
    box = ndimage.find_objects(mask.astype(np.int8))[0]
    growing = grow_threshold is not None and grow_threshold < threshold and grow_mm > 0
    if growing:
        pad = [int(np.ceil(grow_mm / s)) for s in sp]
        box = tuple(slice(max(b.start - d, 0), min(b.stop + d, n)) for b, d, n in zip(box, pad, mask.shape, strict=True))
    m, p = mask[box], prob[box]
    grown = m
    if growing:
        near = ndimage.distance_transform_edt(~m, sampling=sp) <= grow_mm
        grown = m | (near & (p > grow_threshold) & tube[box[:2]])
    u = np.broadcast_to(along[box[:2]][:, :, None], m.shape)
    bins = np.round(u[m] / sp[0]).astype(np.int64)
    first = int(bins.min())
    profile = ndimage.gaussian_filter1d(np.bincount(bins - first, weights=p[m]), 1.0)
    minima, _ = signal.find_peaks(-profile, distance=max(1, int(min_gap_mm / sp[0])), prominence=0.1 * profile.max())
    minima = add_missed_cuts(profile, drop_shallow_cuts(profile, minima))
    cuts = (minima + first) * sp[0]
    which = np.digitize(u, np.r_[-np.inf, cuts, np.inf]).astype(np.int32)  # 1 .. len(cuts) + 1
    if cuts.size:
        # distance to the nearest cut (cuts are sorted): the cut at or above and the one below
        i = np.clip(np.searchsorted(cuts, u), 1, cuts.size) - 1
        j = np.minimum(i + 1, cuts.size - 1)
        near_cut = np.minimum(np.abs(u - cuts[i]), np.abs(u - cuts[j]))
    else:
        near_cut = np.full(m.shape, np.inf)
    markers = np.where(m & (near_cut >= core_mm), which, 0)
    lab = watershed(-p, markers, mask=grown)
    for lid, found in enumerate(ndimage.find_objects(lab), start=1):  # loop over ~10 bodies
        if found is not None:
            keep_largest_piece(lab[found], lid)  # a stray blob of the same interval is dropped
    lab = _recover_missing_bodies(lab, p, u, tube[box[:2]], sp, low_threshold)
    out[box] = lab
    return out, coef


def _recover_missing_bodies(lab: np.ndarray, prob: np.ndarray, along: np.ndarray, tube: np.ndarray, sp,
                            low_threshold: float, min_ml: float = 2.0) -> np.ndarray:
    """Fill a body-sized hole in the column: where two consecutive bodies are more than 1.6 typical spacings
    apart, a body between them was too abnormal for the classifier (a fracture with edema, dark sclerosis);
    the largest connected piece of ``prob > low_threshold`` in that gap (on the column, >= ``min_ml``) becomes
    a body of its own."""
    ids = np.unique(lab[lab > 0])
    if ids.size < 3:
        return lab
    flat_u = np.broadcast_to(along, lab.shape)
    centre = np.array([np.median(flat_u[lab == i]) for i in ids])  # ~10 bodies
    order = np.argsort(centre)
    ids, centre = ids[order], centre[order]
    spacing = float(np.median(np.diff(centre)))
    next_id = int(lab.max()) + 1
    for a, b in zip(range(ids.size - 1), range(1, ids.size), strict=True):
        if centre[b] - centre[a] <= 1.6 * spacing:
            continue
        top = np.percentile(flat_u[lab == ids[a]], 98) + 2.0
        bottom = np.percentile(flat_u[lab == ids[b]], 2) - 2.0
        cand = (prob > low_threshold) & (lab == 0) & tube & (flat_u > top) & (flat_u < bottom)
        pieces, n = ndimage.label(cand)
        if n == 0:
            continue
        size = np.bincount(pieces.ravel())
        size[0] = 0
        if size.max() * float(np.prod(sp)) / 1000.0 >= min_ml:
            lab[pieces == np.argmax(size)] = next_id
            next_id += 1
    return lab

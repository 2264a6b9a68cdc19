"""Stage 3: vertebral bodies — segmented, separated at the discs, and labelled L1..L5, S1.

Method (no learned weights are downloaded; the small model ships in ``pipeline/models/``):

1. **Working grid.** The sagittal image is resampled in-plane to ``work_mm`` (default 1.5 mm); slices keep
   their spacing. Intensities are scaled by robust percentiles of the foreground, so T1, T2, STIR and
   water-fat images all land in a comparable range.
2. **Body probability per voxel** from a gradient-boosted pixel classifier (scikit-learn
   ``HistGradientBoostingClassifier``) over contrast-agnostic, per-slice features: smoothed intensity at
   three scales, gradient magnitude, Hessian response, and *vertical / horizontal context* — the intensity
   difference to points 6-18 mm above / below and 10-20 mm in front / behind — which captures the
   body / disc alternation along the spine. Trained on the real expert-annotated scans of
   ``../shared/data/vertebral-bodies`` (``python -m pipeline.train_segmenter``; see its doc for the
   leave-one-source-out estimate).
3. **Instances.** Probability > 0.5, small openings removed, then split at the discs: markers are the
   components of the mask eroded along the superior-inferior axis, grown back by a watershed on the
   distance map inside the mask.
4. **Cleanup with anatomical priors.** Components outside the body volume range or off the spinal column
   (robust line through the centroids) are dropped.
5. **Labelling** counts up from the sacrum: the sacral segments are the bottom run of bodies whose
   endplates are steeply tilted (> ``sacral_tilt_deg``) in the direction of the lowest body; the top of
   that run is S1. Without a sacrum in view the bodies are named B1, B2, ... (values 101, 102, ...) and
   the confidence is low.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from .config import SegmentationConfig
from .errors import StudyError
from .types import LUMBAR_LEVELS, Segmentation, VertebralBody, level_value

log = logging.getLogger("modicscan")

MODEL_PATH = Path(__file__).resolve().parent / "models" / "body_classifier.joblib"
WORK_MM = 1.5  # in-plane working resolution (mm)
SLICES_PER_CHUNK = 8  # sagittal slices classified together (bounds the feature matrix)

# Context offsets (mm): (vertical, horizontal) displacements at which the smoothed intensity is compared.
_CONTEXT = [(-18, 0), (-12, 0), (-6, 0), (6, 0), (12, 0), (18, 0), (0, -20), (0, -10), (0, 10), (0, 20)]
FEATURE_NAMES = (["i_s1", "i_s2", "i_s4", "grad_s1", "grad_s2", "hess_s3", "lstd_s3"]
                 + [f"ctx_{dv}_{dh}" for dv, dh in _CONTEXT] + ["ctx_vmin", "ctx_vmax"])


def label_counts_and_centroids(lab: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count and centroid (voxel coordinates) of each label in ``ids``: one bincount per axis, all labels at once.

    (``ndimage.center_of_mass`` with a list of labels is several times slower on full-size label images.)
    """
    ids = np.asarray(ids, dtype=np.int64)
    flat = lab.reshape(-1).astype(np.intp, copy=False)
    if flat.size and flat.min() < 0:  # negative values (foreign label images) belong to no label, as in ndimage
        flat = np.maximum(flat, 0)
    n = int(max(flat.max(initial=0), ids.max(initial=0))) + 1
    counts = np.bincount(flat, minlength=n).astype(np.float64)
    cents = np.zeros((ids.size, lab.ndim))
    for a in range(lab.ndim):
        shape = [1] * lab.ndim
        shape[a] = lab.shape[a]
        coord = np.broadcast_to(np.arange(lab.shape[a], dtype=np.float64).reshape(shape), lab.shape).reshape(-1)
        cents[:, a] = np.bincount(flat, weights=coord, minlength=n)[ids] / np.maximum(counts[ids], 1)
    return counts[ids], cents


# ---------------------------------------------------------------------------------------------- preparation
def to_work_grid(image: np.ndarray, spacing) -> tuple[np.ndarray, tuple[float, float]]:
    """Resample axes 0 and 1 to WORK_MM; returns the array and the zoom factors used."""
    zoom = (float(spacing[0]) / WORK_MM, float(spacing[1]) / WORK_MM)
    if abs(zoom[0] - 1) < 1e-3 and abs(zoom[1] - 1) < 1e-3:
        return image.astype(np.float32, copy=False), zoom
    out = ndimage.zoom(image.astype(np.float32, copy=False), (zoom[0], zoom[1], 1.0), order=1, prefilter=False)
    return out, zoom


def normalise(image: np.ndarray) -> np.ndarray:
    """Scale by robust percentiles of the foreground (voxels above the 40th percentile of non-zero voxels)."""
    nz = image[image > 0]
    if nz.size < 100:
        return np.zeros_like(image, dtype=np.float32)
    sub = nz[:: max(1, nz.size // 200000)]
    fg = sub[sub > np.percentile(sub, 40)]
    lo, hi = np.percentile(fg, [2, 98])
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - lo) / (hi - lo)).astype(np.float32)


def _shift(a: np.ndarray, dv: int, dh: int) -> np.ndarray:
    """a shifted so that out[i, j] = a[i + dv, j + dh] (edge values repeated)."""
    out = a
    if dv:
        idx = np.clip(np.arange(a.shape[0]) + dv, 0, a.shape[0] - 1)
        out = out[idx]
    if dh:
        idx = np.clip(np.arange(a.shape[1]) + dh, 0, a.shape[1] - 1)
        out = out[:, idx]
    return out


def features(norm: np.ndarray) -> np.ndarray:
    """Per-voxel features (voxels x len(FEATURE_NAMES)), computed slice-wise on the working grid."""
    px = WORK_MM

    def g(sigma_mm, order=0):
        return ndimage.gaussian_filter(norm, sigma=(sigma_mm / px, sigma_mm / px, 0), order=order)

    s1, s2, s4 = g(1.0), g(2.0), g(4.0)
    gr1 = np.hypot(ndimage.sobel(s1, 0), ndimage.sobel(s1, 1))
    gr2 = np.hypot(ndimage.sobel(s2, 0), ndimage.sobel(s2, 1))
    s3 = 3.0 / px
    hrr = ndimage.gaussian_filter(norm, (s3, s3, 0), order=(2, 0, 0))
    hcc = ndimage.gaussian_filter(norm, (s3, s3, 0), order=(0, 2, 0))
    hess = (hrr + hcc) * s3 * s3
    mean3 = g(3.0)
    lstd = np.sqrt(np.maximum(ndimage.gaussian_filter(norm * norm, (s3, s3, 0)) - mean3 * mean3, 0))
    feats = [s1, s2, s4, gr1, gr2, hess, lstd]
    ctx = []
    for dv, dh in _CONTEXT:
        ctx.append(s2 - _shift(s2, int(round(dv / px)), int(round(dh / px))))
    feats += ctx
    vert = np.stack(ctx[:6])
    feats += [vert.min(axis=0), vert.max(axis=0)]
    return np.stack([f.reshape(-1) for f in feats], axis=1).astype(np.float32)


@functools.cache
def load_model():
    import joblib

    if not MODEL_PATH.is_file():
        raise StudyError("SEGMENTATION_FAILED", f"segmentation model missing: {MODEL_PATH} (reinstall the package)")
    return joblib.load(MODEL_PATH)


def predict_on_lattice(model, X: np.ndarray, shape: tuple[int, ...], candidates: np.ndarray,
                       step: int = 2, sure: float = 0.15) -> np.ndarray:
    """P(body) for the candidate voxels of a (rows, cols, slices) grid, predicting densely only where it matters.

    The classifier is the hot spot of the whole pipeline: it is first evaluated on a lattice of every
    ``step``-th row and column. A voxel whose surrounding lattice cell is unanimous (all corners below ``sure``
    or all above ``1 - sure``) takes the cell's interpolated value; the rest — the body borders and anything
    unclear — are classified one by one. The saving depends on how decided the map is: on a phantom 15 x 512^2
    T2, 66 % of the candidates still needed the dense pass (step 2, sure 0.15). Off by default
    (``segmentation.lattice_step``): it moves body borders by a few % Dice.
    """
    rows, cols, nsl = shape
    cand = candidates.reshape(shape)
    prob = np.zeros(shape, dtype=np.float32)
    flat = prob.reshape(-1)
    lattice = np.zeros(shape, dtype=bool)
    lattice[::step, ::step] = True
    # the last row / column always belongs to the lattice so every voxel lies inside a cell
    lattice[-1, ::step] = True
    lattice[::step, -1] = True
    lattice[-1, -1] = True
    on = (lattice & cand).reshape(-1)
    if on.any():
        flat[on] = model.predict_proba(X[on])[:, 1]
    # cell corners: the lattice rows / columns at or around each voxel
    r_idx = np.unique(np.r_[np.arange(0, rows, step), rows - 1])
    c_idx = np.unique(np.r_[np.arange(0, cols, step), cols - 1])
    coarse = prob[np.ix_(r_idx, c_idx)]
    r0 = np.clip(np.searchsorted(r_idx, np.arange(rows), side="right") - 1, 0, len(r_idx) - 1)
    c0 = np.clip(np.searchsorted(c_idx, np.arange(cols), side="right") - 1, 0, len(c_idx) - 1)
    r1, c1 = np.minimum(r0 + 1, len(r_idx) - 1), np.minimum(c0 + 1, len(c_idx) - 1)
    corners = [coarse[r0][:, c0], coarse[r0][:, c1], coarse[r1][:, c0], coarse[r1][:, c1]]
    lo = np.minimum.reduce(corners)
    hi = np.maximum.reduce(corners)
    # bilinear interpolation inside each cell
    fr = ((np.arange(rows) - r_idx[r0]) / np.maximum(r_idx[r1] - r_idx[r0], 1)).astype(np.float32)[:, None, None]
    fc = ((np.arange(cols) - c_idx[c0]) / np.maximum(c_idx[c1] - c_idx[c0], 1)).astype(np.float32)[None, :, None]
    interp = ((1 - fr) * (1 - fc) * corners[0] + (1 - fr) * fc * corners[1]
              + fr * (1 - fc) * corners[2] + fr * fc * corners[3])
    unanimous = (hi < sure) | (lo > 1 - sure)
    todo = cand & ~lattice & ~unanimous
    done = cand & ~lattice & unanimous
    prob[done] = interp[done]
    t = todo.reshape(-1)
    if t.any():
        flat[t] = model.predict_proba(X[t])[:, 1]
    return prob


def spine_region(coarse_prob: np.ndarray, sp_coarse, out_shape, sp_out, half_width_mm: float) -> np.ndarray | None:
    """Voxels (of a grid ``out_shape`` with spacing ``sp_out``) within ``half_width_mm`` (AP) of the spinal column.

    The column is a weighted quadratic fit of AP position against SI position through the body-like
    components of a coarse body-probability map (the same kind of line the cleanup uses), refitted without
    components far off the first fit. ``None`` when fewer than three components are found: then the caller
    classifies everything.
    """
    lab, n = ndimage.label(coarse_prob > 0.5)
    if n < 3:
        return None
    ids = np.arange(1, n + 1)
    sizes, cents_all = label_counts_and_centroids(lab, ids)
    ml = sizes * float(np.prod(sp_coarse)) / 1000.0
    big = ids[ml >= 2.0]
    if big.size < 3:
        return None
    cents = cents_all[big - 1]
    w = np.sqrt(sizes[big - 1])
    y, x = cents[:, 0] * sp_coarse[0], cents[:, 1] * sp_coarse[1]
    coef = np.polyfit(y, x, 2 if big.size >= 5 else 1, w=w)
    resid = np.abs(x - np.polyval(coef, y))
    inl = resid <= max(15.0, 2 * float(np.median(resid)))
    if inl.sum() >= 3:
        coef = np.polyfit(y[inl], x[inl], 2 if inl.sum() >= 5 else 1, w=w[inl])
    centre = np.polyval(coef, np.arange(out_shape[0]) * sp_out[0])[:, None]
    cols_mm = (np.arange(out_shape[1]) * sp_out[1])[None, :]
    return np.broadcast_to((np.abs(cols_mm - centre) <= half_width_mm)[:, :, None], tuple(out_shape))


def _coarse_probability(model, norm: np.ndarray, cand: np.ndarray, step: int = 4) -> np.ndarray:
    """P(body) on every ``step``-th row and column (features computed on the full grid, then subsampled)."""
    X = features(norm)
    coarse_cand = cand[::step, ::step]
    coarse = np.zeros(coarse_cand.shape, np.float32)
    sel = np.flatnonzero(coarse_cand.reshape(-1))
    if sel.size:
        ii, jj, kk = np.unravel_index(sel, coarse.shape)
        coarse.reshape(-1)[sel] = model.predict_proba(X[np.ravel_multi_index((ii * step, jj * step, kk), norm.shape)])[:, 1]
    return coarse


def body_probability(image: np.ndarray, spacing, region: np.ndarray | None = None, locate_mm: float = 0.0,
                     lattice_step: int = 2) -> tuple[np.ndarray, tuple[float, float], np.ndarray | None]:
    """P(vertebral body) on the working grid; returns (probability, zoom, region classified).

    Only voxels inside ``region`` (working grid) are classified (the rest get 0). With
    ``locate_mm > 0`` and no region, the region is found first: a 4x coarser lattice is classified, the spinal
    column fitted through it (:func:`spine_region`) and only voxels within ``locate_mm`` (AP) of it are
    classified. Features are computed on the columns of the region only (plus a margin for their context).
    """
    work, zoom = to_work_grid(image, spacing)
    norm = normalise(work)
    model = load_model()
    # Only plausible voxels are classified (air and the darkest background are never bone marrow).
    cand = norm > 0.02
    if region is None and locate_mm > 0:
        step = 4
        coarse = _coarse_probability(model, norm, cand, step)
        sp = (WORK_MM, WORK_MM, float(spacing[2]))
        region = spine_region(coarse, (step * WORK_MM, step * WORK_MM, sp[2]), work.shape, sp, locate_mm)
    if region is not None:
        cand = cand & region
    prob = np.zeros(work.shape, dtype=np.float32)
    cols = np.flatnonzero(cand.any(axis=(0, 2)))
    if cols.size == 0:
        return prob, zoom, region
    # the features look up to 20 mm sideways and smooth over ~8 mm: keep that much context around the crop
    margin = int(np.ceil(30.0 / WORK_MM))
    c0, c1 = max(0, cols[0] - margin), min(work.shape[1], cols[-1] + 1 + margin)
    # Features are per sagittal slice, so slices are classified a few at a time: the feature matrix (19 float32
    # per voxel) then stays small whatever the slice count, which keeps a worker's peak memory flat.
    for k0 in range(0, work.shape[2], SLICES_PER_CHUNK):
        k1 = min(work.shape[2], k0 + SLICES_PER_CHUNK)
        sub_cand = cand[:, c0:c1, k0:k1]
        if not sub_cand.any():
            continue
        # one slice of halo on each side: the Sobel gradients smooth over the neighbouring slices
        h0, h1 = max(0, k0 - 1), min(work.shape[2], k1 + 1)
        X = features(np.ascontiguousarray(norm[:, c0:c1, h0:h1]))
        X = X.reshape(work.shape[0], c1 - c0, h1 - h0, -1)[:, :, k0 - h0: k0 - h0 + (k1 - k0)].reshape(-1, X.shape[1])
        if lattice_step > 1:
            prob[:, c0:c1, k0:k1] = predict_on_lattice(model, X, sub_cand.shape, sub_cand, lattice_step)
        else:
            sub = prob[:, c0:c1, k0:k1]
            sub[sub_cand] = model.predict_proba(X[sub_cand.reshape(-1)])[:, 1]
        del X
    return prob, zoom, region


# ---------------------------------------------------------------------------------------------- instances
def split_instances(mask: np.ndarray, spacing_work, min_voxels: int, erode_mm: float = 3.0) -> np.ndarray:
    """Separate touching bodies at the discs: markers from an axis-0 erosion, grown back by watershed."""
    from skimage.segmentation import watershed

    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3, 1), bool))
    r = max(1, int(round(erode_mm / spacing_work[0])))
    eroded = ndimage.binary_erosion(mask, structure=np.ones((2 * r + 1, 1, 1), bool))
    markers, n = ndimage.label(eroded)
    if n == 0:
        return np.zeros(mask.shape, np.int32)
    sizes = np.bincount(markers.ravel())
    small = sizes < max(1, min_voxels // 4)
    small[0] = False
    markers[small[markers]] = 0
    dist = ndimage.distance_transform_edt(mask, sampling=spacing_work)
    lab = watershed(-dist, markers, mask=mask)
    return lab.astype(np.int32)


def complete_heights(lab: np.ndarray, ids: np.ndarray, spacing_work, max_mm: float) -> np.ndarray:
    """Restore bodies cut short at one endplate (a band of abnormal marrow the classifier did not take as body).

    For bodies ordered top -> bottom: when a body's height (rows spanned in its mid-sagittal slab) is shorter
    than the median body height, and the gap to its neighbour on one side is wider than the median gap, the
    body is extended towards that neighbour by the height deficit — vertically, column by column, at most
    ``max_mm`` and never past half of that gap.
    """
    n = len(ids)
    if n < 4 or max_mm <= 0:
        return lab
    tops, bots, heights = np.zeros(n), np.zeros(n), np.zeros(n)
    for x, lid in enumerate(ids):  # loop over bodies
        # top / bottom / height: medians over the central half (AP) of the body's central slice, so that
        # lordotic tilt does not blur them
        m = lab == lid
        kc = int(np.argmax(m.sum(axis=(0, 1))))
        sl = m[:, :, kc]
        js = np.nonzero(sl.any(axis=0))[0]
        lo, hi = js.min(), js.max()
        q = max(1, (hi - lo) // 4)
        cols = sl[:, lo + q: hi - q + 1] if hi - lo > 2 else sl[:, lo: hi + 1]
        cols = cols[:, cols.any(axis=0)]
        top_j = np.argmax(cols, axis=0)
        bot_j = cols.shape[0] - 1 - np.argmax(cols[::-1], axis=0)
        tops[x], bots[x] = np.median(top_j), np.median(bot_j)
        heights[x] = float(np.median(cols.sum(axis=0)))
    gaps = tops[1:] - bots[:-1] - 1
    # Pathology only ever shortens a body: the upper quartile of the heights is the normal height.
    med_h, med_gap = float(np.percentile(heights[1:-1], 75)), float(np.median(gaps))
    max_vox = int(round(max_mm / spacing_work[0]))
    out = lab.copy()
    for x, lid in enumerate(ids[1:-1], start=1):  # first / last are often cut by the field of view or sacral
        deficit = int(round(med_h - heights[x]))
        if deficit < max(2, int(round(3.0 / spacing_work[0]))):
            continue
        wide = [side for side in (-1, +1) if (gaps[x - 1] if side < 0 else gaps[x]) > 1.5 * med_gap]
        for side in wide:  # -1: grow upward (towards the body above), +1: downward
            gap = gaps[x - 1] if side < 0 else gaps[x]
            steps = int(min(deficit / len(wide) + 1, max_vox, gap // 2))
            cur = out == lid
            for _ in range(steps):
                shifted = np.zeros_like(cur)
                if side < 0:
                    shifted[:-1] = cur[1:]
                else:
                    shifted[1:] = cur[:-1]
                cur |= shifted & (out == 0)
            out[cur & (out == 0)] = lid
    return out


def smooth_bodies(lab: np.ndarray, ids: np.ndarray, spacing_work, radius_mm: float) -> np.ndarray:
    """Per body and sagittal slice: close small notches (in-plane closing of ``radius_mm``) and fill holes.

    A vertebral body is a compact, convex-ish block of marrow; the pixel classifier leaves holes (vessels,
    Schmorl's nodes, noise) and ragged borders. Growth only ever takes background voxels, so neighbours keep
    their own voxels.
    """
    r = max(1, int(round(radius_mm / spacing_work[0])))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = ((yy * yy + xx * xx) <= r * r)[:, :, None]  # in-plane only: slices stay independent
    plane = np.zeros((3, 3, 3), bool)
    plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    out = lab.copy()
    for lid in ids:  # loop over ~6-10 bodies; each step is a whole-volume array operation
        sl = ndimage.find_objects((lab == lid).astype(np.int8))
        if not sl or sl[0] is None:
            continue
        box = tuple(slice(max(0, s.start - r - 1), s.stop + r + 1) for s in sl[0])
        m = lab[box] == lid
        closed = ndimage.binary_closing(np.pad(m, ((r, r), (r, r), (0, 0))), structure=disk)[r:-r, r:-r]
        filled = ndimage.binary_fill_holes(closed, structure=plane)
        view = out[box]
        view[filled & (view == 0)] = lid
    return out


def split_merged(lab: np.ndarray, factor: float = 1.6) -> np.ndarray:
    """Cut components much larger than the typical body (two bodies joined across a thin disc) at their waist:
    the row (axis 0) of smallest cross-section within the middle 60 % of the component's extent."""
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if ids.size < 3:
        return lab
    sizes, _ = label_counts_and_centroids(lab, ids)
    typical = float(np.median(np.sort(sizes)[-6:]))
    next_id = int(lab.max()) + 1
    for lid, size in zip(ids, sizes, strict=True):  # loop over a handful of components
        if size <= factor * typical:
            continue
        sl = ndimage.find_objects((lab == lid).astype(np.int8))[0]
        sub = lab[sl] == lid
        area = sub.sum(axis=(1, 2))
        rows = np.flatnonzero(area)
        lo, hi = rows[0], rows[-1]
        a, b = lo + int(0.2 * (hi - lo)), lo + int(0.8 * (hi - lo))
        if b <= a:
            continue
        cut = a + int(np.argmin(area[a:b + 1]))
        lower = np.zeros_like(sub)
        lower[cut:] = sub[cut:]
        view = lab[sl]
        view[lower] = next_id
        next_id += 1
    return lab


def _tilts(lab: np.ndarray, ids: np.ndarray, spacing_work) -> np.ndarray:
    """Endplate tilt (degrees, signed, image coordinates) of each component in its mid slab."""
    out = np.zeros(len(ids))
    for n, lid in enumerate(ids):  # loop over <= ~12 bodies
        ii, jj, kk = np.nonzero(lab == lid)
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


def label_levels(centroids_mm: np.ndarray, tilts: np.ndarray, volumes_ml: np.ndarray,
                 cfg: SegmentationConfig, others_mm: np.ndarray | None = None) -> tuple[list[str], float, list[str], list[str]]:
    """Level names for components ordered top -> bottom (``""`` = not reported); (names, confidence, flags, notes).

    The vertebral column is the chain of *major* components (volume >= ``major_body_fraction`` of the typical
    large body) spaced like vertebrae (>= 75 % of the median centroid spacing); smaller pieces are fragments
    or fused sacral segments. S1 is the last body of that chain when something (the rest of the sacrum) lies
    below it; levels are then counted upward: L5, L4, ... L1, T12, ...
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
    last = chain[-1]
    # Anything body-like below the last body (the rest of the sacrum), including small pieces on the column.
    pool = centroids_mm if others_mm is None else np.concatenate([centroids_mm, others_mm])
    below = [c for c in pool if c > centroids_mm[last] + 0.3 * spacing]
    if not below or len(chain) < 2:
        flags += ["NO_SACRUM_FOUND", "PARTIAL_FOV"]
        notes.append("no sacrum below the lowest body: levels cannot be counted from S1; bodies are numbered B1.. from the top")
        for r, idx in enumerate(chain):
            names[idx] = f"B{r + 1}"
        return names, 0.3, flags, notes
    conf = 0.8
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


def segment_vertebrae(image: np.ndarray, spacing, cfg: SegmentationConfig | None = None,
                      extra_images: list[np.ndarray] | None = None) -> Segmentation:
    """Vertebral bodies of a sagittal image in the working frame (I, P, R); see the module doc.

    ``extra_images`` (same grid, other contrasts, e.g. T1 and STIR) are classified too and the voxel-wise
    maximum of the body probabilities is used: abnormal marrow (edema, sclerosis) that looks unlike a body on one contrast
    rarely does on all of them.
    """
    cfg = cfg or SegmentationConfig()
    spacing = tuple(float(s) for s in spacing)
    if image.ndim != 3 or min(image.shape) < 1:
        raise StudyError("SEGMENTATION_FAILED", f"expected a 3-D image, got shape {image.shape}")
    prob, zoom, region = body_probability(image, spacing, locate_mm=cfg.spine_region_mm,
                                          lattice_step=cfg.lattice_step)
    if extra_images:
        # Other contrasts only matter where T2 does not already call the voxel body, and only near the bodies
        # T2 found (abnormal marrow sits in or beside a body): everything else is skipped.
        # When T2 finds less than a few bodies' worth (unusual scaling, artefacts), the others are classified
        # everywhere: they must be able to find the bodies on their own.
        body = prob > cfg.probability_threshold
        found_ml = float(body.sum()) * WORK_MM * WORK_MM * float(spacing[2]) / 1000.0
        if found_ml >= 3 * cfg.min_body_volume_ml:
            near = ndimage.binary_dilation(body, structure=np.ones((3, 3, 1), bool), iterations=int(round(15.0 / WORK_MM)))
            near &= ~body
            if region is not None:
                near &= region
        else:
            near = region
        for extra in extra_images:
            p2, _, _ = body_probability(extra, spacing, region=near, lattice_step=cfg.lattice_step)
            np.maximum(prob, p2, out=prob)
    sp_work = (spacing[0] / zoom[0], spacing[1] / zoom[1], spacing[2])
    voxel_ml = sp_work[0] * sp_work[1] * sp_work[2] / 1000.0
    min_vox = int(cfg.min_body_volume_ml / voxel_ml)
    lab = split_merged(split_instances(prob > cfg.probability_threshold, sp_work, min_vox))
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if ids.size == 0:
        raise StudyError("SEGMENTATION_FAILED", "no vertebral body was found (no voxel looked like vertebral marrow)")
    counts, cents = label_counts_and_centroids(lab, ids)
    vol_ml = counts * voxel_ml
    keep = (vol_ml >= 1.0) & (vol_ml <= cfg.max_body_volume_ml)
    resid = None
    # Off-column components (bowel, muscle): far from a robust line through the centroids (AP vs SI).
    if keep.sum() >= 3:
        y, x = cents[keep, 0] * sp_work[0], cents[keep, 1] * sp_work[1]
        w = vol_ml[keep]
        coef = np.polyfit(y, x, 2 if keep.sum() >= 5 else 1, w=np.sqrt(w))
        resid = np.abs(cents[:, 1] * sp_work[1] - np.polyval(coef, cents[:, 0] * sp_work[0]))
        keep &= resid <= cfg.max_off_axis_mm
    on_axis_small = ~keep & (vol_ml >= 0.2)
    if resid is not None:
        on_axis_small &= resid <= 2 * cfg.max_off_axis_mm
    others_mm = cents[on_axis_small, 0] * sp_work[0]
    ids, vol_ml, cents = ids[keep], vol_ml[keep], cents[keep]
    if ids.size == 0:
        raise StudyError("SEGMENTATION_FAILED", "no component had the size and position of a vertebral body")
    order = np.argsort(cents[:, 0])
    ids, vol_ml, cents = ids[order], vol_ml[order], cents[order]
    tilts = _tilts(lab, ids, sp_work)
    log.debug("segment: centroids %s tilts %s volumes %s", np.round(cents[:, 0] * sp_work[0]), np.round(tilts), np.round(vol_ml))
    names, conf, flags, notes = label_levels(cents[:, 0] * sp_work[0], tilts, vol_ml, cfg, others_mm)
    chain = [lid for lid, name in zip(ids, names, strict=True) if name]
    lab = complete_heights(lab, np.asarray(chain), sp_work, cfg.complete_max_mm)
    if cfg.smooth_mm > 0:
        lab = smooth_bodies(lab, np.asarray(chain), sp_work, cfg.smooth_mm)

    # Relabel on the working grid, then back to the input grid (nearest neighbour).
    lut = np.zeros(int(lab.max()) + 1, dtype=np.int16)
    bodies_meta = []
    for lid, name, v in zip(ids, names, vol_ml, strict=True):
        if not name:
            continue
        val = level_value(name)
        lut[lid] = val
        bodies_meta.append((name, val, v))
    work_labels = lut[lab]
    if work_labels.shape[:2] != image.shape[:2]:
        labels = _to_input_grid(work_labels, image.shape)
    else:
        labels = work_labels
    vox_in = spacing[0] * spacing[1] * spacing[2]
    bodies = []
    present = np.bincount(labels.ravel(), minlength=max(v for _, v, _ in bodies_meta) + 1) if bodies_meta else []
    cents_in = {}
    if bodies_meta:
        vals = [v for _, v, _ in bodies_meta]
        _, cm = label_counts_and_centroids(labels, vals)
        cents_in = dict(zip(vals, cm, strict=True))
    for name, val, _ in bodies_meta:
        if present[val] == 0:
            continue
        bodies.append(VertebralBody(level=name, value=val, centroid_vox=tuple(float(x) for x in cents_in[val]),
                                    volume_mm3=float(present[val] * vox_in)))
    bodies.sort(key=lambda b: b.centroid_vox[0])
    return Segmentation(labels=labels.astype(np.int16), bodies=bodies, labelling_confidence=conf, flags=flags, notes=notes)


def _to_input_grid(work_labels: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour map of a working-grid label image back onto the input grid."""
    ii = np.minimum((np.arange(shape[0]) + 0.5) * work_labels.shape[0] / shape[0], work_labels.shape[0] - 1).astype(int)
    jj = np.minimum((np.arange(shape[1]) + 0.5) * work_labels.shape[1] / shape[1], work_labels.shape[1] - 1).astype(int)
    return work_labels[ii][:, jj]


# ---------------------------------------------------------------------------------------------- entry point
def segment_path(input_path: str | Path, output_path: str | Path, cfg: SegmentationConfig | None = None,
                 png_path: str | Path | None = None) -> Segmentation:
    """Segment a NIfTI image or a DICOM series folder; write the label image on the input's grid.

    ``png_path``: also write a QC picture of the segmentation (mid-sagittal slice, outlines, level names).
    """
    from . import io

    p = Path(input_path)
    if p.is_file() and (p.name.endswith(".nii") or p.name.endswith(".nii.gz")):
        import nibabel as nib

        img = nib.load(str(p))
        vol = io.load_nifti(p)
        seg = segment_vertebrae(vol.data, vol.spacing, cfg)
        # back from the working frame to the input's own axes
        from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

        xform = ornt_transform(io_orientation(vol.affine), io_orientation(img.affine))
        labels = apply_orientation(seg.labels, xform).astype(np.int16)
        io.save_nifti(labels, img.affine, output_path)
        title = p.name
    else:
        d = io.discover(p)
        series = [s for st in d.studies.values() for s in st.series.values()
                  if s.orientation == "sagittal" and not s.is_localizer]
        if not series:
            raise StudyError("NO_SAGITTAL_SERIES", f"no sagittal DICOM series under {p}")
        series.sort(key=lambda s: -s.n_frames)
        vol = io.load_series(series[0])
        seg = segment_vertebrae(vol.data, vol.spacing, cfg)
        io.save_nifti(seg.labels, vol.affine, output_path)
        title = series[0].series_description or p.name
    if png_path is not None:
        from .outputs import write_segmentation_png

        write_segmentation_png(Path(png_path), vol, seg, title=title)
    return seg

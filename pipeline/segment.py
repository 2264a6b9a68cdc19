"""Stage 3: vertebral bodies — segmented, separated at the discs, and labelled L1..L5, S1.

Method (no learned weights are downloaded; the small model ships in ``pipeline/models/``):

1. **Working grid.** The sagittal image is resampled in-plane to ``WORK_MM`` (1.5 mm); slices keep their
   spacing. Intensities are scaled by robust percentiles of the foreground, so T1, T2, STIR and water-fat
   images land in a comparable range.
2. **Where is the spine** (3 mm grid, every ~3 mm slice): a gradient-boosted pixel classifier (scikit-learn
   ``HistGradientBoostingClassifier``, "stage 1") over per-slice features — smoothed intensity, local z-scores
   (brighter / darker than the surroundings, whatever the contrast), gradients, Hessian eigenvalues, and the
   intensity steps to points 6-30 mm above / below and 15-45 mm in front / behind (the body / disc alternation).
   A column curve fitted through its body map (RANSAC) says where to look.
3. **Body or not, voxel by voxel** (``segmentation.body_model``):
   ``unet`` (default) — a small 2.5-D U-Net (:mod:`pipeline.unet`, ONNX Runtime) on the working-grid slices
   within 45 mm of the column, each with its neighbours 4 mm to either side (thin slices: every ~3 mm,
   interpolated); ``classifier`` — a second classifier ("auto-context", Tu & Bai 2010): fine image features *and*
   the stage-1 map around the voxel (6-24 mm above / below, 7.5-30 mm in front / behind, 4-10 mm to the sides),
   within 40 mm of the column and near stage-1 body voxels. Held-out per-body Dice on the 42 real scans (3 folds
   of cases): classifier 0.815, U-Net 0.888 (same steps 4-6), 0.891 with its own edge refiner (README).
4. **Instances along the column** (:func:`split_column`): the column curve is fitted (RANSAC) through the
   body mask; the probability mass projected onto the curve dips at every disc; the dips cut the column into
   bodies (a shallow dip with less than a body's height around it is a dark band inside a body, not a disc:
   :func:`drop_shallow_cuts`; a stretch two bodies long is cut at its dip even when the dip is faint:
   :func:`add_missed_cuts`), seeds grow back by watershed. Each body is then completed (notches closed, holes
   filled, in-plane convex hull per slice: a body is convex in the sagittal plane; dark marrow leaves bites).
5. **Labelling** counts up from the sacrum: the chain of vertebra-sized bodies spaced like vertebrae ends at
   S1 when sacral tissue lies below it, or when the column ends well inside the image at a steeply tilted body
   (:func:`_s1_at_column_end`: the U-Net finds S1 but not the fused segments under it); levels are counted upward
   from there (L5, L4, ...). Without a sacrum in view the bodies are named B<n> (values 100 + n) and the confidence is
   low; body-sized instances the level chain leaves out are reported as B<n> too.
6. **Edges at the input resolution** (:mod:`pipeline.edge_refiner`): the named bodies are mapped back to the
   input grid and the voxels within 4 mm of their surfaces are re-decided by a third classifier (contrast-free
   features relative to each body's own interior), trained on held-out segmentations of the real scans: one
   refiner per body model (:func:`edge_refiner_for`), the U-Net's learnt on the output of U-Nets that did not see
   the case (``python -m pipeline.train_segmenter --unet-refiner``).

The classifiers and the U-Net are trained on the expert-annotated real scans of ``../shared/data/vertebral-bodies``
and on synthetic phantoms (``python -m pipeline.train_segmenter``, cross-validation estimates with ``--cv``;
``python -m pipeline.train_unet``, held-out models with ``--fold``).
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
COLUMN_END_SPACINGS = 1.5  # image under the column's last body (in body spacings) needed to call it S1 without a sacrum
# A piece cut by the image's edge closer than this (in body spacings) under the last body may be the next body.
CUT_NEXT_BODY_SPACINGS = 1.5

STAGE1_MM = 3.0  # stage-1 in-plane grid (mm)
# Thin slices are classified on a sub-lattice about this far apart; the slices between are interpolated.
STAGE1_SLICE_MM = 3.0  # stage 1 only has to say roughly where the bodies are
# Stage 2 every 3 mm instead of 2 mm: held-out Dice 0.7616 -> 0.7664 (3-fold, refiner retrained), a third fewer voxels.
# 4-5 mm: 0.763; stage 1 every 6 mm: 0.757; stage 2 on a 3 mm in-plane lattice too: 0.761.
STAGE2_SLICE_MM = 3.0
COLUMN_HALF_WIDTH_MM = 40.0  # stage 2 runs within this distance of the column stage 1 found


def label_counts_and_centroids(lab: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count and centroid (voxel coordinates) of each label in ``ids``: one bincount per axis, all labels at once.

    (``ndimage.center_of_mass`` with a list of labels is several times slower on full-size label images.) Only the
    labelled voxels (a few per cent of a field of view) are visited for the centroids; label 0, the background,
    gets its count and a centroid over the rest of the grid.
    """
    ids = np.asarray(ids, dtype=np.int64)
    flat = lab.reshape(-1).astype(np.intp, copy=False)
    if flat.size and flat.min() < 0:  # negative values (foreign label images) belong to no label, as in ndimage
        flat = np.maximum(flat, 0)
    n = int(max(flat.max(initial=0), ids.max(initial=0))) + 1
    counts = np.bincount(flat, minlength=n).astype(np.float64)
    where = np.flatnonzero(flat)
    values = flat[where]
    sums = np.zeros((n, lab.ndim))
    for a, coord in enumerate(np.unravel_index(where, lab.shape)):
        sums[:, a] = np.bincount(values, weights=coord, minlength=n)
    if counts[0]:  # background: whole-grid coordinate sums minus the labelled ones
        sums[0] = np.array([flat.size * (s - 1) / 2.0 for s in lab.shape]) - sums[1:].sum(axis=0)
    cents = sums[ids] / np.maximum(counts[ids], 1)[:, None]
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


def _shift(a: np.ndarray, dv: int, dh: int, dk: int = 0) -> np.ndarray:
    """a shifted so that out[i, j, k] = a[i + dv, j + dh, k + dk] (edge values repeated)."""
    out = a
    if dv:
        idx = np.clip(np.arange(a.shape[0]) + dv, 0, a.shape[0] - 1)
        out = out[idx]
    if dh:
        idx = np.clip(np.arange(a.shape[1]) + dh, 0, a.shape[1] - 1)
        out = out[:, idx]
    if dk:
        idx = np.clip(np.arange(a.shape[2]) + dk, 0, a.shape[2] - 1)
        out = out[:, :, idx]
    return out


def _gauss(a: np.ndarray, sigma_px: float, order=0) -> np.ndarray:
    """In-plane Gaussian (derivative) filter: sagittal slices stay independent (their spacing varies, 1-6 mm)."""
    return ndimage.gaussian_filter(a, sigma=(sigma_px, sigma_px, 0), order=order)


def _grad(a: np.ndarray, sigma_px: float) -> np.ndarray:
    return np.hypot(_gauss(a, sigma_px, (1, 0, 0)), _gauss(a, sigma_px, (0, 1, 0)))


def _hessian_eigenvalues(a: np.ndarray, sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale-normalised in-plane Hessian eigenvalues (larger, smaller): blob / plate / edge shape cues."""
    hrr, hcc, hrc = _gauss(a, sigma_px, (2, 0, 0)), _gauss(a, sigma_px, (0, 2, 0)), _gauss(a, sigma_px, (1, 1, 0))
    half_trace = (hrr + hcc) / 2
    root = np.sqrt(((hrr - hcc) / 2) ** 2 + hrc ** 2)
    k = sigma_px * sigma_px
    return (half_trace + root) * k, (half_trace - root) * k


def _local_z(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Intensity as a z-score against its neighbourhood: contrast-free 'brighter / darker than around it'."""
    m = _gauss(a, sigma_px)
    var = _gauss(a * a, sigma_px) - m * m
    return (a - m) / np.sqrt(np.maximum(var, 1e-4))


def _down2(a: np.ndarray) -> np.ndarray:
    """Working grid -> stage-1 grid: 2 x 2 in-plane block means (odd last row / column dropped)."""
    r, c = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return a[:r, :c].reshape(r // 2, 2, c // 2, 2, -1).mean(axis=(1, 3))


def _up2(p: np.ndarray, shape) -> np.ndarray:
    """Stage-1 grid -> working grid (bilinear in-plane), edge rows / columns repeated to ``shape``."""
    z = ndimage.zoom(p, (2, 2, 1), order=1, prefilter=False)
    r, c = min(shape[0], z.shape[0]), min(shape[1], z.shape[1])
    out = np.empty(shape, np.float32)
    out[:r, :c] = z[:r, :c]
    out[r:, :c] = out[r - 1:r, :c]
    out[:, c:] = out[:, c - 1:c]
    return out


# Stage 1 (3 mm grid): the image alone. Stage 2 (working grid): fine image features + the stage-1 map around
# each voxel ("auto-context": the body / disc / body rhythm and the column's course are read from stage 1).
_S1_VERT_MM = (-30, -18, -12, -6, 6, 12, 18, 30)
_S1_HORZ_MM = (-45, -30, -15, 15, 30, 45)
_S2_VERT_MM = (-24, -12, -6, 6, 12, 24)
_S2_HORZ_MM = (-30, -15, -7.5, 7.5, 15, 30)
_S2_SLICE_MM = (-10, -4, 4, 10)
STAGE1_FEATURES = (["i", "s1", "s2", "z8", "z4", "grad1", "grad2", "hess_hi_1.5", "hess_lo_1.5", "hess_hi_3", "hess_lo_3"]
                   + [f"v{d}" for d in _S1_VERT_MM] + ["vabs_min", "vabs_max"] + [f"h{d}" for d in _S1_HORZ_MM])
STAGE2_FEATURES = (["s0.7", "s1.5", "z12", "grad1", "grad2", "hess_hi", "hess_lo", "p1", "p1s"]
                   + [f"p1_v{d}" for d in _S2_VERT_MM] + [f"p1_h{d}" for d in _S2_HORZ_MM]
                   + [f"p1_k{d}" for d in _S2_SLICE_MM])


def stage1_features(n3: np.ndarray) -> np.ndarray:
    """Per-voxel stage-1 features (voxels x len(STAGE1_FEATURES)) of a normalised image on the 3 mm grid."""
    px = STAGE1_MM
    s1, s2 = _gauss(n3, 1.0), _gauss(n3, 2.0)
    feats = [n3, s1, s2, _local_z(s1, 8.0), _local_z(s1, 4.0), _grad(n3, 1.0), _grad(n3, 2.0)]
    feats += [*_hessian_eigenvalues(n3, 1.5), *_hessian_eigenvalues(n3, 3.0)]
    vert = [s1 - _shift(s1, int(round(d / px)), 0) for d in _S1_VERT_MM]
    feats += vert
    near = np.abs(np.stack(vert[2:6]))  # within +-12 mm: a disc above or below gives a large step
    feats += [near.min(axis=0), near.max(axis=0)]
    feats += [s1 - _shift(s1, 0, int(round(d / px))) for d in _S1_HORZ_MM]
    return np.stack([f.reshape(-1) for f in feats], axis=1).astype(np.float32)


def stage2_features(norm: np.ndarray, p1: np.ndarray, slice_mm: float, where: np.ndarray | None = None) -> np.ndarray:
    """Stage-2 features of the working-grid image ``norm`` and the stage-1 map ``p1`` on that grid, at the
    voxels ``where`` (boolean mask; all when None) - gathered there, never stacked for the whole volume."""
    px = WORK_MM
    if where is None:
        where = np.ones(norm.shape, bool)
    ii, jj, kk = np.nonzero(where)

    def at(a, dv=0, dh=0, dk=0):
        return a[np.clip(ii + dv, 0, a.shape[0] - 1), np.clip(jj + dh, 0, a.shape[1] - 1), np.clip(kk + dk, 0, a.shape[2] - 1)]

    # The image features are in-plane: computed on the slices that hold a voxel of ``where`` only.
    ks = np.flatnonzero(where.any(axis=(0, 1)))
    n_ks = np.ascontiguousarray(norm[:, :, ks])
    pos = np.searchsorted(ks, kk)

    def at_ks(a):
        return a[ii, jj, pos]

    s15 = _gauss(n_ks, 1.5)
    feats = [at_ks(_gauss(n_ks, 0.7)), at_ks(s15), at_ks(_local_z(s15, 12.0)), at_ks(_grad(n_ks, 1.0)), at_ks(_grad(n_ks, 2.0))]
    feats += [at_ks(h) for h in _hessian_eigenvalues(n_ks, 2.0)]
    ps = _gauss(p1, 2.0)
    feats += [at(p1), at(ps)]
    feats += [at(ps, dv=int(round(d / px))) for d in _S2_VERT_MM]
    feats += [at(ps, dh=int(round(d / px))) for d in _S2_HORZ_MM]
    feats += [at(ps, dk=int(round(d / slice_mm))) for d in _S2_SLICE_MM]  # neighbouring slices: lateral extent
    return np.stack(feats, axis=1).astype(np.float32)


def stage2_candidates(p1: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Where stage 2 is worth running: within ~4.5 mm (in-plane) of stage-1 body voxels, on tissue."""
    near = ndimage.binary_dilation(p1 > 0.3, structure=np.ones((3, 3, 1), bool), iterations=3)
    return near & (norm > 0.02)


@functools.cache
def load_model():
    """The two-stage classifier {"stage1": ..., "stage2": ...} shipped with the package."""
    import joblib

    if not MODEL_PATH.is_file():
        raise StudyError("SEGMENTATION_FAILED", f"segmentation model missing: {MODEL_PATH} (reinstall the package)")
    model = joblib.load(MODEL_PATH)
    if not isinstance(model, dict) or {"stage1", "stage2"} - set(model):
        raise StudyError("SEGMENTATION_FAILED", f"segmentation model {MODEL_PATH} is not a two-stage model (retrain it)")
    return model


def classified_slices(n: int, slice_mm: float, pitch_mm: float) -> np.ndarray:
    """Indices of the slices a classifier sees: about every ``pitch_mm`` (all when slices are that thick), always
    the first and the last one."""
    step = max(1, int(round(pitch_mm / max(slice_mm, 1e-3))))
    return np.unique(np.r_[np.arange(0, n, step), n - 1])


def interpolate_slices(p: np.ndarray, ks: np.ndarray, n: int) -> np.ndarray:
    """``p`` holds slices ``ks`` (increasing, first 0, last n - 1) of an ``n``-slice volume; linear in between."""
    if ks.size == n:
        return p
    pos = np.interp(np.arange(n), ks, np.arange(ks.size))
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, ks.size - 1)
    w = (pos - lo).astype(np.float32)
    return p[:, :, lo] * (1 - w) + p[:, :, hi] * w


def stage1_probability(model, norm: np.ndarray, slice_mm: float) -> np.ndarray:
    """Stage-1 P(body) on the working grid.

    Classified on the 3 mm in-plane grid and, for thin slices, on every slice ~``STAGE1_SLICE_MM`` apart only
    (linear interpolation between them): stage 1 only has to say roughly where the bodies are.
    """
    n3 = _down2(norm)
    ks = classified_slices(n3.shape[2], slice_mm, STAGE1_SLICE_MM)
    sub = np.ascontiguousarray(n3[:, :, ks])
    X = stage1_features(sub)
    cand = (sub > 0.02).reshape(-1)
    p = np.zeros(sub.size, np.float32)
    if cand.any():
        p[cand] = model.predict_proba(X[cand])[:, 1]
    return _up2(interpolate_slices(p.reshape(sub.shape), ks, n3.shape[2]), norm.shape)


def column_distance(p1: np.ndarray, sp) -> np.ndarray | None:
    """In-plane (H, W) perpendicular distance (mm) from the spinal column fitted through ``p1 > 0.5``; None when no
    column is found."""
    coef = spine_curve(p1 > 0.5, sp)
    if coef is None:
        return None
    return _column_coordinates(coef, p1.shape[:2], sp)[0]


def _unet_columns(dist: np.ndarray | None, region: np.ndarray | None, width: int) -> slice:
    """The AP columns the U-Net runs on: within ``unet.COLUMN_HALF_MM`` of the column (all when no column was found),
    and, when a ``region`` is given, within its columns plus a margin (the net needs context around them)."""
    from .unet import COLUMN_HALF_MM

    keep = np.ones(width, bool) if dist is None else (np.abs(dist) <= COLUMN_HALF_MM).any(axis=0)
    if region is not None:
        used = np.flatnonzero(region.any(axis=(0, 2)))
        margin = int(round(24.0 / WORK_MM))
        near = np.zeros(width, bool)
        if used.size:
            near[max(0, used[0] - margin): used[-1] + margin + 1] = True
        keep &= near
    cols = np.flatnonzero(keep)
    return slice(int(cols[0]), int(cols[-1]) + 1) if cols.size else slice(0, 0)


def body_probability(image: np.ndarray, spacing, region: np.ndarray | None = None, model: dict | None = None,
                     body_model: str = "classifier") -> tuple[np.ndarray, tuple[float, float], np.ndarray | None]:
    """P(vertebral body) on the working grid; returns (probability, zoom, column region).

    The classifier's stage 1 (cheap, 3 mm grid) finds the column. ``body_model="unet"``: the U-Net
    (:mod:`pipeline.unet`) gives the probability, on the columns near the spine only. ``"classifier"``: stage 2
    runs only where it can matter: near stage-1 body voxels (within ~4.5 mm, :func:`stage2_candidates`), within
    ``COLUMN_HALF_WIDTH_MM`` of the column stage 1 found, and inside ``region`` when given; its features are
    computed on the bounding box of those voxels (plus the features' reach), so the cost follows the spine, not
    the field of view. Either way the probability is zero outside ``region``. ``model``: a trained classifier
    dict (default: the shipped one).
    """
    work, zoom = to_work_grid(image, spacing)
    norm = normalise(work)
    model = model or load_model()
    sp = (WORK_MM, WORK_MM, float(spacing[2]))
    p1 = stage1_probability(model["stage1"], norm, sp[2])
    dist = column_distance(p1, sp)
    column = None if dist is None else np.broadcast_to((np.abs(dist) <= COLUMN_HALF_WIDTH_MM)[:, :, None], p1.shape)
    if body_model == "unet":
        from .unet import unet_probability

        cols = _unet_columns(dist, region, norm.shape[1])
        prob = unet_probability(norm, sp[2], cols) if cols.stop > cols.start else np.zeros(norm.shape, np.float32)
        if region is not None:
            prob[~region] = 0
        return prob, zoom, column
    cand = stage2_candidates(p1, norm)
    if column is not None:
        cand &= column
    if region is not None:
        cand &= region
    # Thin slices: stage 2 runs on slices ~STAGE2_SLICE_MM apart, the ones between are interpolated (a body spans
    # 13+ of them); a third of the classifier's work on isotropic volumes.
    ks = classified_slices(cand.shape[2], sp[2], STAGE2_SLICE_MM)
    skipped = np.ones(cand.shape[2], bool)
    skipped[ks] = False
    cand[:, :, skipped] = False
    prob = np.zeros(work.shape, np.float32)
    if not cand.any():
        return prob, zoom, column
    # features on the bounding box of the candidates + the features' reach (30 mm in-plane, 10 mm across slices)
    m_in = int(np.ceil(32.0 / WORK_MM))
    m_k = int(np.ceil(11.0 / sp[2]))
    box = []
    for axis, margin in ((0, m_in), (1, m_in), (2, m_k)):
        idx = np.flatnonzero(cand.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, idx[0] - margin), min(cand.shape[axis], idx[-1] + 1 + margin)))
    box = tuple(box)
    X = stage2_features(np.ascontiguousarray(norm[box]), np.ascontiguousarray(p1[box]), sp[2], where=cand[box])
    sub = prob[box]
    sub[cand[box]] = model["stage2"].predict_proba(X)[:, 1]
    if ks.size < prob.shape[2]:
        prob = interpolate_slices(prob[:, :, ks], ks, prob.shape[2])
        if region is not None:
            prob[~region] = 0
    return prob, zoom, column


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
    best, best_score = None, -1.0
    yr = np.linspace(y.min(), y.max(), 8)
    for _ in range(300):  # RANSAC draws (each a 3-point quadratic): ~20 ms
        pick = rng.choice(y.size, 3, replace=False, p=w / w.sum())
        if np.unique(y[pick]).size < 3:  # three different bands, or the quadratic is undetermined
            continue
        coef = np.polyfit(y[pick], x[pick], 2)
        if np.abs(np.polyval(np.polyder(coef), yr)).max() > 1.2:
            continue
        inl = np.abs(x - np.polyval(coef, y)) <= inlier_mm
        per_band = np.zeros(n_bands)
        np.maximum.at(per_band, band_of[inl], w[inl])
        score = float(per_band.sum())
        if score > best_score:
            best, best_score = coef, score
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


def _column_coordinates(coef: np.ndarray, shape, sp) -> tuple[np.ndarray, np.ndarray]:
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
    dist, along = _column_coordinates(coef, prob.shape, sp)
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


def keep_largest_piece(view: np.ndarray, lid: int) -> None:
    """In place: label ``lid`` of ``view`` (its bounding box, typically) keeps only its largest connected piece."""
    piece, n = ndimage.label(view == lid)
    if n > 1:
        size = np.bincount(piece.ravel())
        size[0] = 0
        view[(piece > 0) & (piece != np.argmax(size))] = 0


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


def hull_bodies(lab: np.ndarray, ids, min_pixels: int = 20) -> np.ndarray:
    """Per body and sagittal slice, add the background pixels of the body's convex hull.

    A vertebral body is convex in the sagittal plane; dark marrow (fat-suppressed images, sclerosis, Modic
    bands) leaves bites and holes that a pixel classifier misses. Only background is taken, so neighbours keep
    their voxels.
    """
    from skimage.morphology import convex_hull_image

    out = lab.copy()
    boxes = ndimage.find_objects(lab)
    for lid in ids:  # loop over bodies x slices (~10 x 60 small 2-D hulls)
        box = boxes[lid - 1] if lid <= len(boxes) else None
        if box is None:
            continue
        m = lab[box] == lid
        view = out[box]
        for k in range(m.shape[2]):
            if m[:, :, k].sum() < min_pixels:
                continue
            v = view[:, :, k]
            v[convex_hull_image(m[:, :, k]) & (v == 0)] = lid
    return out


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
    boxes = ndimage.find_objects(lab)
    for lid in ids:  # loop over ~6-10 bodies, each in its own box
        found = boxes[lid - 1] if lid <= len(boxes) else None
        if found is None:
            continue
        box = tuple(slice(max(0, s.start - r - 1), s.stop + r + 1) for s in found)
        m = lab[box] == lid
        closed = ndimage.binary_closing(np.pad(m, ((r, r), (r, r), (0, 0))), structure=disk)[r:-r, r:-r]
        filled = ndimage.binary_fill_holes(closed, structure=plane)
        view = out[box]
        view[filled & (view == 0)] = lid
    return out


def _tilts(lab: np.ndarray, ids: np.ndarray, spacing_work) -> np.ndarray:
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


def segment_vertebrae(image: np.ndarray, spacing, cfg: SegmentationConfig | None = None,
                      extra_images: list[np.ndarray] | None = None, keep_below_s1: bool = False,
                      model: dict | None = None) -> Segmentation:
    """Vertebral bodies of a sagittal image in the working frame (I, P, R); see the module doc.

    ``keep_below_s1``: also keep unnamed body-sized pieces below the body named S1 (sacral segments — or a
    lumbar body, when the count from the sacrum went wrong). The standalone segmentation (``modicscan segment``,
    ``evaluate-segmentation``) keeps them: it segments bodies, whatever their names. The study pipeline does not
    report or measure them.

    ``extra_images`` (same grid, other contrasts, e.g. T1 and STIR) are classified too and the voxel-wise
    maximum of the body probabilities is used: abnormal marrow (edema, sclerosis) that looks unlike a body on one contrast
    rarely does on all of them.

    ``model``: a trained model dict (default: the shipped one, :func:`load_model`).
    """
    cfg = cfg or SegmentationConfig()
    model = model or load_model()
    spacing = tuple(float(s) for s in spacing)
    if image.ndim != 3 or min(image.shape) < 1:
        raise StudyError("SEGMENTATION_FAILED", f"expected a 3-D image, got shape {image.shape}")
    prob, zoom, region = body_probability(image, spacing, model=model, body_model=cfg.body_model)
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
            p2, _, _ = body_probability(extra, spacing, region=near, model=model, body_model=cfg.body_model)
            np.maximum(prob, p2, out=prob)
    sp_work = (spacing[0] / zoom[0], spacing[1] / zoom[1], spacing[2])
    voxel_ml = sp_work[0] * sp_work[1] * sp_work[2] / 1000.0
    lab, column = split_column(prob, sp_work, cfg.probability_threshold, grow_threshold=cfg.grow_threshold,
                               grow_mm=cfg.grow_max_mm)
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if ids.size == 0:
        raise StudyError("SEGMENTATION_FAILED", "no vertebral body was found (no voxel looked like vertebral marrow)")
    counts, cents = label_counts_and_centroids(lab, ids)
    vol_ml = counts * voxel_ml
    keep = (vol_ml >= 1.0) & (vol_ml <= cfg.max_body_volume_ml)
    def off_curve_mm(coef, c):  # AP distance (mm) of centroids c (rows, cols) from the curve AP = f(SI)
        return np.abs(c[:, 1] * sp_work[1] - np.polyval(coef, c[:, 0] * sp_work[0]))

    # Off-column pieces (bowel, iliac bone at the edge of split_column's tube): centroid far from a fit through
    # the bodies' own centroids, which follows the column where split_column's quadratic through the whole mask
    # is pulled off it (lumbosacral angle, scoliosis: using that curve here lost 2 % of the bodies on real scans);
    # with fewer than three bodies, split_column's curve.
    own = column
    if keep.sum() >= 3:
        own = np.polyfit(cents[keep, 0] * sp_work[0], cents[keep, 1] * sp_work[1], 2 if keep.sum() >= 5 else 1,
                         w=np.sqrt(vol_ml[keep]))
    resid = off_curve_mm(own, cents)
    keep &= resid <= cfg.max_off_axis_mm
    # Pieces cut by the bottom edge of the field of view are no evidence of a sacrum (label_levels).
    edge_rows = max(1, int(round(FOV_EDGE_MM / sp_work[0])))

    def at_bottom_edge(labels, index):
        return ndimage.maximum(labels[-edge_rows:] > 0, labels[-edge_rows:], index).astype(bool)

    cut = at_bottom_edge(lab, ids)
    others_mm = cents[~keep & ~cut & (vol_ml >= 0.2) & (resid <= 2 * cfg.max_off_axis_mm), 0] * sp_work[0]
    # Body-like tissue the column split left out (the sacrum curves back out of the column's tube): its pieces
    # near the column still tell the labelling that a sacrum lies below the last body.
    rest_lab, n_rest = ndimage.label((prob > cfg.probability_threshold) & (lab == 0))
    if n_rest:
        r_index = np.arange(1, n_rest + 1)
        r_counts, r_cents = label_counts_and_centroids(rest_lab, r_index)
        near = (r_counts * voxel_ml >= 0.5) & (off_curve_mm(column, r_cents) <= 2 * cfg.max_off_axis_mm)
        near &= ~at_bottom_edge(rest_lab, r_index)
        others_mm = np.concatenate([others_mm, r_cents[near, 0] * sp_work[0]])
    ids, vol_ml, cents, cut = ids[keep], vol_ml[keep], cents[keep], cut[keep]
    if ids.size == 0:
        raise StudyError("SEGMENTATION_FAILED", "no component had the size and position of a vertebral body")
    order = np.argsort(cents[:, 0])
    ids, vol_ml, cents, cut = ids[order], vol_ml[order], cents[order], cut[order]
    tilts = _tilts(lab, ids, sp_work)
    log.debug("segment: centroids %s tilts %s volumes %s", np.round(cents[:, 0] * sp_work[0]), np.round(tilts), np.round(vol_ml))
    names, conf, flags, notes = label_levels(cents[:, 0] * sp_work[0], tilts, vol_ml, cfg, others_mm, cut,
                                             fov_end_mm=lab.shape[0] * sp_work[0])
    chain = [lid for lid, name in zip(ids, names, strict=True) if name]
    # Instances on the column that the level chain left out (a body cut by the field of view, an under-segmented
    # body) are reported unnamed (B<position>) from half the minimum body volume: dropping
    # them lost 7 % of the annotated bodies on real scans (3-fold case CV, fold 0: 10.7 % -> 3.6 % missed).
    # Below S1 they are sacral segments (or a miscounted body): left out unless keep_below_s1.
    s1_row = cents[names.index("S1"), 0] if "S1" in names else np.inf
    sacral = set()
    for x, name in enumerate(names):
        if not name and vol_ml[x] >= 0.5 * cfg.min_body_volume_ml:
            names[x] = f"B{x + 1}"
            if cents[x, 0] > s1_row and not keep_below_s1:
                sacral.add(names[x])
    lab = complete_heights(lab, np.asarray(chain), sp_work, cfg.complete_max_mm)
    named = np.asarray([lid for lid, name in zip(ids, names, strict=True) if name])
    if cfg.smooth_mm > 0:
        lab = smooth_bodies(lab, named, sp_work, cfg.smooth_mm)
    lab = hull_bodies(lab, named)

    # Relabel on the working grid, then back to the input grid (bilinear per body, see _to_input_grid).
    lut = np.zeros(int(lab.max()) + 1, dtype=np.int16)
    bodies_meta = []
    for lid, name, v in zip(ids, names, vol_ml, strict=True):
        if not name or name in sacral:
            continue
        val = level_value(name)
        lut[lid] = val
        bodies_meta.append((name, val, v))
    work_labels = lut[lab]
    from .edge_refiner import crop_box, refine_labels

    resampled = work_labels.shape[:2] != image.shape[:2]
    labels = _to_input_grid(work_labels, image.shape) if resampled else work_labels
    box = crop_box(labels, spacing)  # everything the refiner reads or changes
    if resampled:
        prob = _resample_inplane(prob, image.shape, box)
    refiner = edge_refiner_for(model, cfg.body_model)
    if cfg.refine_edges and refiner is not None:
        labels = refine_labels(image, labels, prob, spacing, refiner, box)
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
    return Segmentation(labels=labels.astype(np.int16), bodies=bodies, labelling_confidence=conf, flags=flags, notes=notes,
                        body_probability=prob)


def edge_refiner_for(model: dict, body_model: str):
    """The edge refiner for a body model: each learns from its own model's held-out output (the U-Net's probability
    is sharper than stage 2's, its errors differ); a model file without a U-Net refiner falls back to the
    classifier's. None: no refiner."""
    refiner = model.get("refiner_unet") if body_model == "unet" else None
    return refiner if refiner is not None else model.get("refiner")


def _inplane_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from n_in to n_out samples over the same extent (pixel centres aligned):
    lower index, upper index and weight of the upper one, per output sample."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)


def _resample_inplane(a: np.ndarray, shape, box: tuple[slice, ...] | None = None) -> np.ndarray:
    """Bilinear resampling of a float (rows, cols, slices) array to ``shape[:2]`` in-plane (slices unchanged);
    with ``box`` (an index of the output), only inside it (0 elsewhere)."""
    box = box or (slice(None),) * 3
    r0, r1, wr = (w[box[0]] for w in _inplane_weights(shape[0], a.shape[0]))
    c0, c1, wc = (w[box[1]] for w in _inplane_weights(shape[1], a.shape[1]))
    out = np.zeros((shape[0], shape[1], a.shape[2]), a.dtype)
    a = a[:, :, box[2]]
    along_r = a[r0] * (1 - wr[:, None, None]) + a[r1] * wr[:, None, None]
    out[box] = along_r[:, c0] * (1 - wc[None, :, None]) + along_r[:, c1] * wc[None, :, None]
    return out


def _to_input_grid(work_labels: np.ndarray, shape) -> np.ndarray:
    """Map a working-grid label image onto the (finer or coarser) input grid, in-plane.

    Each body's mask is interpolated bilinearly (pixel centres aligned) and a voxel takes the body whose
    interpolated mask is largest, if above one half: the outline is as smooth as the working grid allows,
    where a nearest-neighbour copy would add a staircase of up to half a working pixel (0.75 mm) around every
    body.
    """
    r0, r1, wr = _inplane_weights(shape[0], work_labels.shape[0])
    c0, c1, wc = _inplane_weights(shape[1], work_labels.shape[1])
    out = np.zeros(shape[:2] + work_labels.shape[2:], np.int16)
    best = np.full(out.shape, 0.5, np.float32)
    for value, found in enumerate(ndimage.find_objects(work_labels.astype(np.int64)), start=1):  # ~10 bodies
        if found is None:
            continue
        rs, cs = found[0], found[1]
        rows = np.flatnonzero((r1 >= rs.start) & (r0 < rs.stop))  # output rows touching the body
        cols = np.flatnonzero((c1 >= cs.start) & (c0 < cs.stop))
        m = (work_labels == value).astype(np.float32)
        along_r = m[r0[rows]] * (1 - wr[rows, None, None]) + m[r1[rows]] * wr[rows, None, None]
        val = along_r[:, c0[cols]] * (1 - wc[None, cols, None]) + along_r[:, c1[cols]] * wc[None, cols, None]
        sub = np.ix_(rows, cols)
        b = best[sub]
        take = val > b
        o = out[sub]
        o[take] = value
        b[take] = val[take]
        out[sub] = o
        best[sub] = b
    return out


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
        seg = segment_vertebrae(vol.data, vol.spacing, cfg, keep_below_s1=True)
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
        seg = segment_vertebrae(vol.data, vol.spacing, cfg, keep_below_s1=True)
        io.save_nifti(seg.labels, vol.affine, output_path)
        title = series[0].series_description or p.name
    if png_path is not None:
        from .outputs import write_segmentation_png

        write_segmentation_png(Path(png_path), vol, seg, title=title)
    return seg

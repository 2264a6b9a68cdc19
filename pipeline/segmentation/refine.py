"""Edge refinement of the vertebral-body masks at the input resolution (last step of :mod:`pipeline.segmentation.segment`).

The bodies are decided on the 1.5 mm working grid and interpolated to the input grid; on real scans most of
the remaining Dice loss of well-found bodies is edge noise of about one working pixel. A second, small
classifier re-decides the voxels within ``BAND_MM`` of each body's surface, at the input resolution, from
features that do not depend on the contrast:

- the signed distance to the predicted surface and the (upsampled) body probability of stage 2;
- the intensity relative to the nearest body's own interior (median / interquartile range of its eroded core),
  raw and smoothed, the gradient magnitude and the gradient along the surface normal in the same units;
- the smoothed intensity profile along the surface normal at ``PROFILE_MM`` (inside > 0), body-relative;
- the position in the nearest body's bounding box.

A predicted voxel is removed only below ``REMOVE_BELOW`` and a new one added only above ``ADD_ABOVE``
(hysteresis: a plain 0.5 decision gained much less and lost up to 0.08 Dice on some scans); then each body keeps
its largest connected piece and per-slice holes are filled. Thin slices (< 1.5 mm): every other slice is
classified and the ones between take the mean probability of their neighbours (measured: no loss); likewise
in-plane on matrices finer than ~1 mm (:func:`_lattice`).

The classifier is trained by :mod:`pipeline.training.train_segmenter` on *held-out* pipeline output (each real case
segmented by a stage model that did not see it), so it learns the errors the segmenter makes on new scans. The U-Net
body model has its own (``refiner_unet`` in the model file, ``--unet-refiner``): learnt on the output of the 3 fold
nets, it gained 0.003 held-out Dice over the classifier's refiner on all three folds (nested: each fold scored
with a refiner learnt on the other two).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.segmentation.grid import keep_largest_piece, normalise

BAND_MM = 4.0  # voxels within this distance of a body surface (either side) are re-decided
PROFILE_MM = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0)  # intensity samples along the surface normal (> 0: into the body)
REMOVE_BELOW = 0.3  # a body voxel leaves its body below this probability
ADD_ABOVE = 0.7  # a background voxel joins the nearest body above this probability
MARGIN_MM = BAND_MM + 6.0  # crop around the bodies: the band plus the profile's and the smoothing's reach
N_FEATURES = 16
LATTICE_MM = 1.0  # in-plane pitch of the classified voxels (the training scans' pixel size)


def crop_box(labels: np.ndarray, spacing) -> tuple[slice, ...] | None:
    """Bounding box of the bodies plus ``MARGIN_MM``: everything the refiner reads or changes."""
    found = ndimage.find_objects((labels > 0).astype(np.int8))
    if not found or found[0] is None:
        return None
    margin = [int(np.ceil(MARGIN_MM / float(s))) for s in spacing]
    return tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, m, n in zip(found[0], margin, labels.shape, strict=True))


def _lattice(shape, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and slices the classifier sees. In-plane about every ``LATTICE_MM`` (the training scans have
    1 mm pixels; a 0.55 mm DICOM matrix would cost three times as much for no finer decision), slices every other
    one when thin (< 1.5 mm), else all; the voxels between take their neighbours' values (:func:`_fill_between`)."""
    steps = [max(1, int(round(LATTICE_MM / float(s)))) for s in spacing[:2]]
    steps.append(2 if float(spacing[2]) < 1.5 and shape[2] >= 3 else 1)
    return tuple(np.arange(0, n, st) for n, st in zip(shape, steps, strict=True))


def _signed_distance(body: np.ndarray, sp: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (mm, float32; > 0 inside) to the other side of the body surface, and the index of the nearest
    body voxel of every voxel (a body voxel's own): ``distance_transform_edt`` inside and outside, bit for bit.

    Both feature transforms are scipy's (so ties pick the same voxels); the distances are computed once from the
    feature each voxel reads (inside: the nearest background voxel, outside: the nearest body voxel) with scipy's
    own arithmetic (offsets x sampling, squared, summed over the axes in order, square root, in float64), instead
    of once per side over the whole crop: a third of the time of the two full transforms.
    """
    ft_in = ndimage.distance_transform_edt(body, sampling=sp, return_distances=False, return_indices=True)
    ft_out = ndimage.distance_transform_edt(~body, sampling=sp, return_distances=False, return_indices=True)
    dt = np.where(body, ft_in, ft_out)
    del ft_in
    dt -= np.indices(body.shape, dtype=dt.dtype)
    dt = dt.astype(np.float64)
    for axis, s in enumerate(sp):
        dt[axis] *= s
    np.multiply(dt, dt, dt)
    dist = np.sqrt(np.add.reduce(dt, axis=0))
    return np.where(body, dist, -dist).astype(np.float32), ft_out


def _sample_in_slice(a: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``ndimage.map_coordinates(a, [rows, cols, k], order=1, mode="nearest")`` for whole slice numbers ``k``, bit
    for bit, as four gathers (a quarter of its time: it visits 8 corners per point, 4 of them with weight 0 here).

    scipy's arithmetic, reproduced: weights from the unclamped coordinate (w0 = 1 - frac, w1 = 1 - w0), corner
    indices clamped into the array ("nearest"), products value x row weight x column weight in float64 summed in
    its corner order (row-major; the zero-weight corners of the next slice add +-0, which changes nothing), the sum
    started from +0.0 and rounded to ``a``'s dtype. Checked bit for bit against map_coordinates on 30 M random
    points, edges and out-of-range coordinates included (2026-12-08); tests/test_edge_refiner.py keeps a smaller check.
    """
    nr, nc, nk = a.shape
    r0, c0 = np.floor(rows), np.floor(cols)
    wr0 = 1.0 - (rows - r0)
    wc0 = 1.0 - (cols - c0)
    wr1, wc1 = 1.0 - wr0, 1.0 - wc0
    r0, c0 = r0.astype(np.intp), c0.astype(np.intp)
    # flat indices of the four corners (np.take on them: a third of the time of indexing with three arrays)
    row0 = np.clip(r0, 0, nr - 1) * (nc * nk)
    row1 = np.clip(r0 + 1, 0, nr - 1) * (nc * nk)
    col0 = np.clip(c0, 0, nc - 1) * nk + k
    col1 = np.clip(c0 + 1, 0, nc - 1) * nk + k
    flat = a.reshape(-1)
    t = np.take(flat, row0 + col0) * wr0 * wc0
    t += np.take(flat, row0 + col1) * wr0 * wc1
    t += np.take(flat, row1 + col0) * wr1 * wc0
    t += np.take(flat, row1 + col1) * wr1 * wc1
    t += 0.0  # scipy's sum starts at +0.0: a -0.0 total becomes +0.0
    return t.astype(a.dtype)


def band_features(image: np.ndarray, labels: np.ndarray, prob: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of the voxels within ``BAND_MM`` of a body surface.

    ``image``, ``labels`` (body values > 0), ``prob`` (stage-2 body probability): same grid; ``spacing`` in mm.
    Returns (band mask, label of the nearest body per band voxel, feature matrix ``(n_band, N_FEATURES)``).
    """
    sp = tuple(float(s) for s in spacing)
    body = labels > 0
    sd, idx = _signed_distance(body, sp)
    band = np.abs(sd) <= BAND_MM
    r, c, k = np.nonzero(band)
    near = labels[idx[0][band], idx[1][band], idx[2][band]].astype(np.int64)  # a body voxel is its own nearest
    del idx

    n = normalise(image.astype(np.float32))
    ids = np.unique(labels[body]).astype(np.int64)
    size = int(ids.max(initial=0)) + 1
    # Each body's interior: median and IQR of its eroded core (the whole body when the core is too small).
    erode_px = [max(1, int(round(2.0 / s))) for s in sp[:2]]
    core = ndimage.binary_erosion(body, np.ones((2 * erode_px[0] + 1, 2 * erode_px[1] + 1, 1), bool))
    med = np.zeros(size, np.float32)
    iqr = np.ones(size, np.float32)
    boxes = ndimage.find_objects(labels.astype(np.int64), max_label=size - 1)
    centre = np.zeros((size, 3))
    half = np.ones((size, 3))
    for i in ids:
        s = boxes[i - 1]
        own = labels[s] == i
        v = n[s][own & core[s]]
        if v.size < 50:
            v = n[s][own]
        q1, q2, q3 = np.percentile(v, [25, 50, 75])
        med[i], iqr[i] = q2, max(q3 - q1, 0.02)
        centre[i] = [(t.start + t.stop - 1) / 2.0 for t in s]
        half[i] = [max((t.stop - t.start) / 2.0, 0.5) for t in s]
    m_b, q_b = med[near], iqr[near]

    sigma = (1.0 / sp[0], 1.0 / sp[1], 0.0)  # 1 mm in-plane, per slice
    smooth = ndimage.gaussian_filter(n, sigma)
    g_r = ndimage.gaussian_filter(n, sigma, order=(1, 0, 0)) / sp[0]
    g_c = ndimage.gaussian_filter(n, sigma, order=(0, 1, 0)) / sp[1]
    # in-plane surface normal, pointing into the body (the signed distance grows inside)
    sd_smooth = ndimage.gaussian_filter(sd, (1.5 / sp[0], 1.5 / sp[1], 0.0))
    n_r = ndimage.sobel(sd_smooth, 0)[band] / sp[0]
    n_c = ndimage.sobel(sd_smooth, 1)[band] / sp[1]
    norm = np.sqrt(n_r ** 2 + n_c ** 2) + 1e-6
    n_r /= norm
    n_c /= norm
    gr_b, gc_b = g_r[band], g_c[band]
    feats = [sd[band], prob[band].astype(np.float32), n[band], (n[band] - m_b) / q_b, (smooth[band] - m_b) / q_b,
             np.hypot(gr_b, gc_b) / q_b, (gr_b * n_r + gc_b * n_c) / q_b]
    for t in PROFILE_MM:
        v = _sample_in_slice(smooth, r + t * n_r / sp[0], c + t * n_c / sp[1], k)
        feats.append((v - m_b) / q_b)
    feats += [(r - centre[near, 0]) / half[near, 0], (c - centre[near, 1]) / half[near, 1],
              np.abs(k - centre[near, 2]) / half[near, 2]]
    return band, near.astype(np.int16), np.stack(feats, axis=1).astype(np.float32)


def _prepare(image: np.ndarray, labels: np.ndarray, prob: np.ndarray, spacing, box=None):
    """Crop to the bodies (``box``: :func:`crop_box`, computed when not given), keep the classified lattice
    (:func:`_lattice`), compute the band features there."""
    box = box or crop_box(labels, spacing)
    if box is None:
        return None
    lattice = _lattice(labels[box].shape, spacing)
    sub_sp = tuple(float(s) * (ix[1] - ix[0] if ix.size > 1 else 1) for s, ix in zip(spacing, lattice, strict=True))
    sub = np.ix_(*lattice)
    band, near, X = band_features(image[box][sub], labels[box][sub], prob[box][sub], sub_sp)
    return box, sub, lattice, band, near, X


def band_samples(image, truth, labels, prob, spacing, rng: np.random.Generator, n: int = 40000):
    """Training rows from one held-out segmentation: band features and whether the expert calls the voxel body."""
    prep = _prepare(image, labels, prob, spacing)
    if prep is None:
        return np.zeros((0, N_FEATURES), np.float32), np.zeros(0, np.int8)
    box, sub, _, band, _, X = prep
    y = (truth[box][sub][band] > 0).astype(np.int8)
    pick = rng.choice(y.size, size=min(n, y.size), replace=False)
    return X[pick], y[pick]


def _fill_between(values: np.ndarray, known: np.ndarray, n: int, missing, axis: int) -> np.ndarray:
    """Positions ``known`` along ``axis`` (length ``n`` in the output) hold ``values``; a position between takes its
    neighbours' values: floats the mean of the known ones (NaN = unknown), labels the lower one if set, else the
    upper one. Positions after the last known one copy it."""
    v = np.moveaxis(values, axis, -1)
    out = np.full(v.shape[:-1] + (n,), missing, values.dtype)
    out[..., known] = v
    for j, lo in enumerate(known):
        hi = int(known[j + 1]) if j + 1 < known.size else n
        if hi - lo < 2 and hi != n:
            continue
        left = v[..., j]
        right = v[..., j + 1] if j + 1 < known.size else left
        if values.dtype.kind == "f":
            merged = np.where(np.isnan(left), right, np.where(np.isnan(right), left, 0.5 * (left + right)))
        else:
            merged = np.where(left != missing, left, right)
        out[..., lo + 1:hi] = merged[..., None]
    return np.moveaxis(out, -1, axis)


def keep_largest_and_fill(labels: np.ndarray, ids) -> np.ndarray:
    """Per body: its largest connected piece only, and holes filled slice by slice (where no other body is)."""
    out = labels.copy()
    per_slice = np.zeros((3, 3, 3), bool)
    per_slice[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    boxes = ndimage.find_objects(out)
    for i in ids:
        if i > len(boxes) or boxes[i - 1] is None:
            continue
        view = out[boxes[i - 1]]
        keep_largest_piece(view, i)
        holes = _fill_holes(view == i, per_slice) & (view == 0)
        view[holes] = i
    return out


def _fill_holes(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask, structure)`` for a structure without links across slices (axis 2), by
    labelling: the background pieces (connected by ``structure``) that touch the in-plane border are not holes,
    everything else is filled. binary_fill_holes floods the background from the border one dilation at a time;
    one labelling is several times faster on a body's box, same voxels."""
    if structure[:, :, 0].any() or structure[:, :, 2].any():
        return ndimage.binary_fill_holes(mask, structure)
    background, n = ndimage.label(~mask, structure)
    filled = np.ones(n + 1, bool)
    for face in (background[0], background[-1], background[:, 0], background[:, -1]):
        filled[face] = False
    filled[0] = True  # the mask itself
    return filled[background]


def refine_labels(image: np.ndarray, labels: np.ndarray, prob: np.ndarray, spacing, model,
                  box: tuple[slice, ...] | None = None) -> np.ndarray:
    """Re-decide the voxels near each body's surface (see the module doc). All arrays on the input grid;
    ``box``: :func:`crop_box` of ``labels`` when the caller has it already."""
    prep = _prepare(image, labels, prob, spacing, box)
    if prep is None:
        return labels
    box, _, lattice, band, near, X = prep
    p = np.full(band.shape, np.nan, np.float32)
    nearest = np.zeros(band.shape, np.int16)
    if X.shape[0]:
        p[band] = model.predict_proba(X)[:, 1]
        nearest[band] = near
    for axis, (known, n) in enumerate(zip(lattice, labels[box].shape, strict=True)):
        if known.size < n:
            p = _fill_between(p, known, n, np.nan, axis)
            nearest = _fill_between(nearest, known, n, 0, axis)
    out = labels.copy()
    view = out[box]
    was = view > 0
    with np.errstate(invalid="ignore"):  # NaN (outside the band) compares False: unchanged
        view[was & (p < REMOVE_BELOW)] = 0
        add = ~was & (p > ADD_ABOVE) & (nearest > 0)
    view[add] = nearest[add]
    out[box] = keep_largest_and_fill(view, np.unique(labels[box][labels[box] > 0]))  # every body lies in the box
    return out


def probability_edges(labels: np.ndarray, prob: np.ndarray, spacing, box: tuple[slice, ...] | None,
                      threshold: float, band_mm: float = 1.5) -> np.ndarray:
    """Bodies' surfaces placed where the (input-grid, interpolated) body probability crosses ``threshold``: the
    voxels within ``band_mm`` (in-plane) of each surface are re-decided, a voxel outside joining the body next to
    it. A learnt refiner's job done by the net's own probability, for a body model without one (``onepass``): the
    working grid's 1.5 mm pixels otherwise leave the outline a staircase of interpolated masks.
    """
    box = box or crop_box(labels, spacing)
    if box is None:
        return labels
    out = labels.copy()
    view, p = out[box], prob[box]
    inside = view > 0
    reach = [max(1, int(round(band_mm / float(s)))) for s in spacing[:2]]
    plane = np.zeros((2 * reach[0] + 1, 2 * reach[1] + 1, 1), bool)
    rr, cc = np.ogrid[-reach[0]:reach[0] + 1, -reach[1]:reach[1] + 1]
    plane[:, :, 0] = (rr / reach[0]) ** 2 + (cc / reach[1]) ** 2 <= 1.0  # an ellipse of band_mm in mm
    # Only the voxels whose probability disagrees with their side can change, a thin shell: the band tests and the
    # nearest body are evaluated there alone, over the ellipse's offsets (what binary_dilation / binary_erosion
    # (border_value=1) / grey_dilation compute for the whole crop; the out-of-crop border takes the value that
    # changes nothing: no background, no body, the lowest label).
    shell = _FootprintProbe(view.shape, plane)
    remove = np.nonzero(inside & (p <= threshold))
    remove = tuple(x[shell.any(~inside, remove, False)] for x in remove)  # a body voxel with background nearby
    add = np.nonzero(~inside & (p > threshold))
    add = tuple(x[shell.any(inside, add, False)] for x in add)  # a background voxel with a body nearby
    near = shell.max(view, add)  # the body next to it (discs keep them apart)
    view[remove] = 0
    view[add] = near
    out[box] = keep_largest_and_fill(view, np.unique(labels[box][labels[box] > 0]))
    return out


class _FootprintProbe:
    """Any / max of an array over an in-plane footprint's offsets around chosen voxels only (the footprint
    symmetric, as an ellipse is): the values at those voxels of binary_dilation (any), binary_erosion with
    border_value=1 of the complement (not any), grey_dilation (max; its mirrored border only repeats values inside
    the footprint), without filtering the whole array. The array is padded by the footprint's reach with a value
    that changes nothing (``fill``), so the offsets need no bounds checks."""

    def __init__(self, shape, footprint: np.ndarray):
        self.shape = shape
        self.pad = (footprint.shape[0] // 2, footprint.shape[1] // 2)
        self.cols = shape[1] + 2 * self.pad[1]
        dr, dc = np.nonzero(footprint[:, :, 0])
        self.offsets = ((dr - self.pad[0]) * self.cols + (dc - self.pad[1])) * shape[2]

    def _flat(self, a: np.ndarray, fill) -> np.ndarray:
        (pr, pc), (nr, nc, nk) = self.pad, self.shape
        out = np.full((nr + 2 * pr, self.cols, nk), fill, a.dtype)
        out[pr:pr + nr, pc:pc + nc] = a
        return out.reshape(-1)

    def _centres(self, at: tuple[np.ndarray, ...]) -> np.ndarray:
        r, c, k = at
        return ((r + self.pad[0]) * self.cols + (c + self.pad[1])) * self.shape[2] + k

    def any(self, a: np.ndarray, at: tuple[np.ndarray, ...], fill) -> np.ndarray:
        flat, centre = self._flat(a, fill), self._centres(at)
        hit = np.zeros(centre.size, bool)
        for o in self.offsets:  # loop over the footprint's ~30 offsets, not voxels
            hit |= flat[centre + o]
        return hit

    def max(self, a: np.ndarray, at: tuple[np.ndarray, ...]) -> np.ndarray:
        low = np.iinfo(a.dtype).min if a.dtype.kind in "iu" else -np.inf
        flat, centre = self._flat(a, low), self._centres(at)
        best = np.full(centre.size, low, a.dtype)
        for o in self.offsets:
            np.maximum(best, flat[centre + o], out=best)
        return best


def edge_refiner_for(model: dict, body_model: str):
    """The edge refiner for a body model: each learns from its own model's held-out output (the U-Net's probability
    is sharper than stage 2's, its errors differ); a model file without a U-Net refiner falls back to the
    classifier's. None: no refiner."""
    if body_model == "onepass":
        return None  # the one-pass net's edges stand as they are (no refiner learnt on its output)
    refiner = model.get("refiner_unet") if body_model == "unet" else None
    return refiner if refiner is not None else model.get("refiner")

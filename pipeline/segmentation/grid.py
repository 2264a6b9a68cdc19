"""The segmentation's working grid: in-plane resampling to and from ``WORK_MM``, intensity
normalisation, slice sub-lattices and small label-image helpers."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

WORK_MM = 1.5  # in-plane working resolution (mm)


# ---------------------------------------------------------------------------------------------- preparation
def to_work_grid(image: np.ndarray, spacing) -> tuple[np.ndarray, tuple[float, float]]:
    """Resample axes 0 and 1 to WORK_MM; returns the array and the zoom factors used."""
    zoom = (float(spacing[0]) / WORK_MM, float(spacing[1]) / WORK_MM)
    if abs(zoom[0] - 1) < 1e-3 and abs(zoom[1] - 1) < 1e-3:
        return image.astype(np.float32, copy=False), zoom
    # scipy.ndimage.zoom(order=1)'s result (corner pixels aligned), computed as two gathers along the rows and
    # the columns: a third of zoom's time on a 512 x 512 x 15 series, equal to float32 rounding.
    a = image.astype(np.float32, copy=False)
    rows = _zoom_weights(int(round(a.shape[0] * zoom[0])), a.shape[0])
    return _bilinear(a, rows, _zoom_weights(int(round(a.shape[1] * zoom[1])), a.shape[1])), zoom


def _zoom_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from n_in to n_out samples with the first and last samples aligned (scipy's zoom):
    lower index, upper index and weight of the upper one, per output sample."""
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)


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


def keep_largest_piece(view: np.ndarray, lid: int) -> None:
    """In place: label ``lid`` of ``view`` (its bounding box, typically) keeps only its largest connected piece."""
    piece, n = ndimage.label(view == lid)
    if n > 1:
        size = np.bincount(piece.ravel())
        size[0] = 0
        view[(piece > 0) & (piece != np.argmax(size))] = 0


def _bilinear(a: np.ndarray, rows, cols) -> np.ndarray:
    """Separable linear interpolation of ``a`` (rows, cols, ...) in-plane: ``rows`` / ``cols`` are (lower index,
    upper index, weight of the upper one) per output sample (:func:`_zoom_weights`, :func:`_inplane_weights`)."""
    r0, r1, wr = rows
    c0, c1, wc = cols
    along_r = a[r0] * (1 - wr[:, None, None]) + a[r1] * wr[:, None, None]
    return along_r[:, c0] * (1 - wc[None, :, None]) + along_r[:, c1] * wc[None, :, None]


def _inplane_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from n_in to n_out samples over the same extent (pixel centres aligned):
    lower index, upper index and weight of the upper one, per output sample."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)


def resample_inplane(a: np.ndarray, shape, box: tuple[slice, ...] | None = None) -> np.ndarray:
    """Bilinear resampling of a float (rows, cols, slices) array to ``shape[:2]`` in-plane (slices unchanged);
    with ``box`` (an index of the output), only inside it (0 elsewhere)."""
    box = box or (slice(None),) * 3
    rows = tuple(w[box[0]] for w in _inplane_weights(shape[0], a.shape[0]))
    cols = tuple(w[box[1]] for w in _inplane_weights(shape[1], a.shape[1]))
    out = np.zeros((shape[0], shape[1], a.shape[2]), a.dtype)
    out[box] = _bilinear(a[:, :, box[2]], rows, cols)
    return out


def to_input_grid(work_labels: np.ndarray, shape) -> np.ndarray:
    """Map a working-grid label image onto the (finer or coarser) input grid, in-plane.

    Each body's mask is interpolated bilinearly (pixel centres aligned) and a voxel takes the body whose
    interpolated mask is largest, if above one half: the outline is as smooth as the working grid allows,
    where a nearest-neighbour copy would add a staircase of up to half a working pixel (0.75 mm) around every
    body.
    """
    rw = _inplane_weights(shape[0], work_labels.shape[0])
    cw = _inplane_weights(shape[1], work_labels.shape[1])
    (r0, r1, _), (c0, c1, _) = rw, cw
    out = np.zeros(shape[:2] + work_labels.shape[2:], np.int16)
    best = np.full(out.shape, 0.5, np.float32)
    for value, found in enumerate(ndimage.find_objects(work_labels.astype(np.int64)), start=1):  # ~10 bodies
        if found is None:
            continue
        rs, cs = found[0], found[1]
        rows = np.flatnonzero((r1 >= rs.start) & (r0 < rs.stop))  # output rows touching the body
        cols = np.flatnonzero((c1 >= cs.start) & (c0 < cs.stop))
        if rows.size == 0 or cols.size == 0:  # a body between the output's samples (coarser input grid)
            continue
        # the body's mask on the working rows / columns those output pixels read only (same values, a box
        # instead of the whole working grid)
        ra, rb = int(r0[rows].min()), int(r1[rows].max()) + 1
        ca, cb = int(c0[cols].min()), int(c1[cols].max()) + 1
        m = (work_labels[ra:rb, ca:cb] == value).astype(np.float32)
        val = _bilinear(m, (r0[rows] - ra, r1[rows] - ra, rw[2][rows]), (c0[cols] - ca, c1[cols] - ca, cw[2][cols]))
        sub = np.ix_(rows, cols)
        b = best[sub]
        take = val > b
        o = out[sub]
        o[take] = value
        b[take] = val[take]
        out[sub] = o
        best[sub] = b
    return out

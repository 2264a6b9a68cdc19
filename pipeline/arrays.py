"""Array helpers shared by several stages (label statistics over label images, cache-friendly layout copies)."""

from __future__ import annotations

import numpy as np


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


def fortran_copy(a: np.ndarray, block: int = 64) -> np.ndarray:
    """``np.asfortranarray(a)`` for a C-ordered array, copied a block of rows at a time.

    Reversing the axes of a (512, 512, 15) image in one go writes with a stride of a whole plane for every element
    read; block by block the reads and writes stay in cache (about 4x faster). NIfTI stores voxels in Fortran
    order, so a label image is written from this copy without nibabel transposing it again.
    """
    if a.ndim < 2 or a.flags.f_contiguous:
        return np.asfortranarray(a)
    out = np.empty(a.shape[::-1], dtype=a.dtype)  # C order of the reversed axes = Fortran order of ``a``
    reversed_axes = tuple(range(a.ndim))[::-1]
    for start in range(0, a.shape[0], block):
        out[..., start:start + block] = a[start:start + block].transpose(reversed_axes)
    return out.T


def gap_between(above: np.ndarray, below: np.ndarray, min_cols: int = 3) -> tuple[np.ndarray, np.ndarray] | None:
    """The gap between two masks on one sagittal slice (rows head -> feet): over the columns both cover, the rows
    below ``above``'s lowest and above ``below``'s highest pixel. Returns (columns, (rows, columns) mask of the gap
    over those columns), or None when they share fewer than ``min_cols`` columns or leave no gap (a disc between
    two bodies; the labelling and the disc-grade check read it)."""
    cols = np.flatnonzero(above.any(axis=0) & below.any(axis=0))
    if cols.size < min_cols:
        return None
    rows = np.arange(above.shape[0])[:, None]
    bottom_a = np.where(above, rows, -1).max(axis=0)[cols]
    top_b = np.where(below, rows, above.shape[0]).min(axis=0)[cols]
    between = (rows > bottom_a[None, :]) & (rows < top_b[None, :])
    return (cols, between) if between.any() else None

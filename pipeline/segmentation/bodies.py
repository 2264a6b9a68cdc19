"""Body shape completion on the working grid: heights completed along the column, outlines smoothed,
sagittal convex hulls (a vertebral body is convex in the sagittal plane)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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

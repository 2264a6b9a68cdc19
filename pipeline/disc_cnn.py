"""Disc patches and the small CNN that reads them: the image half of the per-disc Modic model.

The disc features (``disc_model.py``) summarise the endplate bands by ratios and quantiles; a Modic change is also
a *shape* (a band along the endplate, often on both sides of a narrowed disc) that a small convolutional net sees
directly. ``disc_patches`` cuts one patch per disc, aligned with the column: axis u runs from the upper to the lower
body's centroid (craniocaudal), axis v perpendicular to it in the sagittal plane (anteroposterior); the centre sits
midway between the upper body's inferior endplate and the lower body's superior endplate (p98 / p2 of the bodies'
central-half voxels along u). The grid is ``PATCH_MM`` at 1 mm, two channels: T1 and T2, each divided by the
study's normal-marrow reference (the ratios every other finding uses), so the net sees contrast against the
patient's own marrow, not the scanner's scale. A study with several sagittal slices gives each disc the slice where
its two bodies have the most voxels (the mid-sagittal plane of that level, as the training slices are).

The net (``models/disc_modic_cnn.onnx``, ``disc_modic_onepass_cnn.onnx``, trained by ``python -m pipeline.training.train_modic --cnn``; ~62 k
parameters, run by ONNX Runtime, nothing downloaded) takes the central ``CROP_MM`` of each patch and gives P(Modic
change at this disc); the exported graph already averages its members and the AP-flipped patch.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.ndimage import map_coordinates

PATCH_MM = (96, 72)  # u (craniocaudal) x v (anteroposterior); the training crops move inside it
PATCH_VERSION = 1  # bump when the patch geometry changes: train_modic's cached patches are then cut again
CROP_MM = (64, 48)  # what the net sees: 64 mm along the column (both endplate bands and the disc), 48 mm AP
MAX_RATIO = 4.0  # ratios beyond this (fat, fluid, vessels next to marrow) are clipped: the net sees marrow contrast


def _end_along(points_mm: np.ndarray, u: np.ndarray, v: np.ndarray, q: float) -> float:
    """Percentile ``q`` along ``u`` of a body's voxels in its central AP half (the endplate, not the rim)."""
    tu, tv = points_mm @ u, points_mm @ v
    half = np.abs(tv - np.median(tv)) <= 0.25 * (np.ptp(tv) + 1e-6)
    return float(np.percentile(tu[half] if half.sum() > 10 else tu, q))


def disc_patches(images: dict[str, np.ndarray], labels: np.ndarray, values: list[int], spacing,
                 reference: dict) -> np.ndarray:
    """One patch per pair of consecutive bodies (``values``: label values top -> bottom), shape
    (n_pairs, 2, *PATCH_MM), float32: T1 and T2 over ``reference['T1' / 'T2']`` (the normal-marrow medians; a
    missing reference uses the median of all body voxels). Arrays (H, W, K) in the working frame (rows head ->
    feet, columns anterior -> posterior, K sagittal slices). A disc with no patch (its bodies share no slice, or no
    positive reference) is all NaN: ``patch_valid`` says so, and the disc model then decides it without the CNN."""
    n = max(len(values) - 1, 0)
    out = np.full((n, 2, *PATCH_MM), np.nan, np.float32)
    if n == 0:
        return out
    sp = np.asarray(spacing[:2], float)
    ref = {}
    for role in ("T1", "T2"):
        r = reference.get(role)
        if not (r and np.isfinite(r) and r > 0):
            body_any = labels > 0
            r = float(np.median(images[role][body_any])) if body_any.any() else 0.0
        ref[role] = float(r)
    if min(ref.values()) <= 0 or not all(np.isfinite(list(ref.values()))):
        return out
    uu = np.arange(PATCH_MM[0]) - (PATCH_MM[0] - 1) / 2
    vv = np.arange(PATCH_MM[1]) - (PATCH_MM[1] - 1) / 2
    grid_u, grid_v = np.meshgrid(uu, vv, indexing="ij")
    boxes = ndimage.find_objects(labels, max_label=int(max(values)))
    for a in range(n):  # loop over <= ~10 disc levels, not voxels
        box_u, box_l = boxes[values[a] - 1], boxes[values[a + 1] - 1]
        if box_u is None or box_l is None:
            continue
        # the pair's bounding box, not the whole volume (a 512^2 x 15 study: 0.11 -> 0.01 s)
        box = tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(box_u, box_l, strict=True))
        sub = labels[box]
        upper, lower = sub == values[a], sub == values[a + 1]
        per_slice = np.minimum(upper.sum(axis=(0, 1)), lower.sum(axis=(0, 1)))
        if per_slice.max() == 0:
            continue
        k_sub = int(np.argmax(per_slice))
        k = box[2].start + k_sub
        offset = np.array([box[0].start, box[1].start])
        pts_u = (np.argwhere(upper[:, :, k_sub]) + offset) * sp
        pts_l = (np.argwhere(lower[:, :, k_sub]) + offset) * sp
        cu, cl = pts_u.mean(axis=0), pts_l.mean(axis=0)
        u = (cl - cu) / max(float(np.linalg.norm(cl - cu)), 1e-6)
        v = np.array([-u[1], u[0]])
        c0 = (cu + cl) / 2
        mid = (_end_along(pts_u - c0, u, v, 98) + _end_along(pts_l - c0, u, v, 2)) / 2
        centre = c0 + u * mid
        coords = np.stack([(centre[0] + grid_u * u[0] + grid_v * v[0]) / sp[0],
                           (centre[1] + grid_u * u[1] + grid_v * v[1]) / sp[1]])
        for c, role in enumerate(("T1", "T2")):
            img = images[role][:, :, k].astype(np.float32)
            out[a, c] = map_coordinates(img, coords, order=1, mode="constant", cval=0.0) / ref[role]
    return out


def patch_valid(patches: np.ndarray) -> np.ndarray:
    """Per disc: True where ``disc_patches`` could cut its patch (no NaN)."""
    return np.isfinite(patches).all(axis=tuple(range(1, patches.ndim)))


def centre_crop(patches: np.ndarray) -> np.ndarray:
    """The net's input: the central ``CROP_MM`` of (n, 2, *PATCH_MM) patches, ratios clipped to [0, MAX_RATIO]."""
    du, dv = (PATCH_MM[0] - CROP_MM[0]) // 2, (PATCH_MM[1] - CROP_MM[1]) // 2
    crop = patches[:, :, du:du + CROP_MM[0], dv:dv + CROP_MM[1]]
    return np.clip(crop, 0.0, MAX_RATIO).astype(np.float32)


@lru_cache(maxsize=4)
def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # a few 64 x 48 patches per study: threads cost more than they give
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def cnn_probability(patches: np.ndarray, path: str | Path) -> np.ndarray:
    """P(Modic change) per disc patch (n, 2, *PATCH_MM) from the exported net at ``path``."""
    if patches.shape[0] == 0:
        return np.zeros(0)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"disc CNN not found: {path} (retrain: python -m pipeline.training.train_modic --cnn)")
    session = _session(str(path))
    (prob,) = session.run(None, {session.get_inputs()[0].name: centre_crop(patches)})
    return np.asarray(prob, float).reshape(-1)

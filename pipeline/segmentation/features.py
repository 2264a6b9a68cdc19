"""Per-voxel image features of the body classifiers (stage 1 on the 3 mm grid, stage 2 on the working
grid with the stage-1 map as auto-context)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.segmentation.grid import WORK_MM

STAGE1_MM = 3.0  # stage-1 in-plane grid (mm)


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


def down2(a: np.ndarray) -> np.ndarray:
    """Working grid -> stage-1 grid: 2 x 2 in-plane block means (odd last row / column dropped)."""
    r, c = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return a[:r, :c].reshape(r // 2, 2, c // 2, 2, -1).mean(axis=(1, 3))


def up2(p: np.ndarray, shape) -> np.ndarray:
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

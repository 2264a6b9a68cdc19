"""P(vertebral body) per voxel: the stage-1 classifier finds the column, then the U-Net
(:mod:`pipeline.segmentation.unet`) or the stage-2 classifier decides body / not body near it."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from pipeline.errors import StudyError
from pipeline.segmentation.column import column_coordinates, spine_curve
from pipeline.segmentation.features import down2, stage1_features, stage2_candidates, stage2_features, up2
from pipeline.segmentation.grid import WORK_MM, classified_slices, interpolate_slices, normalise, to_work_grid

MODEL_PATH = Path(__file__).resolve().parent / "models" / "body_classifier.joblib"


# Thin slices are classified on a sub-lattice about this far apart; the slices between are interpolated.
STAGE1_SLICE_MM = 3.0  # stage 1 only has to say roughly where the bodies are
# For the U-Net, stage 1 only finds the column for its crop: every ~6 mm is enough. On the 42 annotated scans
# (in-sample): per-body Dice 0.9194 -> 0.9193, the same level names, one extra body fewer; 0.17 -> 0.11 s a
# 15 x 512^2 study. (Stage 2 of the classifier reads the stage-1 map as a feature: it keeps 3 mm.)
STAGE1_COLUMN_SLICE_MM = 6.0


# Stage 2 every 3 mm instead of 2 mm: held-out Dice 0.7616 -> 0.7664 (3-fold, refiner retrained), a third fewer voxels.
# 4-5 mm: 0.763; stage 1 every 6 mm: 0.757; stage 2 on a 3 mm in-plane lattice too: 0.761.
STAGE2_SLICE_MM = 3.0


COLUMN_HALF_WIDTH_MM = 40.0  # stage 2 runs within this distance of the column stage 1 found


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


def stage1_probability(model, norm: np.ndarray, slice_mm: float, pitch_mm: float = STAGE1_SLICE_MM) -> np.ndarray:
    """Stage-1 P(body) on the working grid.

    Classified on the 3 mm in-plane grid and, for slices thinner than ``pitch_mm``, on every slice ~``pitch_mm``
    apart only (linear interpolation between them): stage 1 only has to say roughly where the bodies are.
    """
    n3 = down2(norm)
    ks = classified_slices(n3.shape[2], slice_mm, pitch_mm)
    sub = np.ascontiguousarray(n3[:, :, ks])
    X = stage1_features(sub)
    cand = (sub > 0.02).reshape(-1)
    p = np.zeros(sub.size, np.float32)
    if cand.any():
        p[cand] = model.predict_proba(X[cand])[:, 1]
    return up2(interpolate_slices(p.reshape(sub.shape), ks, n3.shape[2]), norm.shape)


def column_distance(p1: np.ndarray, sp) -> np.ndarray | None:
    """In-plane (H, W) perpendicular distance (mm) from the spinal column fitted through ``p1 > 0.5``; None when no
    column is found."""
    coef = spine_curve(p1 > 0.5, sp)
    if coef is None:
        return None
    return column_coordinates(coef, p1.shape[:2], sp)[0]


def column_region(dist: np.ndarray | None, shape) -> np.ndarray | None:
    """(H, W, K) view: within ``COLUMN_HALF_WIDTH_MM`` of the column (``dist``: :func:`column_distance`)."""
    return None if dist is None else np.broadcast_to((np.abs(dist) <= COLUMN_HALF_WIDTH_MM)[:, :, None], shape)


def _unet_columns(dist: np.ndarray | None, region: np.ndarray | None, width: int) -> slice:
    """The AP columns the U-Net runs on: within ``unet.COLUMN_HALF_MM`` of the column (all when no column was found),
    and, when a ``region`` is given, within its columns plus a margin (the net needs context around them)."""
    from pipeline.segmentation.unet import COLUMN_HALF_MM

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


def onepass_probability(norm: np.ndarray, sp, region: np.ndarray | None = None, int8: bool = False
                        ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """P(body) from the one-pass net alone (``body_model: onepass``), the column region, and P(L5) from the net's
    second output (None with ``region``, or for a net without one).

    Without ``region`` the net sees whole slices; the column is fitted through its own output and the
    probability is kept within ``unet.COLUMN_HALF_MM`` of it (as far as the cascade's crop reaches: iliac bone
    and bowel farther out are never a vertebral body). With ``region`` (other contrasts near the bodies T2
    found) only the region's columns are run, plus the net's context margin.
    """
    from pipeline.segmentation.unet import COLUMN_HALF_MM, load_session, unet_probability

    session = load_session(body_model="onepass", int8=int8)
    if region is not None:
        return _net_on_columns(norm, sp[2], _unet_columns(None, region, norm.shape[1]), region, session), None, None
    prob, l5 = unet_probability(norm, sp[2], session=session, level_map=True)
    dist = column_distance(prob, sp)
    if dist is not None:
        prob[np.abs(dist) > COLUMN_HALF_MM] = 0
    return prob, column_region(dist, prob.shape), l5


def _net_on_columns(norm: np.ndarray, slice_mm: float, cols: slice, region: np.ndarray | None,
                    session) -> np.ndarray:
    """A net's P(body) on the AP columns ``cols`` (zero elsewhere, and everywhere when ``cols`` is empty); with a
    ``region``, only on the slices it touches and zero outside it. ``session``: the net, always given (which body
    model, float or int8, is the caller's to say)."""
    from pipeline.segmentation.unet import unet_probability

    if cols.stop <= cols.start:
        return np.zeros(norm.shape, np.float32)
    needed = None if region is None else region.any(axis=(0, 1))
    prob = unet_probability(norm, slice_mm, cols, session=session, needed=needed)
    if region is not None:
        prob[~region] = 0
    return prob


def _unet(int8: bool):
    from pipeline.segmentation.unet import load_session

    return load_session(body_model="unet", int8=int8)


def body_probability(image: np.ndarray, spacing, region: np.ndarray | None = None, model: dict | None = None,
                     body_model: str = "classifier", int8: bool = False
                     ) -> tuple[np.ndarray, tuple[float, float], np.ndarray | None, np.ndarray | None]:
    """P(vertebral body) on the working grid; returns (probability, zoom, column region, P(L5) or None).

    ``body_model="onepass"``: the one-pass net alone (:func:`onepass_probability`, the only model with a P(L5));
    ``model`` is not used.
    The classifier's stage 1 (cheap, 3 mm grid) finds the column. ``body_model="unet"``: the U-Net
    (:mod:`pipeline.segmentation.unet`) gives the probability, on the columns near the spine only. ``"classifier"``: stage 2
    runs only where it can matter: near stage-1 body voxels (within ~4.5 mm, :func:`stage2_candidates`), within
    ``COLUMN_HALF_WIDTH_MM`` of the column stage 1 found, and inside ``region`` when given; its features are
    computed on the bounding box of those voxels (plus the features' reach), so the cost follows the spine, not
    the field of view. Either way the probability is zero outside ``region``. ``model``: a trained classifier
    dict (default: the shipped one). ``int8``: the nets' int8 versions (``segmentation.int8``).
    """
    work, zoom = to_work_grid(image, spacing)
    norm = normalise(work)
    sp = (WORK_MM, WORK_MM, float(spacing[2]))
    if body_model == "onepass":
        prob, column, l5 = onepass_probability(norm, sp, region, int8)
        return prob, zoom, column, l5
    if body_model == "unet" and region is not None:
        # Another contrast near the bodies T2 found: ``region`` already says where the column is, so stage 1 (which
        # only finds the column for the U-Net's crop) is not run on it; the net runs on the region's columns.
        return (_net_on_columns(norm, sp[2], _unet_columns(None, region, norm.shape[1]), region, _unet(int8)),
                zoom, None, None)
    model = model or load_model()
    p1 = stage1_probability(model["stage1"], norm, sp[2],
                            STAGE1_COLUMN_SLICE_MM if body_model == "unet" else STAGE1_SLICE_MM)
    dist = column_distance(p1, sp)
    column = column_region(dist, p1.shape)
    if body_model == "unet":  # (no region here: see above)
        return _net_on_columns(norm, sp[2], _unet_columns(dist, None, norm.shape[1]), None, _unet(int8)), zoom, column, None
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
        return prob, zoom, column, None
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
    return prob, zoom, column, None

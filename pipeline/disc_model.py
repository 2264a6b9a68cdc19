"""Per-disc Modic presence from a small trained model: the disc features and the shipped model.

The threshold rules of ``classify`` type each endplate band voxel by voxel. Real expert gradings (SPIDER, README
"Modic findings on real data") are matched better by a model that looks at a disc level as a whole: both endplate
bands around the disc on T1 and T2 as ratios to the study's own normal marrow (quantiles, fractions beyond ratio
thresholds, band against its own body's core, a depth profile away from the endplate, the larger / smaller of the
two sides and their difference), the disc's own T2 signal and height, its position counted from the sacrum, and the
same features averaged over the study's *other* discs (patient context from the patient's own images, no labels).

``disc_features`` computes one row per disc from ``StudyMeasurements`` alone (vectorised over voxels; loops only
over the <= ~10 discs). A model may carry a small CNN on disc patches (``disc_cnn.py``) whose probability is
averaged with the regression's. ``DiscModel`` loads the shipped model of the segmentation's body model and scores rows:
``models/disc_modic.joblib`` for the cascade (and the pixel classifier), ``models/disc_modic_onepass.joblib`` for
the one-pass net, whose bodies' outlines differ, so its band features do too (both trained by ``python -m
pipeline.training.train_modic``, not imported here). Nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.measure import ZONE_CORE, StudyMeasurements, group_quantiles

MODEL_PATH = Path(__file__).parent / "models" / "disc_modic.joblib"
ONEPASS_MODEL_PATH = MODEL_PATH.with_name("disc_modic_onepass.joblib")


def model_path(body_model: str = "unet") -> Path:
    """The shipped disc model trained on features measured with ``segmentation.body_model`` = ``body_model``."""
    return ONEPASS_MODEL_PATH if body_model == "onepass" else MODEL_PATH
# Band voxels: deeper than the cortex / partial-volume rim, at most BAND_MM from the endplate.
CORTEX_MM = 2.0  # in-plane only, unlike classify.interior (lateral too): the shipped models learnt these features
BAND_MM = 10.0
PROFILE_MM = ((2.0, 4.0), (4.0, 7.0), (7.0, 12.0))  # depth bins of the profile away from the endplate
# Ratio thresholds whose exceedance fractions are features (T1 high = fat, T1 low / T2 high = edema, T2 low).
_FRACTIONS = (("t1_gt12", "T1", ">", 1.2), ("t1_gt14", "T1", ">", 1.4), ("t1_lt08", "T1", "<", 0.8),
              ("t2_gt11", "T2", ">", 1.1), ("t2_gt15", "T2", ">", 1.5), ("t2_lt06", "T2", "<", 0.6))
_QS = (0.1, 0.5, 0.9)
MAX_IVD = 6  # disc position from the sacrum, capped (higher discs are rare in the gradings)


def _endplate_names() -> list[str]:
    names = [f"{s}_q{int(q * 100)}" for s in ("t1", "t2") for q in _QS]
    names += [n for n, *_ in _FRACTIONS] + ["t1hi_t2iso", "t1lo_t2hi"]
    names += [f"{s}_core" for s in ("t1", "t2")]
    names += [f"{s}_p{i}" for s in ("t1", "t2") for i in range(len(PROFILE_MM))]
    return names


ENDPLATE_FEATURES = _endplate_names()
DISC_FEATURES = ["disc_t2_marrow", "disc_t2_discs", "disc_height", "disc_height_rel"]
# Features whose mean over the study's other discs is the patient context.
CONTEXT_FEATURES = [f"max_{n}" for n in ENDPLATE_FEATURES] + DISC_FEATURES


def feature_names() -> list[str]:
    names = [f"{agg}_{n}" for agg in ("max", "min", "diff") for n in ENDPLATE_FEATURES]
    return names + DISC_FEATURES + ["ivd"] + [f"ctx_{n}" for n in CONTEXT_FEATURES]


def _endplate_table(meas: StudyMeasurements) -> np.ndarray:
    """(2 * n_bodies, len(ENDPLATE_FEATURES)): row body*2 + 0 superior band, + 1 inferior band; NaN when empty."""
    n = len(meas.levels)
    out = np.full((2 * n, len(ENDPLATE_FEATURES)), np.nan)
    r1, r2 = meas.vox_ratio.get("T1"), meas.vox_ratio.get("T2")
    if n == 0 or r1 is None or r2 is None:
        return out
    side = np.where(meas.vox_depth_sup_mm <= meas.vox_depth_inf_mm, 0, 1)
    depth = np.where(side == 0, meas.vox_depth_sup_mm, meas.vox_depth_inf_mm) + meas.spacing[0] / 2
    inner = (depth >= CORTEX_MM) & (meas.vox_rim_mm >= CORTEX_MM)
    group = meas.vox_body * 2 + side
    band = inner & (depth <= BAND_MM)
    g = group[band]
    cnt = np.bincount(g, minlength=2 * n).astype(float)
    has = cnt >= 5
    cols = []
    for r in (r1, r2):
        cols.append(group_quantiles(r[band].astype(np.float32), g, 2 * n, qs=_QS))
    ratio = {"T1": r1[band], "T2": r2[band]}
    fr = []
    for _, seq, op, thr in _FRACTIONS:
        hit = ratio[seq] > thr if op == ">" else ratio[seq] < thr
        fr.append(np.bincount(g[hit], minlength=2 * n) / np.maximum(cnt, 1))
    fr.append(np.bincount(g[(ratio["T1"] > 1.2) & (ratio["T2"] >= 1.1)], minlength=2 * n) / np.maximum(cnt, 1))
    fr.append(np.bincount(g[(ratio["T1"] < 0.8) & (ratio["T2"] > 1.5)], minlength=2 * n) / np.maximum(cnt, 1))
    cols.append(np.stack(fr, axis=1))
    # Band median against the median of its own body's core (a fatty / sclerotic band stands out from its body).
    core = inner & (meas.vox_zone == ZONE_CORE)
    core_med = [group_quantiles(r[core].astype(np.float32), meas.vox_body[core], n, qs=(0.5,))[:, 0] for r in (r1, r2)]
    band_med = np.stack([cols[0][:, 1], cols[1][:, 1]], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cols.append(band_med / np.repeat(np.stack(core_med, axis=1), 2, axis=0))
    # Depth profile: median ratio in bins of depth away from the endplate.
    prof = []
    for r in (r1, r2):
        for lo, hi in PROFILE_MM:
            sel = inner & (depth >= lo) & (depth < hi)
            q = group_quantiles(r[sel].astype(np.float32), group[sel], 2 * n, qs=(0.5,))[:, 0]
            q[np.bincount(group[sel], minlength=2 * n) < 3] = np.nan
            prof.append(q)
    cols.append(np.stack(prof, axis=1))
    table = np.concatenate(cols, axis=1)
    table[~has] = np.nan
    out[:] = table
    return out


def discs_anchor(levels: list[str]) -> int:
    """Index of the body the disc count starts above (the readers count discs from the bottom, 1 = above S1):
    the body named S1, else the lowest body."""
    return levels.index("S1") if "S1" in levels else len(levels) - 1


def disc_features(meas: StudyMeasurements) -> np.ndarray:
    """One row per disc of ``meas.discs`` (columns ``feature_names()``); NaN where a feature is unmeasured."""
    n_discs = len(meas.discs)
    names = feature_names()
    if n_discs == 0:
        return np.zeros((0, len(names)))
    ep = _endplate_table(meas)
    a = np.arange(n_discs)
    upper = ep[2 * a + 1]  # the upper body's inferior band
    lower = ep[2 * (a + 1)]  # the lower body's superior band
    with np.errstate(invalid="ignore"):
        mx = np.where(np.isnan(upper), lower, np.where(np.isnan(lower), upper, np.fmax(upper, lower)))
        mn = np.fmin(upper, lower)
        diff = np.abs(upper - lower)

    def _v(key):
        return np.array([np.nan if d.get(key) is None else float(d[key]) for d in meas.discs])

    height = _v("height_mm")
    med_h = np.nanmedian(height) if np.isfinite(height).any() else np.nan
    disc = np.stack([_v("t2_ratio_to_marrow"), _v("t2_ratio_to_discs"), height, height / med_h], axis=1)
    anchor = discs_anchor(meas.levels)
    ivd = np.clip(anchor - a, 0, MAX_IVD).astype(float)[:, None]
    local = np.concatenate([mx, mn, diff, disc, ivd], axis=1)
    ctx_src = np.concatenate([mx, disc], axis=1)
    # Leave-one-out mean over the study's other discs (NaN-aware): the patient's own context, no labels.
    ok = np.isfinite(ctx_src)
    tot = np.where(ok, ctx_src, 0.0).sum(axis=0, keepdims=True)
    num = ok.sum(axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        ctx = (tot - np.where(ok, ctx_src, 0.0)) / (num - ok)
    ctx[~np.isfinite(ctx)] = np.nan
    return np.concatenate([local, ctx], axis=1)


class DiscModel:
    """The shipped per-disc Modic presence model: ``score(features) -> probability`` and its threshold."""

    def __init__(self, bundle: dict, folder: Path | None = None):
        if bundle.get("features") != feature_names():
            raise ValueError("disc model was trained on other features than this code computes: retrain it "
                             "(python -m pipeline.training.train_modic)")
        self.estimator = bundle["estimator"]
        self.threshold = float(bundle["threshold"])
        # Optional image half (disc_cnn.py): the mean of the two probabilities, cut at its own threshold
        self.cnn = bundle.get("cnn")
        self.folder = folder or MODEL_PATH.parent  # the CNN file lies next to the bundle
        self.info = {k: v for k, v in bundle.items() if k not in ("estimator",)}

    def score(self, features: np.ndarray) -> np.ndarray:
        """P(Modic change) per disc from the features alone (the regression)."""
        if features.shape[0] == 0:
            return np.zeros(0)
        return self.estimator.predict_proba(features)[:, 1]

    def decide(self, features: np.ndarray, patches: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probability per disc, threshold per disc): with the model's CNN and a disc's patch
        (``disc_cnn.disc_patches``), the mean of the regression's and the CNN's probabilities and the threshold
        chosen for that mean; otherwise (no CNN, no patches, or a disc without a patch) the regression alone and
        its own threshold."""
        p = self.score(features)
        threshold = np.full(p.shape, self.threshold)
        if self.cnn is None or patches is None or features.shape[0] == 0:
            return p, threshold
        from pipeline.disc_cnn import cnn_probability, patch_valid

        if patches.shape[0] != features.shape[0]:
            raise ValueError(f"{patches.shape[0]} disc patches for {features.shape[0]} discs")
        ok = patch_valid(patches)
        if ok.any():
            p[ok] = (p[ok] + cnn_probability(patches[ok], self.folder / self.cnn["file"])) / 2.0
            threshold[ok] = float(self.cnn["threshold"])
        return p, threshold


def load_disc_model(path: str | None = None, body_model: str = "unet") -> DiscModel:
    """``path``, or the shipped model for ``body_model`` (:func:`model_path`); loaded once per file."""
    return _load(str(Path(path) if path else model_path(body_model)))


@lru_cache(maxsize=4)
def _load(path: str) -> DiscModel:
    import joblib

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"disc model not found: {p} (retrain: python -m pipeline.training.train_modic)")
    return DiscModel(joblib.load(p), folder=p.parent)

"""Stage 5: Modic type per endplate, edema per vertebra, review flags — rules from the config.

Voxel rules (ratios to the study's own normal marrow, thresholds in ``ClassificationConfig``):

=========  ==========  =========================  ===========
type       T1          T2                         STIR
=========  ==========  =========================  ===========
Modic I    < t1_low    (high)                     > fluid_high
Modic II   > t1_high   >= t2_iso_min (no STIR)    < fluid_low
Modic III  < t1_low    < t2_low                   < fluid_low
edema      <= t1_high  > fluid_high (no STIR)     > fluid_high
=========  ==========  =========================  ===========

Each voxel is assigned to the nearer endplate of its column; an endplate gets a type when at least
``min_zone_fraction`` of its band shows it (two types -> "I/II" or "II/III"). Extent is measured over
the voxels of the assigned type(s) in that endplate's half of the body, so a change deeper than the band
is reported at its real depth. Edema through most of a body is diffuse (fracture-like), not a Modic
band: its endplates are then typed from the non-edema types only.

Only the body's interior counts, for the types and for edema alike: voxels within ``cortex_exclusion_mm`` of
its surface - the endplates, the anterior / posterior rim and, across slices, its lateral surface (the
outermost sagittal slice of a 3-D study always straddles it) - are dark cortex or partial volume with the
STIR-bright disc, canal and soft tissue beside the body, and a segmentation one voxel too wide would otherwise
read as edema. Edema fractions are of the interior's voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.config import ClassificationConfig, EdemaConfig
from pipeline.measure import ZONE_INFERIOR, ZONE_SUPERIOR, StudyMeasurements

CLASS_NONE, CLASS_MODIC_I, CLASS_MODIC_II, CLASS_MODIC_III, CLASS_EDEMA = 0, 1, 2, 3, 4
_TYPE_NAMES = {CLASS_MODIC_I: "I", CLASS_MODIC_II: "II", CLASS_MODIC_III: "III"}
REVIEW_NOTE = "for review, not a diagnosis"
# Confidence of a "none" that could not be judged (normal-marrow reference undefined on a needed sequence).
UNJUDGED_CONFIDENCE = 0.1


@dataclass
class StudyFindings:
    vertebrae: list[dict]
    discs: list[dict]
    reference: dict
    flags: list[dict]
    warnings: list[str]
    zone_map: np.ndarray
    class_map: np.ndarray  # uint8: 0 none, 1 Modic I, 2 Modic II, 3 Modic III, 4 edema outside Modic bands
    fluid_role: str
    notes: list[str] = field(default_factory=list)


def voxel_classes(meas: StudyMeasurements, cfg: ClassificationConfig, fluid_role: str) -> tuple[np.ndarray, np.ndarray]:
    """Per body voxel: Modic class (0-3) and an edema mask. Undefined ratios classify nothing."""
    n = meas.vox_index.size
    r1 = meas.vox_ratio.get("T1")
    r2 = meas.vox_ratio.get("T2")
    rs = meas.vox_ratio.get("STIR") if fluid_role == "STIR" else None
    fluid = rs if fluid_role == "STIR" else r2
    cls = np.zeros(n, dtype=np.uint8)
    edema = np.zeros(n, dtype=bool)
    if r1 is None or fluid is None:
        return cls, edema
    t1_low, t1_high = r1 < cfg.t1_low, r1 > cfg.t1_high
    fluid_high = fluid > cfg.fluid_high
    if rs is not None:
        fluid_low = rs < cfg.fluid_low
        m2 = t1_high & fluid_low
    else:
        # Without STIR, Modic II is T1 high with T2 iso-high (fat is not suppressed).
        fluid_low = (r2 < cfg.t2_low) if r2 is not None else np.zeros(n, dtype=bool)
        m2 = t1_high & ((r2 >= cfg.t2_iso_min) if r2 is not None else True)
    t2_low = (r2 < cfg.t2_low) if r2 is not None else np.zeros(n, dtype=bool)
    m1 = t1_low & fluid_high
    m3 = t1_low & t2_low & fluid_low
    cls[m3] = CLASS_MODIC_III
    cls[m2] = CLASS_MODIC_II
    cls[m1] = CLASS_MODIC_I
    edema = fluid_high & ~t1_high
    return cls, edema


def interior(meas: StudyMeasurements, depth_mm: np.ndarray, surface_mm: float) -> np.ndarray:
    """Body voxels at least ``surface_mm`` inside the body: from the nearer endplate (``depth_mm``, voxel centre),
    the anterior / posterior rim and, when measured, the lateral surface across slices (to the voxel's near face,
    so that a thick outermost slice is always out: ``measure`` module doc). The disc model's features keep their
    own, in-plane rule (``disc_model.CORTEX_MM``): changing it means retraining the shipped disc models."""
    inner = (depth_mm >= surface_mm) & (meas.vox_rim_mm >= surface_mm)
    if meas.vox_lateral_mm is not None:
        inner &= meas.vox_lateral_mm >= surface_mm
    return inner


def _confidence_from_fraction(frac: float, threshold: float, present: bool, n_vox: int) -> float:
    """How far the deciding fraction is from its threshold, damped for tiny zones."""
    if threshold <= 0:
        c = 0.9
    elif present:
        c = min(1.0, 0.5 + 0.5 * (frac - threshold) / max(threshold * 2.0, 1e-6))
    else:
        c = min(1.0, 0.5 + 0.5 * (threshold - frac) / threshold)
    if n_vox < 50:
        c *= max(0.3, n_vox / 50.0)
    return float(np.clip(c, 0.0, 1.0))


def modic_judgeable(meas: StudyMeasurements, fluid_role: str) -> bool:
    """Whether Modic types can be judged at all: the normal-marrow reference is defined on T1 and on the fluid
    series (without it every type would be a guess)."""
    return meas.vox_ratio.get("T1") is not None and meas.vox_ratio.get(fluid_role) is not None


def disc_model_runs(meas: StudyMeasurements, cfg: ClassificationConfig, fluid_role: str) -> bool:
    """Whether the per-disc Modic model decides this study's discs (and so reads their image patches)."""
    return cfg.disc_model == "model" and modic_judgeable(meas, fluid_role) and bool(meas.discs)


def classify_study(meas: StudyMeasurements, cfg: ClassificationConfig, fluid_role: str,
                   single_slice: bool = False, body_model: str = "unet",
                   disc_patches: np.ndarray | None = None) -> StudyFindings:
    """Findings of one study; ``single_slice``: the study is one sagittal slice per series, so every confidence
    is scaled by ``cfg.single_slice_confidence`` (a change off that slice is not seen). ``body_model``: the
    segmentation's body model, which picks the disc model trained on its outlines (``disc_model.model_path``).
    ``disc_patches``: one image patch per disc (``disc_cnn.disc_patches``) for a disc model with a CNN; without
    them the disc model's regression decides alone."""
    n = len(meas.levels)
    body = meas.vox_body
    zone = meas.vox_zone
    cls, edema = voxel_classes(meas, cfg, fluid_role)
    warnings: list[str] = []
    if fluid_role != "STIR":
        warnings.append("no STIR / fat-saturated series: edema and Modic I are judged from T2 with lower confidence")
    modic_judged = modic_judgeable(meas, fluid_role)
    edema_judged = meas.vox_ratio.get(fluid_role) is not None
    if not modic_judged:
        warnings.append("normal-marrow reference undefined on T1 or the fluid series: no Modic type or edema could be judged")

    # Which endplate a voxel belongs to: the nearer one (its half of the body's column).
    side = np.where(meas.vox_depth_sup_mm <= meas.vox_depth_inf_mm, 0, 1)  # 0 superior, 1 inferior
    depth = np.where(side == 0, meas.vox_depth_sup_mm, meas.vox_depth_inf_mm) + np.float32(meas.spacing[0] / 2)
    ep_group = body * 2 + side
    # The cortical endplate and rim are dark on every sequence (like sclerosis) and blur into the marrow, and the
    # outermost sagittal slice averages marrow with what lies beside the body: voxels within cortex_exclusion_mm
    # of the body surface are neither typed nor counted for edema (module doc).
    inner = interior(meas, depth, cfg.cortex_exclusion_mm)
    cls[~inner] = CLASS_NONE
    edema &= inner
    in_band = (((zone == ZONE_SUPERIOR) & (side == 0)) | ((zone == ZONE_INFERIOR) & (side == 1))) & inner

    band_n = np.bincount(ep_group[in_band], minlength=2 * n)
    frac = np.zeros((2 * n, 4))
    for c in (CLASS_MODIC_I, CLASS_MODIC_II, CLASS_MODIC_III):
        frac[:, c] = np.bincount(ep_group[in_band & (cls == c)], minlength=2 * n) / np.maximum(band_n, 1)

    body_n = np.maximum(meas.body_voxels, 1)
    inner_count = np.bincount(body[inner], minlength=n)
    inner_n = np.maximum(inner_count, 1)
    edema_n = np.bincount(body[edema], minlength=n)
    edema_frac = edema_n / inner_n
    for b in np.flatnonzero(inner_count == 0):
        warnings.append(f"{meas.levels[b]}: no voxel {cfg.cortex_exclusion_mm:g} mm inside the body surface: "
                        "edema not judged")
    edema_in_band = np.bincount(body[edema & (zone >= ZONE_SUPERIOR)], minlength=n)
    diffuse = edema_frac * 100.0 >= cfg.diffuse_edema_volume_pct
    median_col_h = _group_median(meas.vox_col_height_mm, body, n)

    class_map = np.zeros(meas.shape, dtype=np.uint8)
    cm_flat = class_map.reshape(-1)

    vertebrae = []
    for b in range(n):  # loop over bodies (<= ~10); all voxel work above is vectorised
        rec = dict(meas.vertebrae[b])
        endplates = {}
        for s, name in ((0, "superior"), (1, "inferior")):
            g = b * 2 + s
            fr = frac[g]
            candidates = [c for c in (CLASS_MODIC_I, CLASS_MODIC_II, CLASS_MODIC_III) if fr[c] >= cfg.min_zone_fraction]
            if name == "inferior" and meas.levels[b] == "S1":
                # S1's inferior side is fused sacrum, not a free endplate: it is measured but not typed.
                candidates = []
            if diffuse[b]:
                # Whole-body edema is not an endplate band: do not call it Modic I.
                candidates = [c for c in candidates if c != CLASS_MODIC_I]
            mtype = _type_name(candidates, fr)
            chosen = [c for c in candidates if _TYPE_NAMES[c] in mtype.split("/")] if mtype != "0" else []
            sel = (ep_group == g) & np.isin(cls, chosen) if chosen else np.zeros(body.size, dtype=bool)
            if chosen:
                cm_flat[meas.vox_index[sel]] = cls[sel]
                ext_h = float(np.percentile(depth[sel], 90) / max(median_col_h[b], 1e-6) * 100.0)
                ext_v = float(sel.sum() / body_n[b] * 100.0)
                decisive = min(fr[c] for c in chosen)
                conf = _confidence_from_fraction(decisive, cfg.min_zone_fraction, True, int(band_n[g]))
                if fluid_role != "STIR" and CLASS_MODIC_I in chosen:
                    conf *= 0.8
            else:
                ext_h = ext_v = 0.0
                conf = _confidence_from_fraction(float(fr[1:].max()), cfg.min_zone_fraction, False, int(band_n[g]))
            if band_n[g] == 0:
                conf = 0.0
            if single_slice:
                conf *= cfg.single_slice_confidence
            if not modic_judged:  # "0" here means "not judged", not "judged normal"
                conf = min(conf, UNJUDGED_CONFIDENCE)
            endplates[name] = {
                "modic_type": mtype,
                "extent_height_pct": round(min(ext_h, 100.0), 2),
                "extent_volume_pct": round(min(ext_v, 100.0), 2),
                "type_fractions": {"I": round(float(fr[1]), 4), "II": round(float(fr[2]), 4), "III": round(float(fr[3]), 4)},
                "confidence": round(conf, 3),
                "n_voxels": int(band_n[g]),
            }
        present = bool(edema_n[b] > 0 and edema_frac[b] >= cfg.edema_min_fraction
                       and meas.vox_ratio.get(fluid_role) is not None)
        if present:
            e_sel = edema & (body == b)
            rows = meas.vox_depth_sup_mm[e_sel]
            # of the interior's height: edema through the whole interior is 100 %
            inner_h = max(median_col_h[b] - 2 * cfg.cortex_exclusion_mm, meas.spacing[0], 1e-6)
            ext_h = float((np.percentile(rows, 95) - np.percentile(rows, 5) + meas.spacing[0]) / inner_h * 100)
            adjacent = bool(edema_in_band[b] / max(edema_n[b], 1) >= cfg.edema_adjacent_fraction)
            free = e_sel & (cm_flat[meas.vox_index] == 0)
            cm_flat[meas.vox_index[free]] = CLASS_EDEMA
        else:
            ext_h, adjacent = 0.0, False
        e_conf = _confidence_from_fraction(float(edema_frac[b]), cfg.edema_min_fraction, present, int(inner_n[b]))
        if fluid_role != "STIR":
            e_conf *= 0.7
        if single_slice:
            e_conf *= cfg.single_slice_confidence
        if not edema_judged or inner_count[b] == 0:
            e_conf = min(e_conf, UNJUDGED_CONFIDENCE)
        rec["edema"] = {
            "present": present,
            "source": fluid_role,
            "extent_volume_pct": round(float(min(edema_frac[b] * 100.0, 100.0)) if present else 0.0, 2),
            "extent_height_pct": round(min(ext_h, 100.0), 2),
            "adjacent_to_endplate": adjacent,
            "confidence": round(e_conf, 3),
        }
        rec["endplates"] = endplates
        vertebrae.append(rec)

    discs = [dict(d) for d in meas.discs]
    for d in discs:
        d["bright"] = bool(d["t2_ratio_to_discs"] is not None and d["t2_ratio_to_discs"] >= cfg.disc_bright_ratio)
    add_disc_modic(vertebrae, discs, cfg.diffuse_edema_volume_pct)
    if disc_model_runs(meas, cfg, fluid_role):
        model_disc_modic(meas, vertebrae, discs, cfg, single_slice, body_model, disc_patches)
    flags = review_flags(vertebrae, discs, cfg)
    return StudyFindings(vertebrae=vertebrae, discs=discs, reference=dict(meas.reference), flags=flags,
                         warnings=warnings, zone_map=meas.zone_map, class_map=class_map, fluid_role=fluid_role)


def disc_endplates(disc: dict, by_level: dict[str, dict]) -> list[tuple[str, dict, dict]]:
    """(name, endplate, body) of the endplates facing a disc that were measured: the upper body's inferior and the
    lower body's superior."""
    sides = ((disc["upper"], "inferior"), (disc["lower"], "superior"))
    return [(f"{lv} {side}", by_level[lv]["endplates"][side], by_level[lv]) for lv, side in sides if lv in by_level]


def disc_type_fractions(eps: list[tuple[str, dict, dict]], diffuse_edema_volume_pct: float) -> np.ndarray:
    """(0, I, II, III) band fractions of a disc: per type the larger of its two endplates'. The type I fraction of
    a body with diffuse edema (>= ``diffuse_edema_volume_pct`` of its volume) does not count: that is the body's
    edema (fracture, infection), not an endplate change."""
    fr = np.zeros(4)
    for _, ep, body in eps:
        tf = ep["type_fractions"]
        diffuse = body["edema"]["extent_volume_pct"] >= diffuse_edema_volume_pct
        fr = np.maximum(fr, [0.0, 0.0 if diffuse else tf["I"], tf["II"], tf["III"]])
    return fr


def add_disc_modic(vertebrae: list[dict], discs: list[dict], diffuse_edema_volume_pct: float = 100.0) -> None:
    """Per disc level, the Modic finding of its two endplates (the upper body's inferior, the lower body's
    superior), as graded in the literature ("Modic II at L4-L5"): ``disc["modic"]``.

    Type: the union of the endplates' types (I with II -> "I/II", II with III -> "II/III", else the dominant one);
    ``score`` (0-1, for ROC curves): the largest type fraction of either endplate band, the quantity whose
    ``min_zone_fraction`` threshold decides a type; extent: the larger of the two; confidence: of the typed
    endplate(s) when a type is reported, else the lower of the two (both must look normal). The type I fraction
    of a body with diffuse edema (>= ``diffuse_edema_volume_pct``) does not count (:func:`disc_type_fractions`).
    """
    by_level = {v["level"]: v for v in vertebrae}
    for d in discs:
        eps = disc_endplates(d, by_level)
        fr = disc_type_fractions(eps, diffuse_edema_volume_pct)
        names = {c for _, ep, _ in eps if ep["modic_type"] != "0" for c in ep["modic_type"].split("/")}
        codes = [c for c, name in _TYPE_NAMES.items() if name in names]
        typed = [ep for _, ep, _ in eps if ep["modic_type"] != "0"]
        conf = max(ep["confidence"] for ep in typed) if typed else min((ep["confidence"] for _, ep, _ in eps), default=0.0)
        d["modic"] = {
            "modic_type": _type_name(codes, fr),
            "score": round(float(min(fr.max(), 1.0)), 4),
            "extent_height_pct": max((ep["extent_height_pct"] for _, ep, _ in eps), default=0.0),
            "extent_volume_pct": max((ep["extent_volume_pct"] for _, ep, _ in eps), default=0.0),
            "confidence": round(float(conf), 3),
            "endplates": [name for name, _, _ in eps],
        }


def model_disc_modic(meas: StudyMeasurements, vertebrae: list[dict], discs: list[dict], cfg: ClassificationConfig,
                     single_slice: bool, body_model: str = "unet", disc_patches: np.ndarray | None = None) -> None:
    """Replace each disc's Modic presence by the shipped disc model's call (``disc_model.py``; README "Modic
    findings on real data"): ``score`` = the model's probability, type "0" below its threshold; above it the
    threshold type of the two endplates, or when they show none the dominant type fraction of the two bands
    (:func:`disc_type_fractions`, as for the thresholds; "II" when all are zero: nearly all changes in the training
    gradings are type II). Per-endplate types are left as the thresholds gave them."""
    from pipeline.disc_model import disc_features, load_disc_model

    model = load_disc_model(body_model=body_model)
    prob, thresholds = model.decide(disc_features(meas), disc_patches)
    by_level = {v["level"]: v for v in vertebrae}
    for d, p, threshold in zip(discs, prob, thresholds, strict=True):
        m = d["modic"]
        eps = disc_endplates(d, by_level)
        present = bool(p >= threshold)
        if present and m["modic_type"] == "0":
            fr = disc_type_fractions(eps, cfg.diffuse_edema_volume_pct)
            m["modic_type"] = _TYPE_NAMES[int(np.argmax(fr[1:])) + 1] if fr[1:].max() > 0 else "II"
        elif not present:
            m["modic_type"] = "0"
            m["extent_height_pct"] = m["extent_volume_pct"] = 0.0
        span = (1.0 - threshold) if present else threshold
        conf = 0.5 + 0.5 * abs(float(p) - threshold) / max(span, 1e-6)
        # Damped like the threshold call when a band is small or missing (the features then see one side only).
        n_band = min((ep["n_voxels"] for _, ep, _ in eps), default=0)
        if n_band < 50:
            conf *= max(0.3, n_band / 50.0)
        if single_slice:
            conf *= cfg.single_slice_confidence
        m["score"] = round(float(p), 4)
        m["confidence"] = round(float(np.clip(conf, 0.0, 1.0)), 3)


def _group_median(values: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    from pipeline.measure import group_quantiles

    q = group_quantiles(values.astype(np.float32), groups, n, qs=(0.5,))[:, 0]
    return np.nan_to_num(q, nan=1.0)


def _type_name(candidates: list[int], fr: np.ndarray) -> str:
    if not candidates:
        return "0"
    if len(candidates) == 1:
        return _TYPE_NAMES[candidates[0]]
    s = set(candidates)
    if s == {CLASS_MODIC_I, CLASS_MODIC_II}:
        return "I/II"
    if s == {CLASS_MODIC_II, CLASS_MODIC_III}:
        return "II/III"
    # I with III (or all three): report the dominant type; mixed I/III is not a recognised category.
    return _TYPE_NAMES[max(candidates, key=lambda c: fr[c])]


def review_flags(vertebrae: list[dict], discs: list[dict], cfg: ClassificationConfig) -> list[dict]:
    """Patterns an expert should look at. Worded as flags for review, never as a diagnosis."""
    flags = []
    by_level = {v["level"]: v for v in vertebrae}
    for v in vertebrae:
        if not v["edema"]["present"]:
            continue
        ratios = [r for r in v["height_ratios"].values() if r is not None]
        # Edema through much of the body (not a Modic band) with height loss; S1's wedge shape is normal anatomy.
        diffuse = v["edema"]["extent_volume_pct"] >= cfg.diffuse_edema_volume_pct
        if ratios and min(ratios) <= cfg.fracture_height_ratio and diffuse and v["level"] != "S1":
            loss = (1 - min(ratios)) * 100
            flags.append({"code": "POSSIBLE_ACUTE_FRACTURE", "levels": [v["level"]],
                          "message": f"{v['level']}: edema with {loss:.0f} % height loss suggests a possible acute fracture ({REVIEW_NOTE})"})
        if not v["edema"]["adjacent_to_endplate"]:
            flags.append({"code": "ATYPICAL_EDEMA", "levels": [v["level"]],
                          "message": f"{v['level']}: marrow edema not adjacent to an endplate ({REVIEW_NOTE})"})
    for d in discs:
        up, lo = by_level.get(d["upper"]), by_level.get(d["lower"])
        if up is None or lo is None or not d["bright"]:
            continue
        up_edema = up["edema"]["present"] or up["endplates"]["inferior"]["modic_type"] in ("I", "I/II")
        lo_edema = lo["edema"]["present"] or lo["endplates"]["superior"]["modic_type"] in ("I", "I/II")
        if up_edema and lo_edema:
            flags.append({"code": "POSSIBLE_INFECTION", "levels": [d["upper"], d["lower"]],
                          "message": f"{d['level']}: edema on both sides of a bright disc suggests possible infection ({REVIEW_NOTE})"})
    return flags


# ---------------------------------------------------------------------------------------------- voxel edema rule
# The dense-volume edema rule, calibrated on real STIR against human readers (EdemaConfig). The per-vertebra
# flag above applies the same two ratio tests voxel by voxel on the vertebral bodies (STIR ratio > fluid_high and
# T1 ratio <= t1_high against the cores' reference) and then a volume fraction per body; ``edema_mask`` is the
# region-level form for a whole bone region: an automatic reference, hysteresis between grow_ratio and seed_ratio
# (a seed must be clearly bright, its connected surroundings moderately), a T1 ceiling and a minimum size.
_HIST_BINS = 256  # histogram of the region's STIR for the mode: fine enough for 8-bit and 12-bit data alike
_HIST_SMOOTH_BINS = 3.0  # Gaussian sigma (bins) that keeps noise spikes from becoming the mode


@dataclass
class EdemaResult:
    mask: np.ndarray  # bool, the input grid
    reference: float  # STIR normal-marrow reference of the region (histogram mode)
    t1_reference: float | None  # T1 median of the region (None without T1)
    ratio: np.ndarray  # float32 STIR / local normal-marrow reference (0 outside the region)
    t1_ratio: np.ndarray | None = None  # float32 T1 / the region's T1 median (None without T1)


def marrow_mode(values: np.ndarray) -> float:
    """The most frequent STIR value of a marrow region (smoothed histogram below its 99th percentile).

    Normal marrow is the bulk of a bone region: its mode is a reference that edema, vessels and fluid (a bright
    tail) and cortex (a dark tail) do not pull, unlike the median when a third of the region is edematous."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    top = float(np.percentile(values, 99))
    if top <= 0:
        return float(np.median(values))
    from scipy.ndimage import gaussian_filter1d

    hist, edges = np.histogram(values, bins=_HIST_BINS, range=(0.0, top))
    i = int(np.argmax(gaussian_filter1d(hist.astype(np.float64), _HIST_SMOOTH_BINS)))
    return float((edges[i] + edges[i + 1]) / 2)


def _smooth_within(image: np.ndarray, region: np.ndarray, sigma_mm: float, spacing, step: int = 1) -> np.ndarray:
    """Gaussian mean of ``image`` over ``region`` only (normalised convolution), so tissue outside the region does
    not bleed in. ``step`` > 1 computes it on every step-th in-plane voxel and interpolates back (broad kernels)."""
    from scipy import ndimage

    w = region.astype(np.float32)
    num, den = image.astype(np.float32) * w, w
    if step > 1:
        num, den = num[::step, ::step], den[::step, ::step]
    sigma = [sigma_mm / float(s) / (step if ax < 2 else 1) for ax, s in enumerate(spacing)]
    num = ndimage.gaussian_filter(num, sigma)
    den = ndimage.gaussian_filter(den, sigma)
    out = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)
    if step > 1:
        zoom = [a / b for a, b in zip(image.shape, out.shape, strict=True)]
        out = ndimage.zoom(out, zoom, order=1, mode="nearest", grid_mode=True)
    return out


def edema_mask(stir: np.ndarray, region: np.ndarray, spacing, cfg: EdemaConfig, t1: np.ndarray | None = None) -> EdemaResult:
    """Marrow edema inside ``region`` (a bone mask) of a STIR volume: connected STIR-bright regions (see EdemaConfig).

    The reference is automatic: the mode of the region's STIR (:func:`marrow_mode`), times a smooth map of the
    region's non-bright marrow over its own mean, so coil shading does not read as edema. Without ``t1`` the fat
    test is skipped."""
    from skimage.filters import apply_hysteresis_threshold

    region = np.asarray(region, dtype=bool)
    stir = np.asarray(stir, dtype=np.float32)
    empty = EdemaResult(np.zeros(stir.shape, dtype=bool), float("nan"), None, np.zeros(stir.shape, dtype=np.float32))
    if not region.any():
        return empty
    values = stir[region]
    reference = marrow_mode(values)
    if not np.isfinite(reference) or reference <= 0:
        return empty
    local = np.float32(reference)
    if cfg.reference_scale_mm > 0:
        normal = region & (stir <= np.quantile(values, cfg.reference_trim_quantile))
        step = max(1, int(cfg.reference_scale_mm / 4.0 / max(float(min(spacing[:2])), 1e-6)))
        shading = _smooth_within(stir, normal, cfg.reference_scale_mm, spacing, step=step)
        mean_normal = float(stir[normal].mean()) if normal.any() else 0.0
        if mean_normal > 0:
            local = np.where(shading > 0, shading * np.float32(reference / mean_normal), np.float32(reference))
    signal = _smooth_within(stir, region, cfg.smooth_mm, spacing) if cfg.smooth_mm > 0 else stir
    ratio = np.where(region, signal / local, 0.0).astype(np.float32)
    candidate = ratio.copy()
    t1_reference, t1_ratio = None, None
    if t1 is not None:
        t1 = np.asarray(t1, dtype=np.float32)
        t1_reference = float(np.median(t1[region]))
        if t1_reference > 0:
            t1_signal = _smooth_within(t1, region, cfg.smooth_mm, spacing) if cfg.smooth_mm > 0 else t1
            t1_ratio = (t1_signal / np.float32(t1_reference)).astype(np.float32)
            candidate[t1_ratio > cfg.t1_max_ratio] = 0.0
    mask = apply_hysteresis_threshold(candidate, cfg.grow_ratio, max(cfg.seed_ratio, cfg.grow_ratio))
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    if cfg.min_volume_mm3 > 0 and mask.any():
        from scipy import ndimage

        labels, n = ndimage.label(mask)
        big = np.bincount(labels.ravel(), minlength=n + 1) * voxel_mm3 >= cfg.min_volume_mm3
        big[0] = False
        mask = big[labels]
    return EdemaResult(mask=mask, reference=reference, t1_reference=t1_reference, ratio=ratio, t1_ratio=t1_ratio)

"""Stage 3: vertebral bodies — segmented, separated at the discs, and labelled L1..L5, S1.

Method (no learned weights are downloaded; the small model ships in ``pipeline/segmentation/models/``):

1. **Working grid.** The sagittal image is resampled in-plane to ``WORK_MM`` (1.5 mm); slices keep their
   spacing. Intensities are scaled by robust percentiles of the foreground, so T1, T2, STIR and water-fat
   images land in a comparable range.
2. **Where is the spine** (3 mm grid, every ~3 mm slice): a gradient-boosted pixel classifier (scikit-learn
   ``HistGradientBoostingClassifier``, "stage 1") over per-slice features — smoothed intensity, local z-scores
   (brighter / darker than the surroundings, whatever the contrast), gradients, Hessian eigenvalues, and the
   intensity steps to points 6-30 mm above / below and 15-45 mm in front / behind (the body / disc alternation).
   A column curve fitted through its body map (RANSAC) says where to look.
3. **Body or not, voxel by voxel** (``segmentation.body_model``; the default ``auto`` is ``unet`` for a volume and
   ``onepass``, below, for a single slice: :func:`resolve_body_model`):
   ``unet`` — a small 2.5-D U-Net (:mod:`pipeline.segmentation.unet`, ONNX Runtime) on the working-grid slices
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
5. **Labelling** (:mod:`pipeline.segmentation.labelling`) finds the lumbosacral junction from anatomy: each
   reading of the column's end (which body is L5, which piece is the top of the sacrum, or S1 out of view) is
   scored by L5's steep lower endplate (the wedge of the L5-S1 disc) and the look of the sacrum's top as the
   networks find it (a short piece whose lower outline curves back, under a sloped upper endplate); levels are
   counted up from L5 (L4, ..., T12, ...); with the one-pass net, its second output (P(L5)) weighs in too.
   Bodies stay unnamed (B<n>, values 100 + n) only when no reading looks
   lumbosacral (flag ``NO_LUMBOSACRAL_JUNCTION``); body-sized instances the chain leaves out are B<n> too.
6. **Edges at the input resolution** (:mod:`pipeline.segmentation.refine`): the named bodies are mapped back to the
   input grid and the voxels within 4 mm of their surfaces are re-decided by a third classifier (contrast-free
   features relative to each body's own interior), trained on held-out segmentations of the real scans: one
   refiner per body model (:func:`edge_refiner_for`), the U-Net's learnt on the output of U-Nets that did not see
   the case (``python -m pipeline.training.train_segmenter --unet-refiner``).

``segmentation.body_model: onepass`` replaces steps 2, 3 and 6 by one net (:func:`pipeline.segmentation.probability.
onepass_probability`): a narrower U-Net, trained with domain randomisation, on whole slices; the column is fitted
through its own output and the surfaces at the input resolution follow its probability
(:func:`pipeline.segmentation.refine.probability_edges`). Steps 4 and 5 are the same.

The classifiers and the U-Net are trained on the expert-annotated real scans of ``../shared/data/vertebral-bodies``
and on synthetic phantoms (``python -m pipeline.training.train_segmenter``, cross-validation estimates with ``--cv``;
``python -m pipeline.training.train_unet``, held-out models with ``--fold``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from scipy import ndimage

from pipeline.arrays import label_counts_and_centroids
from pipeline.config import SegmentationConfig
from pipeline.errors import StudyError
from pipeline.segmentation.bodies import complete_heights, hull_bodies, smooth_bodies
from pipeline.segmentation.column import split_column
from pipeline.segmentation.grid import WORK_MM, resample_inplane, to_input_grid, to_work_grid
from pipeline.segmentation.labelling import (
    FOV_EDGE_MM,
    body_geometry,
    disc_contrasts,
    label_levels,
    pair_slices,
)
from pipeline.segmentation.probability import body_probability, load_model
from pipeline.segmentation.refine import edge_refiner_for
from pipeline.types import Segmentation, VertebralBody, level_value

log = logging.getLogger("modicscan")




# A single sagittal slice (2-D research sets, key images) is read as a slab at least this thick by the size rules
# (volumes in ml: fragments, bodies, the column's typical body). Its bodies' "volumes" are areas x the slice's
# thickness, and the rules were set on slabs of 3-4 mm: a 0.9 mm slice (SPIDER's T2 of 1.5 T Siemens scans) made
# every body a fragment (5 of 92 SPIDER slices failed with "no vertebral body was found"). Reported volumes stay
# physical.
SINGLE_SLICE_SLAB_MM = 3.0


def rule_slab_mm(n_slices: int, slice_mm: float) -> float:
    """Slice thickness (mm) the size rules use: the real one, or ``SINGLE_SLICE_SLAB_MM`` for a thinner single slice."""
    return float(slice_mm) if n_slices > 1 else max(float(slice_mm), SINGLE_SLICE_SLAB_MM)


def resolve_body_model(body_model: str, n_slices: int) -> str:
    """The body model a study of ``n_slices`` sagittal slices runs: ``auto`` is the one-pass net for a single slice
    and the U-Net cascade for a volume; any other name is itself.

    Why: the U-Net reads each slice with its neighbours 4 mm to either side and was trained on volumes only (a
    single slice gives it three copies of itself); the one-pass net was also trained on single-slice crops. On the
    92 single SPIDER slices (no model saw them) the one-pass net's bodies give the better Modic figures under
    cross-validation over patients and agree more often with the experts' disc count and Pfirrmann grades; on
    volumes the cascade's outlines are tighter (README "Which body model should be the default").
    """
    if body_model != "auto":
        return body_model
    return "onepass" if int(n_slices) == 1 else "unet"


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
    rarely does on all of them (unless ``cfg.extra_contrasts`` is off).

    ``model``: a trained model dict (default: the shipped one, :func:`load_model`).
    """
    cfg = cfg or SegmentationConfig()
    spacing = tuple(float(s) for s in spacing)
    if image.ndim != 3 or min(image.shape) < 1:
        raise StudyError("SEGMENTATION_FAILED", f"expected a 3-D image, got shape {image.shape}")
    cfg = replace(cfg, body_model=resolve_body_model(cfg.body_model, image.shape[2]))
    if model is None and cfg.body_model != "onepass":  # the one-pass net needs no classifier (1 s, 140 MiB to load)
        model = load_model()
    prob, zoom, region, l5_map = body_probability(image, spacing, model=model, body_model=cfg.body_model, int8=cfg.int8)
    slab_mm = rule_slab_mm(image.shape[2], spacing[2])  # the slice thickness the size rules (ml) use
    if extra_images and cfg.extra_contrasts:
        # Other contrasts only matter where T2 does not already call the voxel body, and only near the bodies
        # T2 found (abnormal marrow sits in or beside a body): everything else is skipped.
        # When T2 finds less than a few bodies' worth (unusual scaling, artefacts), the others are classified
        # everywhere: they must be able to find the bodies on their own.
        body = prob > cfg.probability_threshold
        found_ml = float(body.sum()) * WORK_MM * WORK_MM * slab_mm / 1000.0
        if found_ml >= 3 * cfg.min_body_volume_ml:
            near = ndimage.binary_dilation(body, structure=np.ones((3, 3, 1), bool), iterations=int(round(15.0 / WORK_MM)))
            near &= ~body
            if region is not None:
                near &= region
        else:
            near = region
        for extra in extra_images:
            p2, _, _, _ = body_probability(extra, spacing, region=near, model=model, body_model=cfg.body_model,
                                           int8=cfg.int8)
            np.maximum(prob, p2, out=prob)
    sp_work = (spacing[0] / zoom[0], spacing[1] / zoom[1], slab_mm)
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
    geometry = body_geometry(lab, ids, sp_work)
    log.debug("segment: centroids %s geometry %s volumes %s", np.round(cents[:, 0] * sp_work[0]), np.round(geometry),
              np.round(vol_ml))
    # The discs between neighbours, read on the image itself (only the slices they are read on are resampled).
    ks = pair_slices(lab, ids)
    slices = to_work_grid(image[:, :, np.maximum(ks, 0)], spacing)[0] if ks.size else np.zeros((0, 0, 0))
    discs = disc_contrasts(slices, lab, ids, ks)
    # The one-pass net's own reading of which body is L5: mean P(L5) over each component
    l5_evidence = None if l5_map is None else np.asarray(ndimage.mean(l5_map, lab, ids), float)
    names, conf, flags, notes = label_levels(cents[:, 0] * sp_work[0], geometry, vol_ml, cfg, others_mm, cut,
                                             fov_end_mm=lab.shape[0] * sp_work[0], discs=discs,
                                             l5_evidence=l5_evidence)
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

    # Relabel on the working grid, then back to the input grid (bilinear per body, see to_input_grid).
    lut = np.zeros(int(lab.max()) + 1, dtype=np.int16)
    bodies_meta = []
    for lid, name, v in zip(ids, names, vol_ml, strict=True):
        if not name or name in sacral:
            continue
        val = level_value(name)
        lut[lid] = val
        bodies_meta.append((name, val, v))
    work_labels = lut[lab]
    from pipeline.segmentation.refine import crop_box, probability_edges, refine_labels

    resampled = work_labels.shape[:2] != image.shape[:2]
    labels = to_input_grid(work_labels, image.shape) if resampled else work_labels
    box = crop_box(labels, spacing)  # everything the refiner reads or changes
    if resampled:
        prob = resample_inplane(prob, image.shape, box)
    refiner = edge_refiner_for(model or {}, cfg.body_model)
    if cfg.refine_edges and refiner is not None:
        labels = refine_labels(image, labels, prob, spacing, refiner, box)
    elif cfg.refine_edges and resampled and cfg.edge_threshold > 0:
        labels = probability_edges(labels, prob, spacing, box, cfg.edge_threshold)
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

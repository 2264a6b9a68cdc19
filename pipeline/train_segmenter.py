"""Train the vertebral-body pixel classifier shipped in pipeline/models/ (``python -m pipeline.train_segmenter``).

Training data: the expert-annotated real scans listed in ``../shared/data/vertebral-bodies/cases.csv``
(42 sagittal volumes from three public datasets; see that folder's README for sources and licences) and
24 synthetic phantom studies (pipeline.phantom, T1 / T2 / STIR each). For every case the image is put on the
segmenter's working grid, normalised, and a class-balanced sample of voxels is drawn: body voxels, and
background voxels with extra weight near the bodies (discs, cortex, canal), where the decisions are hard.
Labels of bodies that are visible but not annotated (e.g. T12, S1 in vb3) are unknown, so voxels far
below/above the annotated range are not used as negatives.

Phantom series contribute 1/32 of a real case's samples, plus 1/8 from their "focus" rows (from the highest
planted-lesion body down to S1, every body between included, and the sacrum under S1): they are there so that
fractured, edematous and sclerotic bodies and DICOM-like T1 / STIR are not out of distribution, and their normal
anatomy, simpler than real anatomy, should not set the borders. Their truth is complete, so the sacrum under S1
gives background samples that the real scans (annotated down to L5 or S1 at most) cannot give.
``--augment invert,gamma0.6`` adds intensity-remapped copies of the real cases (half weight).

The edge refiner (:mod:`pipeline.edge_refiner`) learns from held-out output: the real cases in 3 folds
(stratified by source), each fold segmented by stages trained without it (same recipe), 40 000 voxels of the
4 mm surface band per case. Training therefore fits the stages four times (~10 min on two cores, `--jobs 2`).

The U-Net has its own edge refiner, learnt the same way from the U-Net's held-out output: ``--unet-refiner
f0.onnx f1.onnx f2.onnx`` segments each fold's cases with the net trained without them (``python -m
pipeline.train_unet --fold K``) and stores the refiner as ``refiner_unet`` in the model file (~1 min on two cores).

``--cv cases`` / ``--cv loso`` print a cross-validation estimate instead: train without each held-out group,
segment its cases with the full pipeline segmenter, and score per-body Dice (pipeline.evaluate).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from .config import SegmentationConfig
from .edge_refiner import PROFILE_MM, band_samples
from .evaluate import common_box
from .segment import (
    MODEL_PATH,
    STAGE1_FEATURES,
    STAGE1_MM,
    STAGE2_FEATURES,
    WORK_MM,
    _down2,
    normalise,
    segment_vertebrae,
    stage1_features,
    stage1_probability,
    stage2_candidates,
    stage2_features,
    to_work_grid,
)

DEFAULT_CASES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "vertebral-bodies" / "cases.csv"


def read_cases(cases_csv: Path) -> list[dict]:
    with open(cases_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["source"] = r.get("source_set") or r["case"].split("-")[0]
        r["image_path"] = str(Path(cases_csv).parent / r["image"])
        r["labels_path"] = str(Path(cases_csv).parent / r["labels"])
    return rows


def load_case(row: dict) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image on the working grid, label values on that grid (nearest), working spacing) of one image/labels row."""
    import nibabel as nib

    from .io import reorient_to_work

    img = nib.load(row["image_path"])
    data, _ = reorient_to_work(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    lab_img = nib.load(row["labels_path"])
    lab, aff = reorient_to_work(np.asarray(lab_img.dataobj), lab_img.affine)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    box = common_box(lab.shape, data.shape)
    lab, data = lab[box], data[box]
    if row.get("remap"):
        data = remap_intensity(data, row["remap"])
    work, zoom = to_work_grid(data, spacing)
    ii = np.minimum((np.arange(work.shape[0]) + 0.5) / zoom[0], lab.shape[0] - 1).astype(int)
    jj = np.minimum((np.arange(work.shape[1]) + 0.5) / zoom[1], lab.shape[1] - 1).astype(int)
    return work, lab[ii][:, jj], (WORK_MM, WORK_MM, float(spacing[2]))


def remap_intensity(image: np.ndarray, kind: str) -> np.ndarray:
    """Training augmentation: the same anatomy under another contrast. ``invert`` turns the tissue's grey
    levels upside down (air stays dark): bright fatty marrow on T1 becomes dark marrow as on water / STIR
    images, the dark cortex and canal become bright. ``gamma<g>``: a monotone remap (fat vs marrow vs muscle
    contrast changes as between scanners and sequences)."""
    hi = float(np.percentile(image[image > 0], 99)) if (image > 0).any() else 0.0
    if hi <= 0:
        return image
    if kind == "invert":
        # tissue = not air: smoothed, so that dark cortex, ligaments and gas inside the body count as tissue
        from skimage.filters import threshold_otsu

        smooth = ndimage.gaussian_filter(image, (3, 3, 0))
        tissue = smooth > 0.5 * threshold_otsu(smooth[:, :, ::4])
        return np.where(tissue, np.clip(hi - image, 0.05 * hi, None), 0.0).astype(np.float32)
    if kind.startswith("gamma"):
        return (hi * np.clip(image / hi, 0, None) ** float(kind[5:])).astype(np.float32)
    raise ValueError(f"unknown remap {kind!r}")


def _rows_known(body: np.ndarray, margin: int, below: int = 0) -> np.ndarray:
    """Rows within ``margin`` of the annotated bodies (under the lowest: ``below`` rows when more): above / below
    them live unannotated vertebrae (vb3 labels L1-L5 only, vb2 T11-L5), whose voxels are neither body nor
    background for training."""
    rows = np.flatnonzero(body.any(axis=(1, 2)))
    ok = np.zeros(body.shape[0], bool)
    if rows.size:
        ok[max(0, rows.min() - margin): rows.max() + max(margin, below) + 1] = True
    return np.broadcast_to(ok[:, None, None], body.shape)


def _rows_below(row: dict, pitch_mm: float) -> int:
    """Rows under the lowest annotated body whose labels are known from the row itself: ``known_below_mm`` (the
    phantoms, whose truth ends at S1: the sacrum under it is background), 0 for the real scans."""
    return int(round(float(row.get("known_below_mm", 0.0)) / pitch_mm))


def _balanced(y: np.ndarray, usable: np.ndarray, near: np.ndarray, rng, n_per_class: int) -> np.ndarray:
    """Indices of up to n_per_class body voxels, background near the bodies (discs, cortex, canal: the hard
    decisions) and background farther away."""
    groups = [np.flatnonzero(y & usable), np.flatnonzero(~y & near & usable), np.flatnonzero(~y & ~near & usable)]
    picks = [rng.choice(g, min(n_per_class, g.size), replace=False) for g in groups if g.size]
    return np.concatenate(picks) if picks else np.zeros(0, np.int64)


def _focus_rows(lab: np.ndarray, values, margin: int, below: int = 0) -> np.ndarray | None:
    """Rows from the top of the highest to the bottom of the lowest of the bodies ``values`` (a phantom's planted
    lesions and S1, so the bodies between them too) +- ``margin`` (under the lowest: ``below`` when more); None
    without values."""
    return _rows_known(np.isin(lab, values), margin, below) if values else None


def _draw(y, usable, near, focus, rng, n_per_class, n_focus) -> np.ndarray:
    """Balanced sample indices; with a ``focus`` region (a phantom's focus rows) ``n_focus`` per class from
    it and ``n_per_class`` from the rest."""
    if focus is None:
        return _balanced(y.reshape(-1), usable.reshape(-1), near.reshape(-1), rng, n_per_class)
    return np.concatenate([_balanced(y.reshape(-1), (usable & f).reshape(-1), near.reshape(-1), rng, n)
                           for f, n in ((focus, n_focus), (~focus, n_per_class))])


def stage1_samples(row: dict, rng: np.random.Generator, n_per_class: int = 5000, n_focus: int = 0):
    work, lab, _ = load_case(row)
    n3 = _down2(normalise(work))
    y = _down2((lab > 0).astype(np.float32)) > 0.5
    below = _rows_below(row, STAGE1_MM)
    usable = _rows_known(y, 1, below) & (n3 > 0.02)
    near = ndimage.binary_dilation(y, iterations=3)
    focus = _focus_rows(lab[::2, ::2][: n3.shape[0], : n3.shape[1]], row.get("focus"), 3, below)
    idx = _draw(y, usable, near, focus, rng, n_per_class, n_focus)
    return stage1_features(n3)[idx], y.reshape(-1)[idx]


def stage2_samples(row: dict, stage1_model, rng: np.random.Generator, n_per_class: int = 6000, n_focus: int = 0):
    """Stage-2 samples where stage 2 runs at inference (near stage-1 body voxels), with ``stage1_model``'s map."""
    work, lab, sp = load_case(row)
    body = lab > 0
    norm = normalise(work)
    p1 = stage1_probability(stage1_model, norm, sp[2])
    below = _rows_below(row, WORK_MM)
    usable = _rows_known(body, 3, below) & stage2_candidates(p1, norm)
    near = ndimage.binary_dilation(body, iterations=4)
    idx = _draw(body, usable, near, _focus_rows(lab, row.get("focus"), 6, below), rng, n_per_class, n_focus)
    where = np.zeros(body.size, bool)
    where[idx] = True
    return stage2_features(norm, p1, sp[2], where.reshape(body.shape)), body.reshape(-1)[where]


def phantom_rows(folder: Path, n_studies: int, first_seed: int = 100) -> list[dict]:
    """Synthetic studies (pipeline.phantom, seeds disjoint from sample_data) as NIfTI image/label rows, one per
    sequence, so the classifier also sees DICOM-like anisotropic T1 / T2 / STIR (the pipeline's input)."""
    import nibabel as nib

    from . import io, phantom

    rows = []
    levels = ["T12", "L1", "L2", "L3", "L4", "L5"]
    for seed in range(first_seed, first_seed + n_studies):
        findings = None
        if seed % 3 == 0:
            # Every third study carries an edematous (fractured) body: bright on T2 / STIR, dark on T1, so the
            # classifier learns that abnormal marrow is still vertebral body.
            lv = levels[seed % len(levels)]
            findings = [{"kind": "fracture", "level": lv, "height_loss": 0.15 + 0.05 * (seed % 5), "edema": True}]
        else:
            # ... and every other one Modic bands at both endplates of one disc (type III is dark on every
            # sequence, type I bright on fluid-sensitive ones): changed marrow is still part of the body.
            up = ["L1", "L2", "L3", "L4", "L5"][seed % 5]
            lo = {"L1": "L2", "L2": "L3", "L3": "L4", "L4": "L5", "L5": "S1"}[up]
            mtype = ["III", "I", "II", "III", "II/III", "I/II"][seed % 6]
            findings = [{"kind": "modic", "type": mtype, "level": up, "endplate": "inferior", "depth_mm": 6.0 + seed % 5},
                        {"kind": "modic", "type": mtype, "level": lo, "endplate": "superior", "depth_mm": 6.0 + seed % 4}]
        truth = phantom.make_study(folder, seed, findings=findings, matrix=256 if seed % 2 else 320)
        study = folder / truth["study_name"]
        # focus bodies: the planted lesions' and S1 (the lumbosacral junction, where Modic changes are most
        # frequent and the sacrum's shape differs most from real anatomy); _focus_rows spans the rows from the
        # highest of them down to S1
        focus_levels = {"S1"} | {f["level"] for f in findings}
        focus = sorted({v["value"] for name, v in truth["vertebrae"].items()
                        if v.get("present") and v.get("value") and name in focus_levels})
        d = io.discover(study / "DICOM")
        (st,) = d.studies.values()
        labels = nib.load(study / "truth" / "labels.nii.gz")
        for s in st.series.values():
            vol = io.load_series(s)
            img_path = study / f"{s.series_uid[-8:]}_image.nii.gz"
            io.save_nifti(vol.data, vol.affine, img_path)
            rows.append({"case": f"ph{seed}-{s.series_description}", "source": "phantom", "image_path": str(img_path),
                         "labels_path": str(study / "truth" / "labels.nii.gz"), "focus": focus,
                         "known_below_mm": SACRUM_KNOWN_MM})
        del labels
    return rows


# Few deep trees: prediction time grows with the number of trees (one root-to-leaf walk each), barely with their
# depth. Held-out Dice (3-fold harness, refiner retrained) and median stage time per case:
# 120 trees x 31 leaves at 0.15: 0.7972, 1.66 s; 60 x 63 at 0.3: 0.7999, 1.45 s; 40 x 127 at 0.4: 0.7996, 1.18 s;
# 25 x 255 at 0.5: 0.8023, 1.13 s (with the sacrum samples, shipped: 0.7923; `--cv cases` 0.8037, was 0.7979).
TREES, LEAVES, LEARNING_RATE = 25, 255, 0.5


def _classifier(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=TREES, learning_rate=LEARNING_RATE, max_leaf_nodes=LEAVES,
                                          l2_regularization=1.0, random_state=seed)


# A phantom's truth is complete: under its S1 lies sacrum, never body. Its first SACRUM_KNOWN_MM are background
# samples (and focus rows): the real scans never annotate below S1, and a sacral segment taken for a body
# renames every level above it (seen on the sample's seed 2 with a retrained model: S2 called S1, L1 called T12).
SACRUM_KNOWN_MM = 45.0
PHANTOM_SHARE = (32, 8)  # a phantom series gives 1/32 of a real case's samples per class, plus 1/8 from its focus rows

REFINER_FOLDS = 3
REFINER_FEATURES = (["signed_dist", "p2", "i", "i_body", "s1_body", "grad_body", "grad_normal_body"]
                    + [f"profile{t:+g}" for t in PROFILE_MM] + ["box_r", "box_c", "box_k"])


def _refiner_classifier(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    # 20 trees x 127 leaves at 0.5: held-out Dice as 60 x 31 at 0.2 (0.8027 / 0.8023), refinement 0.53 s instead of
    # 0.76 s per case (median); 200 x 31 gained 0.0007 over 60 x 31 at three times the prediction time
    return HistGradientBoostingClassifier(max_iter=20, learning_rate=0.5, max_leaf_nodes=127, random_state=seed)


def _per_class(row: dict, n: int, phantom_share: tuple[int, int]) -> tuple[int, int]:
    """(samples per class, extra samples per class from the focus rows) of one training row.

    The phantoms are there so that DICOM-like T1 / STIR and planted lesions (Modic bands, edematous fractured
    bodies) are not out of distribution, not to set body borders: their normal anatomy is simpler than real
    anatomy: at 1/4 weight they cost real scans 4-5 points of Dice in cross-validation; 1/32 + 1/8 is the least
    that still keeps every planted finding of the sample (1/64 + 1/16 lost one). Augmented copies count half.
    """
    if row.get("source") == "phantom":
        return n // phantom_share[0], n // phantom_share[1]
    return (n // 2 if row.get("remap") else n), 0


def _fit_stage1(rows: list[dict], seed: int, phantom_share: tuple[int, int]):
    rng = np.random.default_rng(seed)
    parts = [stage1_samples(r, rng, *_per_class(r, 5000, phantom_share)) for r in rows]
    X, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return _classifier(seed).fit(X, y), int(y.size)


def train(rows: list[dict], seed: int = 0, phantom_share: tuple[int, int] = PHANTOM_SHARE,
          augment: tuple[str, ...] = (), refiner_folds: int = REFINER_FOLDS, jobs: int = 1) -> tuple[dict, int]:
    """Two-stage model plus the edge refiner. Stage 2 learns from stage-1 maps of cases stage 1 did not see (2-fold
    cross-fitting): trained on stage 1's in-sample maps, it would learn to trust them more than they deserve on new
    scans. ``augment``: intensity remaps (:func:`remap_intensity`) whose copies of the real cases join the training
    set. ``refiner_folds``: folds of the held-out segmentations the edge refiner learns from (:func:`train_refiner`;
    0: no refiner). ``jobs``: cases segmented in parallel for the refiner."""
    model, n = _train_stages(rows, seed, phantom_share, augment)
    if refiner_folds:
        model["refiner"], n_ref = train_refiner(rows, seed, phantom_share, augment, refiner_folds, jobs)
        model["refiner_features"] = REFINER_FEATURES
        n += n_ref
    return model, n


def _train_stages(rows: list[dict], seed: int, phantom_share: tuple[int, int], augment: tuple[str, ...]) -> tuple[dict, int]:
    rows = rows + [dict(r, case=f"{r['case']}~{kind}", remap=kind) for kind in augment for r in rows
                   if r.get("source") != "phantom"]
    stage1, n1 = _fit_stage1(rows, seed, phantom_share)
    rng = np.random.default_rng(seed + 1)
    # halves by case: an augmented copy ("<case>~<remap>") stays in its original's half
    base = [r["case"].split("~")[0] for r in rows]
    half_of = {c: h % 2 for h, c in enumerate(rng.permutation(sorted(set(base))))}
    halves = [[i for i, c in enumerate(base) if half_of[c] == h] for h in range(2)]
    Xs, ys = [], []
    for h in range(2):
        other, _ = _fit_stage1([rows[i] for i in halves[1 - h]], seed, phantom_share)
        for i in halves[h]:
            X, y = stage2_samples(rows[i], other, rng, *_per_class(rows[i], 6000, phantom_share))
            Xs.append(X)
            ys.append(y)
    y = np.concatenate(ys)
    stage2 = _classifier(seed).fit(np.concatenate(Xs), y)
    return {"stage1": stage1, "stage2": stage2, "stage1_features": STAGE1_FEATURES, "stage2_features": STAGE2_FEATURES,
            "trained_on": sorted(r["case"] for r in rows)}, n1 + int(y.size)


def _held_out_band_samples(args) -> tuple[np.ndarray, np.ndarray]:
    """Segment one real case with a body model that did not see it; band samples of that segmentation.
    ``unet_path``: a U-Net fold net gives the body probability (the classifier ``model`` still finds the column);
    None: the classifier ``model`` does."""
    row, model, seed, unet_path = args
    from .io import load_nifti

    img = load_nifti(row["image_path"])
    truth = load_nifti(row["labels_path"]).data
    box = common_box(truth.shape, img.data.shape)
    image = img.data[box]
    if unet_path:
        from .unet import use_network

        use_network(unet_path)
    cfg = SegmentationConfig(refine_edges=False, body_model="unet" if unet_path else "classifier")
    seg = segment_vertebrae(image, img.spacing, cfg, keep_below_s1=True, model=model)
    return band_samples(image, truth[box], seg.labels, seg.body_probability, img.spacing, np.random.default_rng(seed))


def _segment_held_out(held: list[tuple], jobs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`_held_out_band_samples` of every argument tuple, ``jobs`` cases in parallel."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if jobs <= 1:
        return [_held_out_band_samples(a) for a in held]
    # forkserver: a forked child can hang on the OpenMP state of the fitted classifiers
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("forkserver")) as ex:
        return list(ex.map(_held_out_band_samples, held))


def _fit_refiner(parts: list[tuple[np.ndarray, np.ndarray]], seed: int):
    """The edge refiner fitted on the band samples of all held-out cases. Returns (classifier, samples)."""
    X, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return _refiner_classifier(seed).fit(X, y), int(y.size)


def train_refiner(rows: list[dict], seed: int = 0, phantom_share: tuple[int, int] = PHANTOM_SHARE,
                  augment: tuple[str, ...] = (), k: int = REFINER_FOLDS, jobs: int = 1):
    """Edge refiner (:mod:`pipeline.edge_refiner`) learnt from held-out segmentations: the real cases in ``k`` folds
    (stratified by source), each fold segmented by stages trained without it (phantoms are in every fold's
    training set, so they give no held-out output and are not used here). Returns (classifier, samples)."""
    real = [r for r in rows if r.get("source") != "phantom"]
    phantoms = [r for r in rows if r.get("source") == "phantom"]
    folds = case_folds(real, k)
    parts = []
    for f in range(k):
        t = time.time()
        model, _ = _train_stages([r for r, g in zip(real, folds, strict=True) if g != f] + phantoms, seed,
                                 phantom_share, augment)
        held = [(r, model, seed * 1000 + i, None) for i, (r, g) in enumerate(zip(real, folds, strict=True)) if g == f]
        parts += _segment_held_out(held, jobs)
        print(f"refiner fold {f}: {len(held)} held-out cases segmented ({time.time() - t:.0f} s)", flush=True)
    return _fit_refiner(parts, seed)


def train_unet_refiner(rows: list[dict], nets: list[Path], model: dict, seed: int = 0, jobs: int = 1,
                       skip_fold: int | None = None, skip_source: str | None = None):
    """Edge refiner for the U-Net body model, learnt from its held-out output: fold ``f`` of the ``len(nets)``-fold
    case split (:func:`case_folds`) is segmented by ``nets[f]`` (``python -m pipeline.train_unet --fold f``), which
    did not see it. ``model``: the classifier whose stage 1 finds the column. ``skip_fold``: leave that fold's cases
    out (a refiner for evaluating that fold held out); ``skip_source``: the same for a source (leave-one-source-out).
    Returns (classifier, samples)."""
    real = [r for r in rows if r.get("source") != "phantom"]
    folds = case_folds(real, len(nets))
    held = [(r, model, seed * 1000 + i, str(nets[g])) for i, (r, g) in enumerate(zip(real, folds, strict=True))
            if g != skip_fold and r["source"] != skip_source]
    t = time.time()
    parts = _segment_held_out(held, jobs)
    print(f"U-Net refiner: {len(held)} held-out cases segmented ({time.time() - t:.0f} s)", flush=True)
    return _fit_refiner(parts, seed)


def _content_key(row: dict) -> str | None:
    """Hash of a row's image file (None without one): two rows with the same bytes are the same scan."""
    import hashlib

    path = row.get("image_path")
    if not path or not Path(path).is_file():
        return None
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def case_folds(rows: list[dict], k: int = 3) -> list[int]:
    """Fold of each row for k-fold cross-validation over cases, stratified by source (i-th case of a source -> i mod k).

    A row whose image file is byte-identical to an earlier row's goes to that row's fold (the shared data holds one
    scan twice, vb3-51 and vb3-53: in two folds, one held-out case was seen in training)."""
    seen: dict[str, int] = {}
    first_fold: dict[str, int] = {}
    folds = []
    for r in rows:
        key = _content_key(r)
        if key is not None and key in first_fold:
            folds.append(first_fold[key])
            continue
        folds.append(seen.get(r["source"], 0) % k)
        seen[r["source"]] = seen.get(r["source"], 0) + 1
        if key is not None:
            first_fold[key] = folds[-1]
    return folds


def check_source(rows: list[dict], source: str) -> None:
    """ValueError unless some case row is of ``source``: a mistyped ``--source`` would otherwise train on every
    case (or evaluate none)."""
    sources = sorted({r["source"] for r in rows})
    if source not in sources:
        raise ValueError(f"no case of source {source!r} (sources: {', '.join(sources)})")


def refuse_unknown_source(ap, rows: list[dict], source: str | None) -> None:
    """Usage error (exit 2) of the training commands for a ``--source`` no case has (:func:`check_source`), an empty
    ``--source ""`` included: it would train on every case (evaluate-segmentation refuses it the same way)."""
    if source is not None:
        try:
            check_source(rows, source)
        except ValueError as exc:
            ap.error(f"--source: {exc}")


def held_out(rows: list[dict], fold: int | None = None, source: str | None = None) -> list[bool]:
    """Per row: is it held out, as a case of fold ``fold`` of :func:`case_folds` or of source ``source``.

    Training commands leave these rows out (``--fold`` / ``--source``), evaluation keeps only them, so a model and
    its evaluation name the same split."""
    folds = case_folds(rows) if fold is not None else [None] * len(rows)
    return [(fold is not None and f == fold) or (source is not None and r["source"] == source)
            for r, f in zip(rows, folds, strict=True)]


def cross_validate(rows: list[dict], extra_rows: list[dict], scheme: str, jobs: int = 1,
                   phantom_share: tuple[int, int] = PHANTOM_SHARE, augment: tuple[str, ...] = (),
                   refiner_folds: int = REFINER_FOLDS) -> dict:
    """Train without each held-out group, segment the group with the full segmenter, score per-body Dice.

    ``scheme``: "loso" (hold out one source: unseen scanners and sequences) or "cases" (3 folds of cases,
    stratified by source: new patients from known sources, like the held-back cases of the issue).
    The edge refiner of each fold's model is trained inside the fold (nested: its held-out segmentations come from
    the fold's training cases only).
    """
    import tempfile

    import joblib

    from .evaluate import evaluate_rows

    if scheme == "loso":
        groups = {src: [r for r in rows if r["source"] == src] for src in sorted({r["source"] for r in rows})}
    else:
        folds = case_folds(rows)
        groups = {f"fold{k}": [r for r, f in zip(rows, folds, strict=True) if f == k] for k in range(3)}
    results, per_body = {}, []
    for name, held in groups.items():
        t = time.time()
        held_ids = {r["case"] for r in held}
        model, n = train([r for r in rows if r["case"] not in held_ids] + extra_rows, phantom_share=phantom_share,
                         augment=augment, refiner_folds=refiner_folds, jobs=jobs)
        with tempfile.TemporaryDirectory() as tmp:
            mp = Path(tmp) / "m.joblib"
            joblib.dump(model, mp)
            summary = evaluate_rows(held, Path(tmp) / "eval", model_path=mp, jobs=jobs, write_png=False,
                                    cfg=SegmentationConfig(body_model="classifier"))
            with open(Path(tmp) / "eval" / "per_body.csv", newline="") as fh:
                per_body += list(csv.DictReader(fh))
        results[name] = {"mean_body_dice": summary["mean_body_dice"], "per_source": summary["per_source"],
                         "missed_pct": summary["missed_pct"], "n_bodies": summary["n_annotated_bodies"],
                         "train_samples": n, "seconds": round(time.time() - t, 1)}
        print(name, results[name], flush=True)
    dice = np.array([float(b["dice"]) for b in per_body])
    results["all"] = {"mean_body_dice": round(float(dice.mean()), 4),
                      "per_source": {s: round(float(np.mean([float(b["dice"]) for b in per_body if b["source"] == s])), 4)
                                     for s in sorted({b["source"] for b in per_body})},
                      "missed_pct": round(100.0 * float(np.mean([b["detected"] != "True" for b in per_body])), 2),
                      "n_bodies": int(dice.size)}
    return results


def main(argv=None) -> int:
    import tempfile

    import joblib

    ap = argparse.ArgumentParser(prog="python -m pipeline.train_segmenter")
    ap.add_argument("cases_csv", nargs="?", default=str(DEFAULT_CASES))
    ap.add_argument("--cv", choices=["loso", "cases"], help="cross-validation estimate instead of training the model: "
                    "leave one source out, or 3 folds of cases stratified by source")
    ap.add_argument("--loso", action="store_true", help="same as --cv loso")
    ap.add_argument("--jobs", type=int, default=1, help="cases segmented in parallel (refiner training, --cv)")
    ap.add_argument("--refiner-folds", type=int, default=REFINER_FOLDS,
                    help="folds of held-out segmentations the edge refiner learns from (0: no refiner)")
    ap.add_argument("--out", default=str(MODEL_PATH))
    ap.add_argument("--phantoms", type=int, default=24, help="synthetic studies added to the training set (default 24)")
    ap.add_argument("--phantom-share", default=",".join(map(str, PHANTOM_SHARE)),
                    help="N,F: a phantom series gives 1/N of a real case's samples, plus 1/F from its rows from the "
                    "highest planted lesion down to S1 (default %(default)s)")
    ap.add_argument("--augment", default="", help="comma-separated intensity remaps added as training copies of the "
                    "real cases at half weight (invert, gamma<g>)")
    ap.add_argument("--unet-refiner", nargs="+", metavar="FOLD_NET",
                    help="instead of training the classifier: learn the U-Net's edge refiner from the held-out output "
                    "of these fold nets (fold 0, 1, ... of train_unet --fold) and store it in --out (an existing "
                    "classifier file, default the shipped one)")
    ap.add_argument("--skip-fold", type=int, default=None,
                    help="with --unet-refiner: leave this fold's cases out (a refiner for evaluating that fold)")
    ap.add_argument("--fold", type=int, help="train without the cases of this fold (0-2, as --cv cases and train_unet "
                    "--fold), for held-out evaluation with evaluate-segmentation --fold --model")
    ap.add_argument("--source", help="train without the cases of this source (leave-one-source-out; with "
                    "--unet-refiner the refiner leaves them out), for evaluate-segmentation --source --model")
    a = ap.parse_args(argv)
    if a.source is not None and (a.cv or a.loso):
        ap.error("--source trains without that source; --cv loso leaves out each source in turn")
    if a.fold is not None and (a.cv or a.loso or a.unet_refiner):
        ap.error("--fold trains a classifier without that fold; with --unet-refiner use --skip-fold")
    if a.unet_refiner and not Path(a.out).is_file():
        ap.error(f"--unet-refiner stores the refiner in an existing classifier file; {a.out} does not exist")
    rows = read_cases(Path(a.cases_csv))
    refuse_unknown_source(ap, rows, a.source)
    if a.unet_refiner:
        t = time.time()
        model = joblib.load(a.out)
        model["refiner_unet"], n = train_unet_refiner(rows, [Path(p) for p in a.unet_refiner], model,
                                                      jobs=a.jobs, skip_fold=a.skip_fold, skip_source=a.source)
        model["refiner_unet_nets"] = [Path(p).name for p in a.unet_refiner]
        joblib.dump(model, a.out, compress=3)
        print(f"U-Net edge refiner trained on {n} samples in {time.time() - t:.1f} s -> {a.out}")
        return 0
    if a.fold is not None or a.source is not None:
        rows = [r for r, out in zip(rows, held_out(rows, a.fold, a.source), strict=True) if not out]
    share = tuple(int(x) for x in a.phantom_share.split(","))
    ap_aug = tuple(k for k in a.augment.split(",") if k)
    ph_tmp = tempfile.TemporaryDirectory(prefix="modicscan-train-")
    ph_rows = phantom_rows(Path(ph_tmp.name), a.phantoms) if a.phantoms else []
    scheme = "loso" if a.loso else a.cv
    if scheme:
        print(json.dumps(cross_validate(rows, ph_rows, scheme, a.jobs, share, ap_aug, a.refiner_folds), indent=1))
        return 0
    t = time.time()
    model, n = train(rows + ph_rows, phantom_share=share, augment=ap_aug, refiner_folds=a.refiner_folds, jobs=a.jobs)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, a.out, compress=3)
    print(f"trained on {n} samples from {len(rows)} real cases and {len(ph_rows)} phantom series in {time.time() - t:.1f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

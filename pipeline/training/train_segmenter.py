"""Train the vertebral-body pixel classifier shipped in pipeline/segmentation/models/ (``python -m pipeline.training.train_segmenter``).

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

The edge refiner (:mod:`pipeline.segmentation.refine`) learns from held-out output: the real cases in 3 folds
(stratified by source), each fold segmented by stages trained without it (same recipe), 40 000 voxels of the
4 mm surface band per case. Training therefore fits the stages four times (~10 min on two cores, `--jobs 2`).

The U-Net has its own edge refiner, learnt the same way from the U-Net's held-out output: ``--unet-refiner
f0.onnx f1.onnx f2.onnx`` segments each fold's cases with the net trained without them (``python -m
pipeline.training.train_unet --fold K``) and stores the refiner as ``refiner_unet`` in the model file (~1 min on two cores).

``--cv cases`` / ``--cv loso`` print a cross-validation estimate instead: train without each held-out group,
segment its cases with the full pipeline segmenter, and score per-body Dice (pipeline.evaluation.segmentation).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import SegmentationConfig
from pipeline.evaluation.cases import (
    DEFAULT_CASES,
    case_folds,
    common_box,
    held_out,
    read_cases,
    refuse_unknown_source,
)
from pipeline.segmentation.features import (
    STAGE1_FEATURES,
    STAGE2_FEATURES,
)
from pipeline.segmentation.probability import MODEL_PATH
from pipeline.segmentation.refine import PROFILE_MM, band_samples
from pipeline.segmentation.segment import segment_vertebrae
from pipeline.training.samples import PHANTOM_SHARE, _per_class, phantom_rows, stage1_samples, stage2_samples

# Few deep trees: prediction time grows with the number of trees (one root-to-leaf walk each), barely with their
# depth. Held-out Dice (3-fold harness, refiner retrained) and median stage time per case:
# 120 trees x 31 leaves at 0.15: 0.7972, 1.66 s; 60 x 63 at 0.3: 0.7999, 1.45 s; 40 x 127 at 0.4: 0.7996, 1.18 s;
# 25 x 255 at 0.5: 0.8023, 1.13 s (with the sacrum samples, shipped: 0.7923; `--cv cases` 0.8037, was 0.7979).
TREES, LEAVES, LEARNING_RATE = 25, 255, 0.5


def _classifier(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=TREES, learning_rate=LEARNING_RATE, max_leaf_nodes=LEAVES,
                                          l2_regularization=1.0, random_state=seed)


REFINER_FOLDS = 3


REFINER_FEATURES = (["signed_dist", "p2", "i", "i_body", "s1_body", "grad_body", "grad_normal_body"]
                    + [f"profile{t:+g}" for t in PROFILE_MM] + ["box_r", "box_c", "box_k"])


def _refiner_classifier(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    # 20 trees x 127 leaves at 0.5: held-out Dice as 60 x 31 at 0.2 (0.8027 / 0.8023), refinement 0.53 s instead of
    # 0.76 s per case (median); 200 x 31 gained 0.0007 over 60 x 31 at three times the prediction time
    return HistGradientBoostingClassifier(max_iter=20, learning_rate=0.5, max_leaf_nodes=127, random_state=seed)


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
    from pipeline.io.nifti import load_nifti

    img = load_nifti(row["image_path"])
    truth = load_nifti(row["labels_path"]).data
    box = common_box(truth.shape, img.data.shape)
    image = img.data[box]
    if unet_path:
        from pipeline.segmentation.unet import use_network

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
    """Edge refiner (:mod:`pipeline.segmentation.refine`) learnt from held-out segmentations: the real cases in ``k`` folds
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
    case split (:func:`case_folds`) is segmented by ``nets[f]`` (``python -m pipeline.training.train_unet --fold f``), which
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

    from pipeline.evaluation.segmentation import evaluate_rows

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

    ap = argparse.ArgumentParser(prog="python -m pipeline.training.train_segmenter")
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

"""Train the vertebral-body pixel classifier shipped in pipeline/models/ (``python -m pipeline.train_segmenter``).

Training data: the expert-annotated real scans listed in ``../shared/data/vertebral-bodies/cases.csv``
(42 sagittal volumes from three public datasets; see that folder's README for sources and licences).
For every case the image is put on the segmenter's working grid, normalised, and a class-balanced sample
of voxels is drawn from the central sagittal slices: body voxels, and background voxels with extra weight
near the bodies (discs, canal, cortex), where the decisions are hard. Labels of bodies that are visible but
not annotated (e.g. T12, S1 in vb3) are unknown, so voxels far below/above the annotated range are not
used as negatives.

``--loso`` prints a leave-one-source-out estimate: train on two sources, segment every case of the third
with the full pipeline segmenter, and score per-body Dice (pipeline.evaluate).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from .segment import MODEL_PATH, features, normalise, to_work_grid

DEFAULT_CASES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "vertebral-bodies" / "cases.csv"


def read_cases(cases_csv: Path) -> list[dict]:
    with open(cases_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["source"] = r.get("source_set") or r["case"].split("-")[0]
        r["image_path"] = str(Path(cases_csv).parent / r["image"])
        r["labels_path"] = str(Path(cases_csv).parent / r["labels"])
    return rows


def case_samples(row: dict, rng: np.random.Generator, n_per_class: int = 6000):
    import nibabel as nib

    from .io import reorient_to_work

    img = nib.load(row["image_path"])
    data, _ = reorient_to_work(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    lab_img = nib.load(row["labels_path"])
    lab, aff = reorient_to_work(np.asarray(lab_img.dataobj), lab_img.affine)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    if lab.shape != data.shape:  # e.g. vb2-02 has one label slice more than image slices
        common = tuple(min(a, b) for a, b in zip(lab.shape, data.shape, strict=True))
        lab = lab[: common[0], : common[1], : common[2]]
        data = data[: common[0], : common[1], : common[2]]
    work, zoom = to_work_grid(data, spacing)
    labw = ndimage.zoom((lab > 0).astype(np.float32), (zoom[0], zoom[1], 1.0), order=1) > 0.5
    # central slab: slices holding annotated body
    ks = np.nonzero(labw.any(axis=(0, 1)))[0]
    kc = int(np.median(ks)) if ks.size else work.shape[2] // 2
    half = max(3, int(round(12.0 / spacing[2])))
    slab = slice(max(0, kc - half), min(work.shape[2], kc + half + 1))
    X = features(normalise(work))[:, :].reshape(work.shape + (-1,))[:, :, slab].reshape(-1, features_len())
    y = labw[:, :, slab].reshape(-1)
    rows_annot = np.nonzero(labw.any(axis=(1, 2)))[0]
    ii = np.broadcast_to(np.arange(work.shape[0])[:, None, None], labw[:, :, slab].shape).reshape(-1)
    near = ndimage.binary_dilation(labw, iterations=6)[:, :, slab].reshape(-1)
    # unknown territory: above / below the annotated bodies (unannotated vertebrae live there)
    known = (ii >= rows_annot.min() - 3) & (ii <= rows_annot.max() + 3) if rows_annot.size else np.ones_like(y)
    pos = np.flatnonzero(y)
    neg_near = np.flatnonzero(~y & near & known)
    neg_far = np.flatnonzero(~y & ~near & known)
    take = [rng.choice(pos, min(n_per_class, pos.size), replace=False),
            rng.choice(neg_near, min(n_per_class, neg_near.size), replace=False),
            rng.choice(neg_far, min(n_per_class, neg_far.size), replace=False)]
    idx = np.concatenate(take)
    return X[idx], y[idx]




def features_len() -> int:
    from .segment import FEATURE_NAMES

    return len(FEATURE_NAMES)


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
        d = io.discover(study / "DICOM")
        (st,) = d.studies.values()
        labels = nib.load(study / "truth" / "labels.nii.gz")
        for s in st.series.values():
            vol = io.load_series(s)
            img_path = study / f"{s.series_uid[-8:]}_image.nii.gz"
            io.save_nifti(vol.data, vol.affine, img_path)
            rows.append({"case": f"ph{seed}-{s.series_description}", "source": "phantom", "image_path": str(img_path),
                         "labels_path": str(study / "truth" / "labels.nii.gz")})
        del labels
    return rows


def train(rows: list[dict], seed: int = 0):
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(seed)
    Xs, ys = [], []
    for r in rows:
        X, y = case_samples(r, rng)
        Xs.append(X)
        ys.append(y)
    X, y = np.concatenate(Xs), np.concatenate(ys)
    clf = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.15, max_leaf_nodes=31, l2_regularization=1.0,
                                         random_state=seed)
    clf.fit(X, y)
    return clf, int(X.shape[0])


def main(argv=None) -> int:
    import joblib

    ap = argparse.ArgumentParser(prog="python -m pipeline.train_segmenter")
    ap.add_argument("cases_csv", nargs="?", default=str(DEFAULT_CASES))
    ap.add_argument("--loso", action="store_true", help="leave-one-source-out estimate instead of training the model")
    ap.add_argument("--out", default=str(MODEL_PATH))
    ap.add_argument("--phantoms", type=int, default=24, help="synthetic studies added to the training set (default 24)")
    a = ap.parse_args(argv)
    rows = read_cases(Path(a.cases_csv))
    import tempfile

    ph_tmp = tempfile.TemporaryDirectory(prefix="modicscan-train-")
    ph_rows = phantom_rows(Path(ph_tmp.name), a.phantoms) if a.phantoms else []
    if a.loso:
        import tempfile

        from .evaluate import evaluate_rows

        results = {}
        for held in sorted({r["source"] for r in rows}):
            t = time.time()
            clf, n = train([r for r in rows if r["source"] != held] + ph_rows)
            with tempfile.TemporaryDirectory() as tmp:
                mp = Path(tmp) / "m.joblib"
                joblib.dump(clf, mp)
                summary = evaluate_rows([r for r in rows if r["source"] == held], Path(tmp) / "eval", model_path=mp)
            results[held] = {"mean_body_dice": summary["mean_body_dice"], "missed_pct": summary["missed_pct"],
                             "n_bodies": summary["n_annotated_bodies"], "train_samples": n, "seconds": round(time.time() - t, 1)}
            print(held, results[held], flush=True)
        print(json.dumps(results, indent=1))
        return 0
    t = time.time()
    clf, n = train(rows + ph_rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(clf, a.out, compress=3)
    print(f"trained on {n} samples from {len(rows)} real cases and {len(ph_rows)} phantom series in {time.time() - t:.1f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

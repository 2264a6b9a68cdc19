"""Training samples for the body classifiers: class-balanced voxels of real cases and phantoms,
intensity remapping, the phantom training rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.evaluation.cases import load_case
from pipeline.segmentation.features import (
    STAGE1_MM,
    down2,
    stage1_features,
    stage2_candidates,
    stage2_features,
)
from pipeline.segmentation.grid import WORK_MM, normalise
from pipeline.segmentation.probability import stage1_probability


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
    n3 = down2(normalise(work))
    y = down2((lab > 0).astype(np.float32)) > 0.5
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

    from pipeline import phantom
    from pipeline.io.discovery import discover
    from pipeline.io.nifti import save_nifti
    from pipeline.io.volumes import load_series

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
        d = discover(study / "DICOM")
        (st,) = d.studies.values()
        labels = nib.load(study / "truth" / "labels.nii.gz")
        for s in st.series.values():
            vol = load_series(s)
            img_path = study / f"{s.series_uid[-8:]}_image.nii.gz"
            save_nifti(vol.data, vol.affine, img_path)
            rows.append({"case": f"ph{seed}-{s.series_description}", "source": "phantom", "image_path": str(img_path),
                         "labels_path": str(study / "truth" / "labels.nii.gz"), "focus": focus,
                         "known_below_mm": SACRUM_KNOWN_MM})
        del labels
    return rows


# A phantom's truth is complete: under its S1 lies sacrum, never body. Its first SACRUM_KNOWN_MM are background
# samples (and focus rows): the real scans never annotate below S1, and a sacral segment taken for a body
# renames every level above it (seen on the sample's seed 2 with a retrained model: S2 called S1, L1 called T12).
SACRUM_KNOWN_MM = 45.0


PHANTOM_SHARE = (32, 8)  # a phantom series gives 1/32 of a real case's samples per class, plus 1/8 from its focus rows


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

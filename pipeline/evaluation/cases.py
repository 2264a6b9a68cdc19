"""The annotated real cases (``cases.csv`` of ../shared/data/vertebral-bodies): reading, loading into
the working frame, case folds and held-out selections shared by evaluation and training."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.segmentation.grid import WORK_MM, to_work_grid

DEFAULT_CASES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "vertebral-bodies" / "cases.csv"


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

    from pipeline.io.nifti import reorient_to_work

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
    return work, labels_to_work(lab, work.shape, zoom), (WORK_MM, WORK_MM, float(spacing[2]))


def labels_to_work(lab: np.ndarray, work_shape, zoom) -> np.ndarray:
    """Labels (or a mask) of an input grid on the working grid that :func:`to_work_grid` made with ``zoom``
    (nearest: each working pixel takes the input pixel its centre falls in)."""
    ii = np.minimum((np.arange(work_shape[0]) + 0.5) / zoom[0], lab.shape[0] - 1).astype(int)
    jj = np.minimum((np.arange(work_shape[1]) + 0.5) / zoom[1], lab.shape[1] - 1).astype(int)
    return lab[ii][:, jj]


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


def common_box(shape_a, shape_b) -> tuple[slice, ...]:
    """Index of the grid an image and its label file share: a few label files (vb2-02) have one slice more than
    their image."""
    return tuple(slice(0, min(a, b)) for a, b in zip(shape_a, shape_b, strict=True))

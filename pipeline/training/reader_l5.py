"""L5 training slices from a reader's L5 on single-slice scans without body masks (the SPIDER slices of
``../shared/data/modic-spider``, read in ``docs/spider_l5_reading.csv``): the one-pass net's L5 output
(``train_unet --onepass --l5-cases CASES.csv --l5-reading READING.csv``).

Why: the annotated volumes show S1 whole on 9 scans only (vb2). On SPIDER's mid-sagittal slices S1 sits above a
small remnant S1-S2 disc, and a net that never saw that called S1 "L5" (spider-016: P(L5) 0.78 on S1). A reader
who saw the whole slice says where L5 is; nothing else on these slices is annotated.

Each case is segmented with the cascade and its float nets, whatever the default (T2, the T1 resampled onto it:
:func:`pipeline.evaluation.levels.load_case_images`, as ``segment_case``, but keeping the body-sized pieces below S1: where our names are
wrong, the reader's L5 may be one of them); the component whose centroid row lies nearest the reader's L5 row,
within ``levels.L5_TOLERANCE_MM``, is the L5 target; every other pixel of the slice is "not L5". The body output
is unknown on these slices (its mask is all False): the cascade's outlines are not truth. A case whose reading no
component matches, or that does not segment, is left out (the training prints which).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.arrays import label_counts_and_centroids
from pipeline.config import SegmentationConfig
from pipeline.evaluation.cases import labels_to_work
from pipeline.evaluation.levels import L5_TOLERANCE_MM, load_case_images, read_reading
from pipeline.segmentation.grid import normalise, to_work_grid
from pipeline.segmentation.unet import context_stack


def read_l5_rows(cases_csv: Path, reading_csv: Path) -> list[dict]:
    """The rows of a SPIDER-style ``cases.csv`` (``case,patient,t1,t2``) that ``reading_csv`` reads, each with
    ``root`` (the CSV's folder) and ``l5_row_mm``."""
    read = read_reading(Path(reading_csv))
    with open(cases_csv, newline="") as fh:
        rows = [dict(r, root=str(Path(cases_csv).parent), l5_row_mm=read[r["case"]])
                for r in csv.DictReader(fh) if r["case"] in read]
    return rows


def reader_l5_mask(labels: np.ndarray, row_mm: np.ndarray | float, spacing) -> np.ndarray | None:
    """The component of ``labels`` (input grid, (I, P, R)) whose centroid row lies nearest ``row_mm`` (mm from the
    top), within ``L5_TOLERANCE_MM``; None when none does."""
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        return None
    _, cents = label_counts_and_centroids(labels, ids)
    off = np.abs(cents[:, 0] * float(spacing[0]) - float(row_mm))
    best = int(np.argmin(off))
    return labels == ids[best] if off[best] <= L5_TOLERANCE_MM else None


def reader_case_slices(row: dict, cfg: SegmentationConfig | None = None) -> list[tuple]:
    """Training slices of one read case, in :func:`pipeline.training.train_unet.case_slices`'s form: (input
    (3, H, W), body (H, W) all False, known (H, W) all False, L5 (H, W), True); [] when no component matches the
    reading or the slice does not segment."""
    from pipeline.errors import StudyError
    from pipeline.segmentation.segment import segment_vertebrae

    t2, extra = load_case_images(row, Path(row["root"]))
    try:
        # the cascade's float nets, whatever the package default: the one-pass net must not learn from itself
        # (segmentation.body_model auto would pick it on these single slices), nor from an int8 copy
        seg = segment_vertebrae(t2.data, t2.spacing, cfg or SegmentationConfig(body_model="unet", int8=False),
                                extra_images=extra, keep_below_s1=True)
    except StudyError:  # e.g. no body found: a case to leave out, not a reason to stop a training
        return []
    l5 = reader_l5_mask(seg.labels, row["l5_row_mm"], t2.spacing)
    if l5 is None:
        return []
    work, zoom = to_work_grid(t2.data, t2.spacing)
    l5 = labels_to_work(l5, work.shape, zoom)
    k = work.shape[2] // 2  # the middle slice: these studies are one slice (context_stack repeats it)
    x = context_stack(normalise(work), float(t2.spacing[2]), np.array([k]))[0]
    empty = np.zeros(work.shape[:2], bool)
    return [(x, empty, empty, np.ascontiguousarray(l5[:, :, k]), True)]


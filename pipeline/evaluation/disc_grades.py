"""Which level alignment do the readers' disc grades support? A check of level names that uses expert gradings.

SPIDER's radiologists graded every disc (``gradings.csv``: ``case, ivd, pfirrmann, ...``; ivd 1 = L5-S1, counted
up). Pfirrmann's grade (1-5) is read mainly from the disc's T2 signal: a degenerated disc is dark. So along one
spine, the T2 signal of the discs between our bodies should fall where the grade rises, and it does so best when
our discs are numbered like the readers': with our L5 on the real L5. Numbered one disc off, the profile is
compared with the neighbours' grades, and the fit gets worse (the grades vary along the spine, often a single
dark disc at L4-L5 or L5-S1).

Per case, the Pearson correlation between the discs' T2 ratio (gap median over the two bodies' marrow median, on
the slice where both bodies are largest) and the grade is taken at offsets -1, 0, +1 (our disc numbered ``ivd``
compared with the readers' ``ivd + offset``); the offset with the most negative correlation is the alignment the
grades support. A weak check on its own (a spine whose discs all look alike supports nothing), but one that rests
on expert gradings, not on a developer's reading.
"""

from __future__ import annotations

import numpy as np

from pipeline.arrays import gap_between

OFFSETS = (-1, 0, 1)
MIN_DISCS = 4  # pairs (disc signal, grade) needed for a correlation at an offset
GRADE_OUTCOMES = ("agrees", "one_off", "not_gradable")


def disc_t2_ratios(labels: np.ndarray, image: np.ndarray, values: list[int]) -> np.ndarray:
    """Per pair of consecutive bodies (``values``: their label values, top -> bottom): median of ``image`` in the gap
    between them over the columns both cover, divided by the median of the two bodies, on the slice where the pair
    has most voxels; NaN where the two bodies share fewer than three columns or leave no gap. (H, W, K) arrays."""
    out = np.full(max(len(values) - 1, 0), np.nan)
    for n in range(len(values) - 1):  # loop over <= ~10 pairs
        pair = (labels == values[n]) | (labels == values[n + 1])
        k = int(np.argmax(pair.sum(axis=(0, 1))))
        above, below = labels[:, :, k] == values[n], labels[:, :, k] == values[n + 1]
        gap = gap_between(above, below)
        if gap is None:
            continue
        cols, between = gap
        marrow = float(np.median(np.r_[image[:, :, k][above], image[:, :, k][below]]))
        if marrow <= 0:
            continue
        out[n] = float(np.median(image[:, cols, k][between])) / marrow
    return out


def grade_correlations(ratios: np.ndarray, l5_index: int, grades: dict[int, int]) -> dict[int, float]:
    """Correlation of the disc ratios with the grades at each offset of :data:`OFFSETS` (those with at least
    ``MIN_DISCS`` pairs and some spread on both sides). ``l5_index``: position of the body taken for L5 in the
    top -> bottom order the ratios follow (disc ``j`` lies under body ``j``, so its ivd is ``l5_index - j + 1``)."""
    out = {}
    for off in OFFSETS:
        pairs = [(r, grades[l5_index - j + 1 + off]) for j, r in enumerate(ratios)
                 if np.isfinite(r) and (l5_index - j + 1 + off) in grades]
        if len(pairs) < MIN_DISCS:
            continue
        x, y = np.asarray(pairs, float).T
        if x.std() > 0 and y.std() > 0:
            out[off] = float(np.corrcoef(x, y)[0, 1])
    return out


def grade_outcome(correlations: dict[int, float]) -> str:
    """``agrees`` when offset 0 fits the grades best (most negative correlation: dark discs, high grades),
    ``one_off`` when a neighbouring numbering fits better, ``not_gradable`` without a correlation at offset 0
    and at least one neighbour."""
    if 0 not in correlations or len(correlations) < 2:
        return "not_gradable"
    return "agrees" if min(correlations, key=correlations.get) == 0 else "one_off"

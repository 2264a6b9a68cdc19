"""Calibrate the voxel edema rule's thresholds on real readers' masks by leave-one-patient-out cross-validation
(``python -m pipeline.training.calibrate_edema ../shared/data/edema-sij/cases.csv``).

The reference (histogram mode, shading scale) and the smoothing stay as configured; the search is over the
hysteresis thresholds (``grow_ratio``, ``seed_ratio``), the T1 ceiling and the minimum volume, scored as the mean
over patients of the mean Dice against that patient's reader masks (the figure ``evaluate-edema`` reports). Each
rule of the grid is evaluated from one labelling of the grow mask per (case, T1 ceiling, grow ratio): hysteresis
keeps a grow component iff its maximum exceeds the seed ratio, and the size test drops whole components, so
per-component sizes, maxima and reader overlaps give every (seed, size) pair's Dice without relabelling.

Prints JSON: the configured rule's score, the best rule on all patients (in-sample) and, per held-out patient, the
rule chosen on the others and its Dice there (the cross-validated figure). One case = one patient in edema-sij.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.classify import edema_mask
from pipeline.config import EdemaConfig, load_config
from pipeline.evaluation.edema import READER_PREFIX, on_stir_grid, read_edema_cases
from pipeline.io.nifti import read_nifti_native

GROW = (1.4, 1.5, 1.6, 1.7, 1.8)
SEED = (1.8, 2.0, 2.2, 2.4, 2.7, 3.0)
T1_MAX = (1.2, 1.3, 1.5, 10.0)
MIN_MM3 = (0.0, 10.0, 25.0, 50.0)


def calibrate(cases_csv: Path, base: EdemaConfig) -> dict:
    records, readers = read_edema_cases(cases_csv)
    names, table = [], []
    for rec in records:
        masks_paths = [rec[READER_PREFIX + r] for r in readers if rec.get(READER_PREFIX + r)]
        if not masks_paths:
            continue
        stir = read_nifti_native(rec["stir"])
        region = on_stir_grid(rec["bone_region"], stir, 0) > 0.5
        t1 = on_stir_grid(rec["t1"], stir, 1)
        masks = [on_stir_grid(p, stir, 0) > 0.5 for p in masks_paths]
        scores = rule_scores(edema_mask(stir.data, region, stir.spacing, base, t1=t1), masks, stir.spacing)
        names.append(rec["case"])
        table.append(scores)
        print(f"{rec['case']}: {len(scores)} rules scored", file=sys.stderr)
    if not names:
        raise ValueError(f"{cases_csv}: no case has reader masks")
    keys = sorted(table[0])
    grid = np.array([[t[k] for k in keys] for t in table])  # cases x rules
    best = int(np.argmax(grid.mean(axis=0)))
    current = (base.grow_ratio, base.seed_ratio, base.t1_max_ratio, base.min_volume_mm3)
    folds = []
    for i, name in enumerate(names):
        others = [j for j in range(len(names)) if j != i]
        b = int(np.argmax(grid[others].mean(axis=0)))
        folds.append({"held_out": name, "chosen": dict(zip(("grow_ratio", "seed_ratio", "t1_max_ratio", "min_volume_mm3"),
                                                           keys[b], strict=True)),
                      "train_dice": round(float(grid[others, b].mean()), 4), "held_out_dice": round(float(grid[i, b]), 4)})
    return {
        "cases": names,
        "configured_rule": {"rule": current, "mean_dice": _score_of(grid, keys, current), "per_case": _per_case(grid, keys, current)},
        "best_in_sample": {"rule": keys[best], "mean_dice": round(float(grid[:, best].mean()), 4),
                           "per_case": [round(float(x), 4) for x in grid[:, best]]},
        "leave_one_patient_out": {"mean_dice": round(float(np.mean([f["held_out_dice"] for f in folds])), 4),
                                  "folds": folds},
    }


def rule_scores(res, masks: list[np.ndarray], spacing) -> dict[tuple, float]:
    """(grow, seed, t1_max, min_mm3) -> mean Dice against ``masks`` of one case, from one run of the rule (its STIR
    ratio before the T1 ceiling, and its T1 ratio)."""
    voxel_mm3 = float(np.prod(spacing))
    truth_sum = np.array([m.sum() for m in masks], dtype=np.float64)
    out: dict[tuple, float] = {}
    for t1_max, grow in itertools.product(T1_MAX, GROW):
        candidate = res.ratio if res.t1_ratio is None else np.where(res.t1_ratio > t1_max, 0.0, res.ratio)
        labels, n = ndimage.label(candidate > grow)
        size = np.bincount(labels.ravel(), minlength=n + 1)
        peak = np.zeros(n + 1)
        if n:
            peak[1:] = ndimage.maximum(candidate, labels, np.arange(1, n + 1))
        overlap = np.stack([np.bincount(labels[m], minlength=n + 1) for m in masks])
        size[0], overlap[:, 0] = 0, 0
        for seed, min_mm3 in itertools.product(SEED, MIN_MM3):
            if seed < grow:
                continue
            keep = (peak > seed) & (size * voxel_mm3 >= min_mm3)
            pred = size[keep].sum()
            inter = overlap[:, keep].sum(axis=1)
            d = np.where(pred + truth_sum > 0, 2 * inter / np.maximum(pred + truth_sum, 1), 1.0)
            out[(grow, seed, t1_max, min_mm3)] = float(d.mean())
    return out


def _score_of(grid, keys, rule) -> float | None:
    return round(float(grid[:, keys.index(rule)].mean()), 4) if rule in keys else None


def _per_case(grid, keys, rule) -> list[float] | None:
    return [round(float(x), 4) for x in grid[:, keys.index(rule)]] if rule in keys else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases_csv", type=Path)
    ap.add_argument("--config", default=None, help="YAML config whose edema section gives the fixed parts")
    args = ap.parse_args(argv)
    base = load_config(args.config).edema
    try:
        result = calibrate(args.cases_csv, base)
    except ValueError as exc:
        ap.error(str(exc))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

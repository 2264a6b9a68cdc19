"""Segmentation steps on small synthetic inputs, the metrics, and a Dice floor on real scans."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import SegmentationConfig
from pipeline.evaluate import hd95, per_body_scores
from pipeline.segment import (
    complete_heights,
    label_counts_and_centroids,
    label_levels,
    normalise,
    predict_on_lattice,
    smooth_bodies,
    spine_region,
    split_instances,
    split_merged,
    to_work_grid,
)


def _stack(heights=(20,) * 6, gap=8, width=30, depth=5, start=5):
    """Boxes stacked along axis 0 with gaps: a toy spine at 1 mm (label image, ids top -> bottom)."""
    total = start + sum(heights) + gap * len(heights) + 10
    lab = np.zeros((total, width + 10, depth + 2), np.int32)
    r = start
    for i, h in enumerate(heights, start=1):
        lab[r:r + h, 5:5 + width, 1:1 + depth] = i
        r += h + gap
    return lab


def test_split_instances_separates_boxes_touching_through_a_thin_bridge():
    lab = _stack(gap=4)
    mask = lab > 0
    # a thin bridge (2 mm) joins body 2 and 3 through the disc
    rows2 = np.nonzero((lab == 2).any(axis=(1, 2)))[0]
    mask[rows2[-1] + 1: rows2[-1] + 5, 18:20, :] = True
    out = split_instances(mask, (1.0, 1.0, 1.0), min_voxels=100)
    assert len(np.unique(out[out > 0])) == 6


def test_split_merged_cuts_an_oversized_component_at_its_waist():
    lab = _stack()
    r2 = np.nonzero((lab == 2).any(axis=(1, 2)))[0]
    r3 = np.nonzero((lab == 3).any(axis=(1, 2)))[0]
    lab[r2[-1] + 1: r3[0], 12:28, :] = 2  # a narrow disc bridge: 2 and 3 one component
    lab[lab == 3] = 2
    out = split_merged(lab.copy())
    pieces = np.unique(out[(lab == 2)])
    assert len(pieces) == 2
    # the cut lies inside the former disc (the waist), not through a body
    cut_rows = [np.nonzero((out == p).any(axis=(1, 2)))[0] for p in pieces]
    boundary = min(r[-1] for r in cut_rows)
    assert r2[-1] - 1 <= boundary <= r3[0] + 1


def test_complete_heights_restores_a_body_short_at_one_endplate():
    lab = _stack()
    r3 = np.nonzero((lab == 3).any(axis=(1, 2)))[0]
    lab[r3[-1] - 7: r3[-1] + 1][lab[r3[-1] - 7: r3[-1] + 1] == 3] = 0  # 8 mm of body 3 missing at its bottom
    out = complete_heights(lab, np.arange(1, 7), (1.0, 1.0, 1.0), max_mm=10.0)
    rows = np.nonzero((out == 3).any(axis=(1, 2)))[0]
    assert rows[-1] >= r3[-1] - 2  # grown back to (nearly) its original bottom
    assert (out[lab == 4] == 4).all()  # the neighbour untouched


def test_levels_counted_up_from_the_sacrum():
    cfg = SegmentationConfig()
    cents = np.array([20.0, 55, 90, 125, 160, 195, 230])  # T12 .. S1, 35 mm apart
    vols = np.array([25.0, 28, 30, 32, 33, 34, 28])
    names, conf, flags, _ = label_levels(cents, np.zeros(7), vols, cfg, others_mm=np.array([255.0]))
    assert names == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"] and conf >= 0.7 and not flags
    # with small sacral pieces listed as bodies too
    cents2 = np.r_[cents, 250.0, 262.0]
    vols2 = np.r_[vols, 8.0, 6.0]
    names2, _, _, _ = label_levels(cents2, np.zeros(9), vols2, cfg)
    assert names2[:7] == names and names2[7:] == ["", ""]
    # no sacrum below the last body: no level names, low confidence, flagged
    names3, conf3, flags3, _ = label_levels(cents, np.zeros(7), vols, cfg, others_mm=np.array([]))
    assert names3[0] == "B1" and conf3 < 0.5 and "NO_SACRUM_FOUND" in flags3


class _FirstFeature:
    """A stand-in classifier: P(body) is the first feature; counts how many voxels it was asked about."""

    def __init__(self):
        self.asked = 0

    def predict_proba(self, X):
        self.asked += len(X)
        p = np.clip(X[:, 0], 0, 1)
        return np.stack([1 - p, p], axis=1)


def test_lattice_prediction_matches_dense_and_skips_unanimous_cells():
    lab = _stack()
    truth = (lab > 0).astype(np.float32)
    X = truth.reshape(-1, 1)
    cand = np.ones(truth.shape, bool)
    model = _FirstFeature()
    prob = predict_on_lattice(model, X, truth.shape, cand, step=2)
    # exact on a piecewise-constant map: borders are classified densely, flat cells interpolated
    assert np.array_equal(prob > 0.5, truth > 0.5)
    assert model.asked < 0.6 * truth.size
    # voxels outside the candidates are never classified and stay 0
    cand[:, :10] = False
    prob2 = predict_on_lattice(_FirstFeature(), X, truth.shape, cand, step=2)
    assert prob2[:, :10].max() == 0 and np.array_equal(prob2[:, 10:] > 0.5, truth[:, 10:] > 0.5)


def test_spine_region_follows_a_tilted_column_and_drops_far_columns():
    lab = _stack(width=12, depth=3)
    prob = np.zeros((lab.shape[0], 120, lab.shape[2]), np.float32)
    rows = np.arange(lab.shape[0])
    for r in rows:  # the column drifts 0.3 px per row towards posterior
        shift = int(0.3 * r)
        prob[r, 10 + shift: 10 + shift + lab.shape[1], :] = lab[r] > 0
    region = spine_region(prob, (1.0, 1.0, 4.0), prob.shape, (1.0, 1.0, 4.0), half_width_mm=15.0)  # bodies ~3 ml
    assert region is not None and region.shape == prob.shape
    assert region[prob > 0.5].all()  # every body voxel is inside
    assert not region[:, 100:].any()  # far anterior / posterior columns are outside
    assert spine_region(np.zeros_like(prob), (1, 1, 1), prob.shape, (1, 1, 1), 15.0) is None  # nothing to fit


def test_label_counts_and_centroids_match_scipy():
    from scipy import ndimage

    lab = _stack()
    lab[0, :5] = -3  # foreign label images may hold negative values: they belong to no label
    ids = [2, 4, 6]
    counts, cents = label_counts_and_centroids(lab, ids)
    ones = np.ones(lab.shape)
    assert np.allclose(counts, ndimage.sum_labels(ones, lab, ids))
    assert np.allclose(cents, ndimage.center_of_mass(ones, lab, ids))


def test_normalise_is_blind_to_scanner_scale_and_maps_foreground_to_unit_range():
    rng = np.random.default_rng(0)
    img = np.zeros((60, 60, 5), np.float32)
    img[10:50, 10:50] = rng.normal(300, 20, (40, 40, 5))  # tissue
    img[20:30, 20:30] = 900  # a bright structure
    a = normalise(img)
    b = normalise(img * 7.5)  # another scanner's units
    assert np.allclose(a, b, atol=1e-5)
    assert a[0, 0, 0] < 0 and 0.0 <= np.median(a[10:50, 10:50]) <= 1.0 and a[25, 25, 0] >= 1.0
    assert not normalise(np.zeros_like(img)).any()  # empty image: no foreground, all zero


def test_to_work_grid_resamples_in_plane_only():
    img = np.arange(100 * 80 * 4, dtype=np.float32).reshape(100, 80, 4)
    out, zoom = to_work_grid(img, (0.75, 0.5, 4.0))
    assert zoom == (0.5, 1 / 3) and out.shape == (50, 27, 4)
    same, z1 = to_work_grid(img, (1.5, 1.5, 3.0))
    assert same.shape == img.shape and z1 == (1.0, 1.0) and np.array_equal(same, img)


def test_slice_chunks_give_the_same_probability_as_one_pass(monkeypatch):
    from scipy import ndimage

    from pipeline import segment

    rng = np.random.default_rng(3)
    img = ndimage.gaussian_filter(rng.normal(100, 40, (90, 80, 19)), (3, 3, 1)).astype(np.float32)
    img[30:60, 20:50, 4:15] += 80  # something body-sized and bright
    monkeypatch.setattr(segment, "SLICES_PER_CHUNK", 1000)
    whole, _, _ = segment.body_probability(img, (1.5, 1.5, 3.0))
    monkeypatch.setattr(segment, "SLICES_PER_CHUNK", 4)
    chunked, _, _ = segment.body_probability(img, (1.5, 1.5, 3.0))
    assert whole.max() > 0.5 and np.array_equal(whole, chunked)


def test_smooth_bodies_fills_holes_and_notches_but_never_takes_a_neighbour():
    lab = _stack(heights=(20, 20, 20), gap=2)
    clean = lab.copy()
    rows1 = np.nonzero((lab == 1).any(axis=(1, 2)))[0]
    rows2 = np.nonzero((lab == 2).any(axis=(1, 2)))[0]
    lab[rows1[5]:rows1[10], 15:20, :][lab[rows1[5]:rows1[10], 15:20, :] == 1] = 0  # a hole inside body 1
    lab[rows2[0]:rows2[0] + 8, 20:22, :] = 0  # a 2 mm notch cut into body 2 from its top
    out = smooth_bodies(lab, np.array([1, 2, 3]), (1.0, 1.0, 1.0), radius_mm=3.0)
    assert np.array_equal(out == 1, clean == 1)  # the hole is filled exactly
    cut = (clean == 2) & (lab != 2)
    assert not ((out == 2) & (clean != 2)).any()  # nothing grows outside the true body
    assert ((out == 2) & cut).sum() >= 0.75 * cut.sum()  # the notch is (nearly all) closed
    # the 2 mm discs stay background: closing does not bridge one body into the next
    assert not out[rows1[-1] + 1: rows2[0]].any()
    assert np.array_equal(smooth_bodies(clean, np.array([1, 2, 3]), (1.0, 1.0, 1.0), 3.0), clean)


def test_per_body_dice_matches_hand_computation():
    truth = np.zeros((10, 10, 1), np.int32)
    pred = np.zeros_like(truth)
    truth[0:4, 0:4] = 1  # 16 voxels
    truth[6:10, 6:10] = 2  # 16 voxels, missed
    pred[0:4, 1:5] = 7  # 16 voxels, overlap 12 with body 1
    pred[6:8, 0:2] = 9  # an extra body
    rows, extra = per_body_scores(truth, pred, (1.0, 1.0, 1.0))
    assert rows[0]["dice"] == pytest.approx(2 * 12 / 32) and rows[0]["pred_label"] == 7
    assert rows[1]["dice"] == 0.0 and not rows[1]["detected"]
    assert extra == 1


def test_hd95_of_shifted_cubes_is_the_shift():
    a = np.zeros((30, 30, 30), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 3, axis=0)
    assert hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0, abs=0.01)
    assert hd95(a, np.zeros_like(a), (1, 1, 1)) is None


def test_real_scans_one_per_source_reach_a_dice_floor(vertebral_bodies_dir, tmp_path):
    from pipeline.evaluate import evaluate_rows
    from pipeline.train_segmenter import read_cases

    rows = [r for r in read_cases(vertebral_bodies_dir / "cases.csv") if r["case"] in ("vb1-15", "vb2-05", "vb3-09")]
    assert len(rows) == 3
    summary = evaluate_rows(rows, tmp_path, write_png=False)
    assert summary["n_annotated_bodies"] == 19
    assert summary["mean_body_dice"] >= DICE_FLOOR, summary
    assert (tmp_path / "per_body.csv").read_text().count("\n") == 1 + 19


# A regression floor for these three cases (0.54 measured on 2026-11-25), not the project target (0.92).
DICE_FLOOR = 0.45

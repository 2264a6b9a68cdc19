"""Segmentation steps on small synthetic inputs, the metrics, and a Dice floor on real scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipeline.arrays import label_counts_and_centroids
from pipeline.config import SegmentationConfig
from pipeline.evaluation.segmentation import expected_levels, hd95, level_outcome, per_body_scores
from pipeline.segmentation.bodies import complete_heights, hull_bodies, smooth_bodies
from pipeline.segmentation.column import drop_shallow_cuts, spine_curve, split_column
from pipeline.segmentation.features import stage2_features
from pipeline.segmentation.grid import classified_slices, normalise, to_work_grid
from pipeline.segmentation.probability import stage1_probability


def _stack(heights=(20,) * 6, gap=8, width=30, depth=5, start=5):
    """Boxes stacked along axis 0 with gaps: a toy spine at 1 mm (label image, ids top -> bottom)."""
    total = start + sum(heights) + gap * len(heights) + 10
    lab = np.zeros((total, width + 10, depth + 2), np.int32)
    r = start
    for i, h in enumerate(heights, start=1):
        lab[r:r + h, 5:5 + width, 1:1 + depth] = i
        r += h + gap
    return lab


def _column_prob(heights=(20,) * 6, gap=6, drift=0.25, width=30, depth=5, cols=140):
    """A toy spine drawn as a probability map: boxes along a column that drifts ``drift`` px per row
    (lordosis-like tilt), 0.9 inside the bodies, 0.6 in a bridge through every disc (a pixel classifier that
    does not see thin discs), plus a large false blob far off the column (bowel)."""
    lab = _stack(heights, gap, width, depth)
    prob = np.zeros((lab.shape[0], cols, lab.shape[2]), np.float32)
    truth = np.zeros(prob.shape, np.int32)
    for r in range(lab.shape[0]):
        c0 = 10 + int(drift * r)
        truth[r, c0: c0 + lab.shape[1]] = lab[r]
    prob[truth > 0] = 0.9
    for i in range(1, len(heights)):  # bridge through each disc: the mask is one component
        rows = np.nonzero((truth == i).any(axis=(1, 2)))[0]
        bridge_rows = slice(rows[-1] + 1, rows[-1] + 1 + gap)
        c = int(np.median(np.nonzero((truth == i).any(axis=(0, 2)))[0]))
        prob[bridge_rows, c - 4: c + 4, 1:-1] = 0.6
    prob[20:60, cols - 25: cols - 5, :] = 0.95  # a false blob 80+ mm off the column
    return prob, truth


def test_spine_curve_follows_a_tilted_column_merged_into_one_component_and_ignores_a_far_blob():
    prob, truth = _column_prob()
    coef = spine_curve(prob > 0.5, (1.0, 1.0, 1.0))
    assert coef is not None
    rows = np.arange(10, truth.shape[0] - 20, 7)
    centre = [np.nonzero(truth[r].any(axis=1))[0].mean() for r in rows if truth[r].any()]
    fitted = np.polyval(coef, [r for r in rows if truth[r].any()])
    assert np.abs(np.asarray(centre) - fitted).max() < 4.0  # on the column, within 4 mm
    assert spine_curve(np.zeros_like(prob, dtype=bool), (1.0, 1.0, 1.0)) is None


def test_split_column_separates_bodies_bridged_through_their_discs_and_drops_off_column_tissue():
    prob, truth = _column_prob()
    out, column = split_column(prob, (1.0, 1.0, 1.0), threshold=0.5, min_gap_mm=15.0)
    ids = np.unique(out[out > 0])
    assert column is not None
    assert ids.size == 6  # one instance per body although the mask is a single component
    rows, extra = per_body_scores(truth, out, (1.0, 1.0, 1.0))
    assert extra == 0 and min(r["dice"] for r in rows) > 0.9  # the far blob is gone, bodies intact
    tops = [np.nonzero((out == i).any(axis=(1, 2)))[0].min() for i in ids]
    assert tops == sorted(tops)  # numbered top -> bottom
    empty, no_column = split_column(np.zeros_like(prob), (1.0, 1.0, 1.0))
    assert not empty.any() and no_column is None


def test_shallow_cut_inside_a_body_is_dropped_but_shallow_discs_between_whole_bodies_are_kept():
    # a body every 30 bins (peak 100), discs empty the profile; body 3 has a dip to 50 in its middle, and the
    # disc below body 5 only falls to 40 (a tilted disc) but has a whole body on either side
    x = np.arange(200)
    profile = 100.0 * np.clip(np.abs(np.sin(np.pi * x / 30.0)) * 3.0, 0.0, 1.0)
    profile[74:77] = 50.0
    profile[149:152] = np.maximum(profile[149:152], 40.0)
    minima = np.array([30, 60, 75, 90, 120, 150, 180])
    kept = drop_shallow_cuts(profile, minima)
    assert kept.tolist() == [30, 60, 90, 120, 150, 180]
    # too few deep minima to know a typical interval: nothing is dropped
    assert drop_shallow_cuts(profile, np.array([30, 75, 150])).tolist() == [30, 75, 150]



def test_a_stretch_two_bodies_long_gets_the_disc_the_peak_finder_missed():
    from scipy import signal

    from pipeline.segmentation.column import add_missed_cuts

    # bodies every 30 bins (peak 100, discs empty the profile), except the disc at 150: a shallow dip to 76 between
    # shoulders at 85 (a steep lumbosacral disc seen along the column), too little prominence to be found
    x = np.arange(200)
    profile = 100.0 * np.clip(np.abs(np.sin(np.pi * x / 30.0)) * 3.0, 0.0, 1.0)
    profile[125:196] = 100.0 - 15.0 * np.clip((x[125:196] - 125) / 20.0, 0.0, 1.0)  # 100 -> 85 over the stretch
    profile[148:153] = [82.0, 79.0, 76.0, 79.0, 82.0]
    profile[196:] = [60.0, 40.0, 20.0, 5.0]
    found, _ = signal.find_peaks(-profile, distance=18, prominence=0.1 * profile.max())
    assert 150 not in found.tolist() and found.tolist() == [30, 60, 90, 120]
    assert add_missed_cuts(profile, found).tolist() == [30, 60, 90, 120, 150]
    # the same stretch with its dip above MISSED_CUT_DEPTH of the peaks (one long body): no cut
    flat = profile.copy()
    flat[148:153] = [84.0, 83.0, 82.0, 83.0, 84.0]
    assert add_missed_cuts(flat, found).tolist() == [30, 60, 90, 120]
    # every disc found: nothing added; too few deep minima to know a typical interval: unchanged
    regular = 100.0 * np.clip(np.abs(np.sin(np.pi * x / 30.0)) * 3.0, 0.0, 1.0)
    assert add_missed_cuts(regular, np.array([30, 60, 90, 120, 150, 180])).tolist() == [30, 60, 90, 120, 150, 180]
    assert add_missed_cuts(profile, np.array([30, 60])).tolist() == [30, 60]

def test_split_column_keeps_a_body_with_a_dark_band_in_one_piece():
    prob, truth = _column_prob(heights=(30,) * 6)
    prob[(truth == 0) & (prob == np.float32(0.6))] = 0.0  # the discs, empty as on real scans (no bridges)
    rows3 = np.nonzero((truth == 3).any(axis=(1, 2)))[0]
    cols3 = np.nonzero((truth == 3).any(axis=(0, 2)))[0]
    mid = rows3[rows3.size // 2]
    band = prob[mid - 2:mid + 2, cols3[0] - 3:cols3[0] + cols3.size // 2]  # anterior half of body 3 (a view)
    band[band > 0] = 0.2  # a dark band of abnormal marrow across it
    out, _ = split_column(prob, (1.0, 1.0, 1.0), threshold=0.5, min_gap_mm=15.0)
    assert np.unique(out[out > 0]).size == 6
    rows, _ = per_body_scores(truth, out, (1.0, 1.0, 1.0))
    assert min(r["dice"] for r in rows) > 0.85


def test_split_column_grows_bodies_into_their_under_confident_rim_but_not_beyond_grow_mm():
    prob, truth = _column_prob()
    body = truth > 0
    rim = body & ~ndimage.binary_erosion(body, structure=np.ones((3, 3, 1), bool), iterations=2)
    prob[rim] = 0.4  # the outer 2 mm of every body is under-confident (real scans held out)
    rows3 = np.nonzero((truth == 3).any(axis=(1, 2)))[0]
    front = np.nonzero((truth == 3).any(axis=(0, 2)))[0].min()
    tongue = prob[rows3[5]:rows3[-5], front - 12:front + 8, 1:-1]  # a view
    tongue[tongue == 0] = 0.4  # an under-confident tongue leaving body 3 anteriorly
    sp = (1.0, 1.0, 1.0)
    plain, _ = split_column(prob, sp, threshold=0.5, min_gap_mm=15.0)
    grown, _ = split_column(prob, sp, threshold=0.5, min_gap_mm=15.0, grow_threshold=0.3, grow_mm=3.0)
    assert np.unique(grown[grown > 0]).size == np.unique(plain[plain > 0]).size == 6
    confident = prob > 0.5
    assert np.array_equal(grown[confident & (plain > 0)], plain[confident & (plain > 0)])  # same instances
    assert (plain[rim] > 0).mean() < 0.2 and (grown[rim] > 0).mean() > 0.9  # the rim is taken back
    far = ndimage.distance_transform_edt(~confident, sampling=sp) > 3.0
    assert not (grown[far] > 0).any()  # the tongue is cut 3 mm from the confident body
    assert (grown[rows3[5]:rows3[-5], front - 12:front + 8] > 0).sum() > (plain[rows3[5]:rows3[-5], front - 12:front + 8] > 0).sum()
    dice = {r["truth_label"]: r["dice"] for r in per_body_scores(truth, grown, sp)[0]}
    assert min(dice.values()) > max(r["dice"] for r in per_body_scores(truth, plain, sp)[0])


def test_hull_bodies_fills_bites_but_never_takes_a_neighbour():
    lab = _stack(heights=(20, 20), gap=3)
    clean = lab.copy()
    rows1 = np.nonzero((lab == 1).any(axis=(1, 2)))[0]
    lab[rows1[4]:rows1[12], 5:12, :] = 0  # a dark bite from the anterior border of body 1
    lab[rows1[-1] + 1: rows1[-1] + 3, 20:22, :] = 2  # a spur of body 2 reaching into the disc
    out = hull_bodies(lab, [1, 2])
    assert np.array_equal(out == 1, clean == 1)  # the bite is filled exactly, nothing beyond the body
    assert ((out == 2) & (lab == 2)).sum() == (lab == 2).sum()  # body 2 keeps every voxel
    assert not ((out == 1) & (lab == 2)).any()


def test_stage1_interpolates_skipped_thin_slices():
    class _Mean:
        def predict_proba(self, X):
            p = np.clip(X[:, 1], 0, 1)  # the smoothed intensity
            return np.stack([1 - p, p], axis=1)

    norm = np.zeros((40, 40, 9), np.float32)
    norm[10:30, 10:30] = np.linspace(0.2, 1.0, 9)[None, None, :]  # brightness grows across slices
    thick = stage1_probability(_Mean(), norm, slice_mm=3.0)  # every slice classified
    thin = stage1_probability(_Mean(), norm, slice_mm=1.0)  # every 3rd slice, the rest interpolated
    assert thin.shape == norm.shape == thick.shape
    assert np.allclose(thin[:, :, [0, 3, 6, 8]], thick[:, :, [0, 3, 6, 8]])
    # linear ramp: interpolation between classified slices reproduces the classified value
    assert np.allclose(thin[20, 20], thick[20, 20], atol=1e-3)


def test_classified_slices_keep_the_ends_and_thick_slices_are_all_classified():
    assert classified_slices(10, 1.0, 3.0).tolist() == [0, 3, 6, 9]
    assert classified_slices(11, 1.0, 3.0).tolist() == [0, 3, 6, 9, 10]  # the last slice is always seen
    assert classified_slices(12, 4.0, 3.0).tolist() == list(range(12))
    assert classified_slices(1, 1.0, 3.0).tolist() == [0]


def test_stage2_features_on_a_few_slices_equal_those_of_the_whole_volume():
    # the image features are computed on the slices that hold a voxel of `where` only: the values there must be
    # the ones the whole-volume computation gives (in-plane filters), the stage-1 neighbours still read every slice
    rng = np.random.default_rng(3)
    norm = rng.random((30, 34, 12)).astype(np.float32)
    p1 = rng.random((30, 34, 12)).astype(np.float32)
    where = np.zeros(norm.shape, bool)
    where[5:25, 4:30, [0, 3, 6, 9, 11]] = True
    where &= rng.random(norm.shape) < 0.5
    every = stage2_features(norm, p1, 1.0)
    few = stage2_features(norm, p1, 1.0, where=where)
    assert few.shape == (where.sum(), every.shape[1])
    assert np.allclose(few, every[where.reshape(-1)], atol=1e-5)


def test_complete_heights_restores_a_body_short_at_one_endplate():
    lab = _stack()
    r3 = np.nonzero((lab == 3).any(axis=(1, 2)))[0]
    lab[r3[-1] - 7: r3[-1] + 1][lab[r3[-1] - 7: r3[-1] + 1] == 3] = 0  # 8 mm of body 3 missing at its bottom
    out = complete_heights(lab, np.arange(1, 7), (1.0, 1.0, 1.0), max_mm=10.0)
    rows = np.nonzero((out == 3).any(axis=(1, 2)))[0]
    assert rows[-1] >= r3[-1] - 2  # grown back to (nearly) its original bottom
    assert (out[lab == 4] == 4).all()  # the neighbour untouched


def test_expected_levels_run_head_to_foot_from_the_first_annotated_level():
    truth = np.zeros((40, 4, 2), np.int32)
    truth[20:28] = 1  # annotators number bodies in their own order: 1 is the middle body here
    truth[2:10] = 7
    truth[30:38] = 3
    assert expected_levels(truth, "L4") == {7: "L4", 1: "L5", 3: "S1"}
    assert expected_levels(truth, "T11") == {7: "T11", 1: "T12", 3: "L1"}
    with pytest.raises(ValueError, match="past S1"):
        expected_levels(truth, "L5")
    with pytest.raises(ValueError, match="unknown level"):
        expected_levels(truth, "L6")
    assert level_outcome("L4", "L4") == "correct"
    assert level_outcome("L4", "L5") == "wrong"
    assert level_outcome("L4", "B3") == level_outcome("L4", None) == "unnamed"
    assert level_outcome(None, "L4") is None


def test_a_case_annotated_past_s1_keeps_its_scores_and_says_why_its_levels_are_not_scored(tmp_path):
    import nibabel as nib

    from pipeline.evaluation.segmentation import _eval_case

    truth = np.zeros((40, 8, 3), np.int16)
    truth[2:10] = 7
    truth[20:28] = 1
    truth[30:38] = 3
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(truth.shape, np.float32), affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(truth, affine), tmp_path / "lab.nii.gz")
    row = {"case": "c", "source": "s", "image_path": str(tmp_path / "img.nii.gz"),
           "labels_path": str(tmp_path / "lab.nii.gz")}
    # three annotated bodies from L5 down would run past S1: that case's names cannot be scored, its Dice still is
    res = _eval_case((row, str(tmp_path), None, None, SegmentationConfig(), False, "L5"))
    assert len(res["bodies"]) == 3 and all(b["dice"] == 0.0 for b in res["bodies"])
    assert "levels not scored" in res["error"] and "past S1" in res["error"]
    assert all(b["expected_level"] is None and b["level_outcome"] is None for b in res["bodies"])


def test_label_counts_and_centroids_match_scipy():
    from scipy import ndimage

    lab = _stack()
    lab[0, :5] = -3  # foreign label images may hold negative values: they belong to no label
    ids = [2, 4, 6]
    counts, cents = label_counts_and_centroids(lab, ids)
    ones = np.ones(lab.shape)
    assert np.allclose(counts, ndimage.sum_labels(ones, lab, ids))
    assert np.allclose(cents, ndimage.center_of_mass(ones, lab, ids))
    # the background (0) over the rest of the grid, negative voxels included; an absent label counts 0
    background = np.maximum(lab, 0)
    counts0, cents0 = label_counts_and_centroids(lab, [0, 99])
    assert counts0[0] == (background == 0).sum() and counts0[1] == 0
    assert np.allclose(cents0[0], ndimage.center_of_mass(background == 0))


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
    from pipeline.evaluation.cases import read_cases
    from pipeline.evaluation.segmentation import evaluate_rows

    rows = [r for r in read_cases(vertebral_bodies_dir / "cases.csv") if r["case"] in ("vb1-15", "vb2-05", "vb3-09")]
    assert len(rows) == 3
    summary = evaluate_rows(rows, tmp_path, write_png=False, first_levels={"vb2": "T11", "vb3": "L1"},
                            cfg=SegmentationConfig(body_model="classifier"))  # the U-Net: tests/test_unet.py
    assert summary["n_annotated_bodies"] == 19
    assert summary["mean_body_dice"] >= DICE_FLOOR, summary
    assert (tmp_path / "per_body.csv").read_text().count("\n") == 1 + 19
    # level names: vb2 annotates T11-L5 (data README), and vb2-05 shows its whole sacrum; vb3-09 ends just below
    # L5 (S1 cut short by the field of view): L5 is named from its lumbosacral endplate (issue 29), and no body
    # may carry a wrong name
    assert summary["level_naming"]["vb2"] == {"correct": 7, "wrong": 0, "unnamed": 0}
    assert summary["level_naming"]["vb3"]["wrong"] == 0 and "vb1" not in summary["level_naming"]
    # the same named bodies, split by whether their study was flagged LEVELS_UNCERTAIN (per_case.csv says which)
    by_flag = summary["level_naming_by_flag"]
    for k in ("correct", "wrong", "unnamed"):
        assert by_flag["LEVELS_UNCERTAIN"][k] + by_flag["not_levels_uncertain"][k] == sum(
            v[k] for v in summary["level_naming"].values())
    import csv

    cases = {r["case"]: r for r in csv.DictReader(open(tmp_path / "per_case.csv"))}
    for b in csv.DictReader(open(tmp_path / "per_body.csv")):
        assert (b["levels_uncertain"] == "True") == ("LEVELS_UNCERTAIN" in cases[b["case"]]["level_flags"].split())
    assert all(0.0 < float(r["labelling_confidence"]) <= 1.0 for r in cases.values())


# A regression floor for the pixel classifier on these three cases (0.54 with the one-stage classifier on 2026-11-25, 0.78 with the
# two-stage segmenter and 0.81 with the edge refiner on 2026-11-26; in-sample: the shipped model saw them), not the
# project target (0.92).
DICE_FLOOR = 0.76


def test_labels_map_back_to_a_finer_input_grid_with_smooth_outlines():
    from pipeline.segmentation.grid import to_input_grid

    # two discs (bodies) on a fine 0.5 mm grid, the working grid is 3x coarser
    yy, xx = np.mgrid[0:150, 0:120]
    fine = np.zeros((150, 120, 2), np.int16)
    fine[((yy - 40) ** 2 + (xx - 60) ** 2 <= 30 ** 2)] = 1
    fine[((yy - 110) ** 2 + (xx - 60) ** 2 <= 30 ** 2)] = 3  # touching body 1 at one point, other value
    coarse = fine[1::3, 1::3]  # what the working grid holds (centre sampling)
    nearest = np.repeat(np.repeat(coarse, 3, axis=0), 3, axis=1)
    mapped = to_input_grid(coarse, fine.shape)
    assert mapped.shape == fine.shape and set(np.unique(mapped)) == {0, 1, 3}

    def dice(a, b, v):
        return 2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum())

    for v in (1, 3):
        assert dice(mapped, fine, v) > 0.98
        assert dice(mapped, fine, v) > dice(nearest, fine, v)  # smoother than the staircase copy
    # the same grid: nothing changes
    assert np.array_equal(to_input_grid(fine, fine.shape), fine)


def test_inverted_training_copy_reverses_tissue_contrast_and_keeps_air_dark():
    from pipeline.evaluation.cases import remap_intensity

    img = np.zeros((80, 80, 3), np.float32)  # air
    img[10:70, 10:70] = 100.0  # muscle
    img[30:50, 30:50] = 300.0  # bright fatty marrow
    img[38:42, 38:42] = 20.0  # dark cortex-like spot inside the tissue
    inv = remap_intensity(img, "invert")
    assert inv[0, 0, 0] == 0 and inv[75, 75, 1] == 0  # air stays dark
    assert inv[40, 32, 0] < inv[15, 15, 0] < inv[40, 40, 0]  # marrow now darker than muscle, the dark spot brightest
    gam = remap_intensity(img, "gamma0.5")
    order = np.argsort([img[15, 15, 0], img[40, 32, 0], img[40, 40, 0]])
    assert np.array_equal(order, np.argsort([gam[15, 15, 0], gam[40, 32, 0], gam[40, 40, 0]]))  # monotone
    with pytest.raises(ValueError):
        remap_intensity(img, "sepia")


def test_phantom_samples_concentrate_on_the_focus_rows():
    from pipeline.training.samples import _draw, _focus_rows, _per_class

    lab = np.zeros((100, 40, 2), np.int16)
    for v, top in enumerate(range(5, 95, 18), start=1):
        lab[top: top + 12, 10:30] = v
    body = lab > 0
    usable = np.ones(lab.shape, bool)
    near = np.zeros(lab.shape, bool)
    focus = _focus_rows(lab, [3], margin=2)
    assert focus[41: 53].all() and not focus[:37].any() and not focus[58:].any()
    idx = _draw(body, usable, near, focus, np.random.default_rng(0), n_per_class=20, n_focus=200)
    rows = np.unravel_index(idx, lab.shape)[0]
    in_focus = focus[rows, 0, 0]
    assert in_focus.mean() > 0.75 and (~in_focus).sum() > 0  # mostly the lesion's body, some of the rest
    assert _focus_rows(lab, [], margin=2) is None
    # real cases: full share; phantoms: a fraction plus the focus share; augmented copies: half
    assert _per_class({"source": "vb1"}, 6000, (32, 8)) == (6000, 0)
    assert _per_class({"source": "phantom"}, 6000, (32, 8)) == (187, 750)
    assert _per_class({"source": "vb1", "remap": "invert"}, 6000, (32, 8)) == (3000, 0)


def test_phantom_sacrum_under_s1_is_background_for_training_but_unknown_rows_of_real_scans_are_not_used():
    from pipeline.training.samples import SACRUM_KNOWN_MM, _focus_rows, _rows_below, _rows_known

    lab = np.zeros((120, 10, 2), np.int16)
    lab[20:32, 2:8] = 5  # L5
    lab[40:52, 2:8] = 6  # S1, the lowest annotated body
    phantom, real = {"source": "phantom", "known_below_mm": SACRUM_KNOWN_MM}, {"source": "vb1"}
    pitch = 1.5
    below = _rows_below(phantom, pitch)
    assert below * pitch == pytest.approx(SACRUM_KNOWN_MM, abs=pitch) and SACRUM_KNOWN_MM >= 30  # S2 and more
    assert _rows_below(real, pitch) == 0
    rows_phantom = np.flatnonzero(_rows_known(lab > 0, 3, below)[:, 0, 0])
    rows_real = np.flatnonzero(_rows_known(lab > 0, 3, _rows_below(real, pitch))[:, 0, 0])
    rows_short = np.flatnonzero(_rows_known(lab > 0, 3, _rows_below({"known_below_mm": 1.0}, pitch))[:, 0, 0])
    assert rows_short.tolist() == rows_real.tolist()  # known less far than the margin: the margin
    assert rows_real[0] == rows_phantom[0] == 17  # above the bodies: the margin either way
    assert rows_real[-1] == 54 and rows_phantom[-1] == 51 + below  # under S1: a margin of a real scan, the sacrum of a phantom
    focus = np.flatnonzero(_focus_rows(lab, [6], 6, below)[:, 0, 0])
    assert focus[0] == 34 and focus[-1] == min(119, 51 + below)


def test_case_folds_stratify_by_source_and_keep_a_duplicated_scan_in_one_fold(tmp_path):
    from pipeline.evaluation.cases import case_folds

    rows = []
    for src, n in (("a", 5), ("b", 4)):
        for i in range(n):
            path = tmp_path / f"{src}{i}.nii.gz"
            path.write_bytes(f"{src}-{i}".encode())
            rows.append({"case": f"{src}{i}", "source": src, "image_path": str(path)})
    folds = case_folds(rows)
    assert folds == [0, 1, 2, 0, 1, 0, 1, 2, 0]  # i-th case of a source -> i mod 3
    # the same bytes under another name (the shared data holds one scan twice): the first copy's fold; the other
    # cases keep theirs
    (tmp_path / "copy.nii.gz").write_bytes(b"a-1")
    dup = {"case": "a9", "source": "a", "image_path": str(tmp_path / "copy.nii.gz")}
    folds = case_folds(rows[:5] + [dup] + rows[5:])
    assert folds[5] == folds[1] == 1 and folds[:5] + folds[6:] == [0, 1, 2, 0, 1, 0, 1, 2, 0]
    assert case_folds([{"case": "x", "source": "a"}, {"case": "y", "source": "a"}]) == [0, 1]  # no files: by order


def test_held_out_rows_are_a_fold_or_a_source_and_training_and_evaluation_split_the_same_way():
    from pipeline.evaluation.cases import held_out

    rows = [{"case": f"{s}{i}", "source": s} for s in "ab" for i in range(4)]  # folds 0 1 2 0 | 0 1 2 0
    assert held_out(rows) == [False] * 8
    assert held_out(rows, fold=0) == [True, False, False, True] * 2
    assert held_out(rows, source="b") == [False] * 4 + [True] * 4
    assert held_out(rows, fold=1, source="a") == [True] * 4 + [False, True, False, False]



def test_unet_refiner_learns_from_each_case_segmented_by_the_net_of_its_own_fold(monkeypatch):
    from sklearn.tree import DecisionTreeClassifier

    from pipeline.training import train_segmenter as ts

    rows = [{"case": f"{s}{i}", "source": s} for s in "ab" for i in range(4)] + [{"case": "p", "source": "phantom"}]
    nets = [Path(f"f{k}.onnx") for k in range(3)]
    seen = []

    def fake_segment(held, jobs):  # one band sample per case: y = 1 for source a, 0 for source b
        seen.extend((r["case"], net) for r, _, _, net in held)
        return [(np.full((1, 16), float(r["source"] == "a"), np.float32), np.array([r["source"] == "a"], np.int8))
                for r, _, _, _ in held]

    monkeypatch.setattr(ts, "_segment_held_out", fake_segment)
    monkeypatch.setattr(ts, "_refiner_classifier", lambda seed: DecisionTreeClassifier())
    folds = ts.case_folds(rows[:-1], 3)
    clf, n = ts.train_unet_refiner(rows, nets, model={})
    assert n == 8 and "p" not in [c for c, _ in seen]  # the phantoms are in every fold net's training set
    assert seen == [(r["case"], str(nets[f])) for r, f in zip(rows[:-1], folds, strict=True)]
    assert clf.predict(np.ones((1, 16), np.float32))[0] == 1 and clf.predict(np.zeros((1, 16), np.float32))[0] == 0
    seen.clear()
    _, n = ts.train_unet_refiner(rows, nets, model={}, skip_fold=1)
    assert n == folds.count(0) + folds.count(2) and all(net != "f1.onnx" for _, net in seen)
    seen.clear()
    _, n = ts.train_unet_refiner(rows, nets, model={}, skip_source="a")  # leave-one-source-out
    assert n == 4 and {c[0] for c, _ in seen} == {"b"}

def test_probability_resampled_to_the_input_grid_keeps_linear_ramps_and_the_slices():
    from pipeline.segmentation.grid import resample_inplane

    rows, cols = np.mgrid[0:20, 0:12].astype(np.float32)
    work = np.stack([rows, 2 * cols], axis=2)  # 1.5 mm working grid: a ramp per slice
    fine = resample_inplane(work, (60, 36, 2))  # 0.5 mm input grid, same extent
    assert fine.shape == (60, 36, 2)
    # pixel centres aligned: input row i sits at working row (i + 0.5) / 3 - 0.5 (inside the ramp's range)
    i = np.arange(3, 57)
    assert np.allclose(fine[i, 10, 0], (i + 0.5) / 3 - 0.5, atol=1e-5)
    j = np.arange(3, 33)
    assert np.allclose(fine[30, j, 1], 2 * ((j + 0.5) / 3 - 0.5), atol=1e-5)
    box = (slice(10, 40), slice(5, 20), slice(1, 2))  # only where asked, the same values there
    part = resample_inplane(work, (60, 36, 2), box)
    assert np.array_equal(part[box], fine[box]) and part.sum() == part[box].sum()


def test_each_body_model_gets_its_own_edge_refiner_and_the_unet_falls_back_to_the_classifiers():
    from pipeline.segmentation.refine import edge_refiner_for

    cls_ref, unet_ref = object(), object()
    both = {"stage1": None, "stage2": None, "refiner": cls_ref, "refiner_unet": unet_ref}
    assert edge_refiner_for(both, "unet") is unet_ref
    assert edge_refiner_for(both, "classifier") is cls_ref
    assert edge_refiner_for({"refiner": cls_ref}, "unet") is cls_ref  # a model file from before the U-Net refiner
    assert edge_refiner_for({}, "unet") is None
    assert edge_refiner_for(both, "onepass") is None  # no learnt refiner: refine.probability_edges instead


def test_train_segmenter_refuses_unclear_fold_options_before_any_work(tmp_path, capsys):
    from pipeline.training.train_segmenter import main

    with pytest.raises(SystemExit) as exc:
        main(["--fold", "0", "--cv", "cases"])
    assert exc.value.code == 2 and "--fold" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--source", "vb1", "--cv", "loso"])
    assert exc.value.code == 2 and "--source" in capsys.readouterr().err
    cases = tmp_path / "cases.csv"
    cases.write_text("case,image,labels\nvb1-01,i.nii.gz,l.nii.gz\n")
    with pytest.raises(SystemExit) as exc:
        main([str(cases), "--source", "vb9"])  # a mistyped source would train on every case
    assert exc.value.code == 2 and "vb9" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([str(cases), "--source", ""])  # nor an empty one
    assert exc.value.code == 2 and "''" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--unet-refiner", "f0.onnx", "f1.onnx", "f2.onnx", "--out", str(tmp_path / "none.joblib")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_a_thin_single_slice_is_segmented_and_named_with_physical_volumes():
    """SPIDER's 0.9 mm T2 slices (1.5 T Siemens): read as 0.9 mm slabs, every body was a fragment to the size rules
    and segmentation failed; the rules now read a single slice as at least SINGLE_SLICE_SLAB_MM thick."""
    import csv

    from conftest import SHARED_DATA

    from pipeline.evaluation.levels import segment_case
    from pipeline.segmentation.segment import SINGLE_SLICE_SLAB_MM, rule_slab_mm

    assert rule_slab_mm(1, 0.9) == SINGLE_SLICE_SLAB_MM and rule_slab_mm(1, 4.0) == 4.0 and rule_slab_mm(15, 0.9) == 0.9
    root = SHARED_DATA / "modic-spider"
    if not (root / "cases.csv").is_file():
        pytest.skip(f"real data not available: {root} is absent (see README, 'Real data')")
    with open(root / "cases.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["case"] == "spider-146")
    res, t2, seg = segment_case(row, root, SegmentationConfig())
    assert t2.spacing[2] == pytest.approx(0.9, abs=0.01) and not res["error"], res
    lumbar = [b for b in seg.bodies if b.level in ("L1", "L2", "L3", "L4", "L5")]
    assert len(lumbar) >= 4
    area_mm2 = [(seg.labels == b.value).sum() * t2.spacing[0] * t2.spacing[1] for b in lumbar]
    np.testing.assert_allclose([b.volume_mm3 for b in lumbar], np.array(area_mm2) * t2.spacing[2], rtol=1e-6)


@pytest.mark.parametrize("extra_contrasts", [True, False])
def test_other_contrasts_are_segmented_only_when_configured(monkeypatch, extra_contrasts):
    """``extra_contrasts``: T1 / STIR run through the body model near T2's bodies and their probability is the
    voxel-wise maximum; off, the bodies come from T2 alone (and what only T1 calls body is not body)."""
    import pipeline.segmentation.segment as segment

    lab = _stack()
    t2_prob = (lab > 0).astype(np.float32) * 0.9
    strip = (lab > 0) & (np.arange(lab.shape[1]) < 11)[None, :, None]  # the bodies' anterior 6 px (9 mm)
    t2_prob[strip] = 0.0  # T2 misses them (abnormal marrow); the other contrast sees them
    t1_prob = (lab > 0).astype(np.float32) * 0.9
    calls = []

    def fake_probability(image, spacing, region=None, model=None, body_model="classifier", int8=False):
        calls.append(region is not None)
        prob = t2_prob if image is t2_image else t1_prob
        return (prob.copy() if region is None else np.where(region, prob, 0).astype(np.float32)), (1.0, 1.0), None, None

    t2_image = np.zeros(lab.shape, np.float32)
    t1_image = np.ones(lab.shape, np.float32)
    monkeypatch.setattr(segment, "body_probability", fake_probability)
    cfg = SegmentationConfig(body_model="onepass", extra_contrasts=extra_contrasts, refine_edges=False)
    seg = segment.segment_vertebrae(t2_image, (segment.WORK_MM, segment.WORK_MM, 4.0), cfg, extra_images=[t1_image])
    assert calls == ([False, True] if extra_contrasts else [False])
    found = seg.labels[strip]
    assert (found > 0).mean() > 0.9 if extra_contrasts else (found == 0).all()


def test_the_report_says_which_contrasts_the_bodies_came_from():
    from pipeline.batch.study import segmentation_method

    assert " on T2, T1 and STIR," in segmentation_method("onepass", True, True)
    assert " on T2," in segmentation_method("onepass", True, False)
    assert "(shipped model, int8, ONNX Runtime)" in segmentation_method("unet", True, True, int8=True)
    assert "int8" not in segmentation_method("unet", True, True, int8=False)


def test_another_contrast_near_t2s_bodies_skips_stage1_and_stays_in_the_region(monkeypatch):
    """With a region (T1 / STIR near the bodies T2 found) the U-Net runs on the region's columns without stage 1,
    whose only job there was to find the column the region already gives; its probability is zero outside it."""
    import pipeline.segmentation.probability as probability
    import pipeline.segmentation.unet as unet

    def no_stage1(*a, **k):
        raise AssertionError("stage 1 ran on another contrast")

    seen = {}

    def fake_unet(norm, slice_mm, columns=None, session=None, needed=None, **kw):
        seen["columns"], seen["needed"] = columns, needed
        return np.full(norm.shape, 0.9, np.float32)

    monkeypatch.setattr(probability, "stage1_probability", no_stage1)
    monkeypatch.setattr(probability, "load_model", lambda: {"stage1": None})
    monkeypatch.setattr(unet, "unet_probability", fake_unet)
    image = np.random.default_rng(0).random((60, 200, 5)).astype(np.float32)
    sp = (probability.WORK_MM, probability.WORK_MM, 4.0)
    region = np.zeros(image.shape, bool)
    region[10:40, 90:110, 1:3] = True
    prob, _, column, _ = probability.body_probability(image, sp, region=region, body_model="unet")
    assert column is None and (prob[region] == np.float32(0.9)).all() and (prob[~region] == 0).all()
    margin = int(round(24.0 / probability.WORK_MM))
    assert seen["columns"] == slice(90 - margin, 110 + margin)
    assert seen["needed"].tolist() == [False, True, True, False, False]


def test_stage1_finds_the_unets_column_on_a_coarser_slice_lattice_than_the_classifiers(monkeypatch):
    """For the U-Net stage 1 only finds the column for its crop (every ~6 mm of slices); the classifier's stage 2
    reads the stage-1 map as a feature and keeps it every ~3 mm."""
    import pipeline.segmentation.probability as probability
    import pipeline.segmentation.unet as unet

    lattices = []

    def recording(n, slice_mm, pitch_mm):
        ks = classified_slices(n, slice_mm, pitch_mm)
        lattices.append(ks.tolist())
        return ks

    class _Half:
        def predict_proba(self, X):
            return np.tile([0.5, 0.5], (X.shape[0], 1))

    monkeypatch.setattr(probability, "classified_slices", recording)
    monkeypatch.setattr(unet, "load_session", lambda **kw: None)
    monkeypatch.setattr(unet, "unet_probability", lambda norm, *a, **kw: np.zeros(norm.shape, np.float32))
    image = np.random.default_rng(0).uniform(0.1, 1.0, (40, 40, 25)).astype(np.float32)
    sp = (probability.WORK_MM, probability.WORK_MM, 1.0)  # 1 mm slices
    probability.body_probability(image, sp, model={"stage1": _Half(), "stage2": None}, body_model="unet")
    assert lattices == [[0, 6, 12, 18, 24]]  # stage 1 only: the U-Net path runs no stage 2
    lattices.clear()
    probability.stage1_probability(_Half(), probability.normalise(image), 1.0)  # the classifier's stage 1
    assert lattices == [[0, 3, 6, 9, 12, 15, 18, 21, 24]]


def test_auto_runs_the_one_pass_net_on_a_single_slice_and_the_unet_on_a_volume(monkeypatch):
    """``body_model: auto`` (the default): a single sagittal slice goes to the one-pass net (trained also on
    single-slice crops), a volume to the U-Net cascade; a named body model is used as named."""
    import pipeline.segmentation.segment as segment

    assert segment.resolve_body_model("auto", 1) == "onepass"
    assert segment.resolve_body_model("auto", 15) == "unet"
    assert segment.resolve_body_model("unet", 1) == "unet" and segment.resolve_body_model("onepass", 15) == "onepass"
    assert SegmentationConfig().body_model == "auto"
    asked = []

    def fake_probability(image, spacing, region=None, model=None, body_model="classifier", int8=False):
        asked.append(body_model)
        lab = _stack(depth=image.shape[2] - 2) if image.shape[2] > 2 else _stack(depth=1)[:, :, 1:2]
        return (lab > 0).astype(np.float32) * 0.9, (1.0, 1.0), None, None

    monkeypatch.setattr(segment, "body_probability", fake_probability)
    monkeypatch.setattr(segment, "load_model", lambda: {})
    sp = (segment.WORK_MM, segment.WORK_MM, 4.0)
    for n_slices in (1, 7):
        shape = _stack(depth=max(n_slices - 2, 1)).shape[:2] + (n_slices,)
        segment.segment_vertebrae(np.zeros(shape, np.float32), sp, SegmentationConfig(refine_edges=False))
    assert asked == ["onepass", "unet"]

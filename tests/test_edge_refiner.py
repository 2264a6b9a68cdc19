"""Edge refiner (pipeline.segmentation.refine) on synthetic bodies with known outlines."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.segmentation.refine import (
    BAND_MM,
    N_FEATURES,
    PROFILE_MM,
    _fill_between,
    band_features,
    band_samples,
    keep_largest_and_fill,
    refine_labels,
)

BODIES = {21: slice(8, 38), 22: slice(48, 78), 23: slice(88, 114)}  # rows of three bodies, 10-row discs between


def _scan(seed: int, shape=(122, 64, 25)):
    """Bright blocky bodies with darker discs between them on a dark background, noise and a slight blur
    (1 mm voxels); returns (image, expert labels)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.int16)
    image = np.full(shape, 0.15, np.float32)
    image[8:114, 14:48, 3:22] = 0.55  # disc tissue between the bodies
    for value, rows in BODIES.items():
        truth[rows, 16:46, 3:22] = value
    image[truth > 0] = 1.0
    image = ndimage.gaussian_filter(image, (0.8, 0.8, 0)) + rng.normal(0, 0.05, shape).astype(np.float32)
    return image * 700.0, truth  # scanner-like scale: the features are relative to the bodies


def _grown(labels: np.ndarray, px: int) -> np.ndarray:
    """Each body grown (px > 0) or shrunk (px < 0) by |px| voxels in-plane: the errors of a coarse segmenter."""
    out = np.zeros_like(labels)
    foot = np.ones((2 * abs(px) + 1, 2 * abs(px) + 1, 1), bool)
    for v in np.unique(labels[labels > 0]):
        m = labels == v
        m = ndimage.binary_dilation(m, foot) if px > 0 else ndimage.binary_erosion(m, foot)
        out[m] = v
    return out


def _prob(labels: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter((labels > 0).astype(np.float32), (1.5, 1.5, 0))


def _dice(a, b, v):
    return 2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum())


def test_band_features_measure_from_the_right_body_and_look_inward():
    image, truth = _scan(0)
    band, near, X = band_features(image, truth, _prob(truth), (1.0, 1.0, 1.0))
    assert X.shape == (int(band.sum()), N_FEATURES) and near.shape == (X.shape[0],)
    sd = X[:, 0]
    inside = truth[band] > 0
    assert np.all(sd[inside] > 0) and np.all(sd[~inside] < 0) and np.all(np.abs(sd) <= BAND_MM)
    # nearest body: a background voxel takes the body it is closest to (rows of the disc split at the middle)
    r = np.nonzero(band)[0]
    assert np.all(near[inside] == truth[band][inside])
    assert np.all(near[~inside & (r < 43)] == 21) and np.all(near[~inside & (r > 44) & (r < 83)] == 22)
    # intensity relative to the own body is ~0 deep in the body, far below 0 on the background
    i_body = X[:, 3]
    assert abs(np.median(i_body[sd >= 3])) < 1.0 and np.median(i_body[sd <= -3]) < -5
    # the profile looks into the body for t > 0: brighter inward than outward at the in-plane surface (the lateral
    # faces, slices 2-3 and 21-22, have no in-plane normal)
    k = np.nonzero(band)[2]
    near_surface = (np.abs(sd) <= 1.5) & (k >= 5) & (k <= 19)
    plus, minus = X[:, 7 + PROFILE_MM.index(4.0)], X[:, 7 + PROFILE_MM.index(-4.0)]
    assert np.mean(plus[near_surface] > minus[near_surface]) == 1.0


def test_refiner_learns_to_pull_grown_and_shrunk_outlines_back_to_the_truth():
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    parts = []
    for seed, px in ((1, 2), (2, -2), (3, 3), (4, -1)):
        image, truth = _scan(seed)
        pred = _grown(truth, px)
        parts.append(band_samples(image, truth, pred, _prob(pred), (1.0, 1.0, 1.0), rng, n=15000))
    X, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    assert set(np.unique(y)) == {0, 1}
    model = HistGradientBoostingClassifier(max_iter=40, random_state=0).fit(X, y)
    image, truth = _scan(9)
    for px in (2, -2):
        pred = _grown(truth, px)
        refined = refine_labels(image, pred, _prob(pred), (1.0, 1.0, 1.0), model)
        assert set(np.unique(refined)) == set(np.unique(pred))  # bodies keep their values
        for v in BODIES:
            before, after = _dice(pred, truth, v), _dice(refined, truth, v)
            assert after > before + 0.03 and after > 0.95, (px, v, before, after)
    # thick slices (no every-other-slice shortcut) work the same way
    refined = refine_labels(image, _grown(truth, 2), _prob(_grown(truth, 2)), (1.0, 1.0, 4.0), model)
    assert min(_dice(refined, truth, v) for v in BODIES) > 0.9
    # a fine DICOM-like matrix (0.5 mm pixels): classified on the ~1 mm lattice, the pixels between filled in
    fine = lambda a: np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)  # noqa: E731
    grown = _grown(fine(truth), 4)
    refined = refine_labels(fine(image), grown, _prob(grown), (0.5, 0.5, 1.0), model)
    for v in BODIES:
        assert _dice(refined, fine(truth), v) > max(0.95, _dice(grown, fine(truth), v) + 0.03)


def test_refiner_leaves_an_empty_segmentation_alone():
    image, _ = _scan(0)
    empty = np.zeros(image.shape, np.int16)
    assert refine_labels(image, empty, np.zeros(image.shape, np.float32), (1, 1, 1), model=None) is empty


def test_fill_between_interpolates_probabilities_and_copies_labels():
    known = np.array([[[0.2, 0.6, np.nan]]], np.float32)  # slices 0, 2, 4 of 6
    out = _fill_between(known, np.array([0, 2, 4]), 6, np.nan, axis=2)
    assert np.allclose(out[0, 0, :5], [0.2, 0.4, 0.6, 0.6, np.nan], equal_nan=True)
    assert out[0, 0, 5] != out[0, 0, 5]  # after the last known slice: its copy (unknown here)
    labels = np.array([[[0, 7, 7]]], np.int16)
    assert list(_fill_between(labels, np.array([0, 2, 4]), 5, 0, axis=2)[0, 0]) == [0, 7, 7, 7, 7]
    rows = _fill_between(np.array([[[1.0]], [[3.0]]], np.float32), np.array([0, 2]), 3, np.nan, axis=0)  # any axis
    assert rows.shape == (3, 1, 1) and np.allclose(rows[:, 0, 0], [1.0, 2.0, 3.0])


def test_cleanup_keeps_each_bodys_largest_piece_and_fills_its_holes_only():
    lab = np.zeros((40, 20, 3), np.int16)
    lab[2:15, 2:18] = 1
    lab[6:9, 6:9, 1] = 0  # hole in body 1 on the middle slice
    lab[30:33, 2:5] = 1  # stray piece of body 1
    lab[20:28, 2:18] = 2
    lab[23:25, 8:10] = 3  # another body inside body 2: not a hole of body 2
    out = keep_largest_and_fill(lab, [1, 2, 3])
    assert (out[30:33, 2:5] == 0).all() and (out[6:9, 6:9, 1] == 1).all()
    assert (out[23:25, 8:10] == 3).all() and (out == 2).sum() == (lab == 2).sum()


def test_probability_edges_move_a_surface_to_the_probability_crossing_within_the_band_only():
    from pipeline.segmentation.refine import probability_edges

    sp = (0.5, 0.5, 4.0)
    labels = np.zeros((100, 100, 3), np.int16)
    labels[20:60, 20:60] = 7  # the interpolated working-grid body
    prob = np.zeros(labels.shape, np.float32)
    prob[21:62, 20:60] = 0.9  # the net's body: 0.5 mm lower at the top, 1 mm lower at the bottom
    prob[61, 20:60] = 0.4  # below the threshold: the last row stays out
    prob[80:85, 30:40] = 0.9  # body-like probability 10 mm away: beyond the band, never added
    out = probability_edges(labels, prob, sp, None, threshold=0.5)
    rows = np.flatnonzero(out[:, 40, 1] == 7)
    assert (rows[0], rows[-1]) == (21, 60)
    assert not out[80:85].any()
    assert set(np.unique(out)) == {0, 7}
    deep = labels.copy()
    prob[30:50, 30:50] = 0.0  # a dark lesion deep inside the body (beyond the band): kept as body
    out2 = probability_edges(deep, prob, sp, None, threshold=0.5)
    assert (out2[30:50, 30:50] == 7).all()


# The fast paths of refine.py must give what the scipy filters they replace give (the pipeline's outputs were
# checked bit for bit against them; these keep it so).

def _random_bodies(rng, shape=(40, 36, 5)) -> np.ndarray:
    """Labels 1..3: blobs of random noise, smoothed and thresholded, some touching the array's edge."""
    out = np.zeros(shape, np.int16)
    for v in (1, 2, 3):
        blob = ndimage.gaussian_filter(rng.random(shape), (2.0, 2.0, 0.0)) > 0.52
        out[blob & (out == 0)] = v
    return out


def test_sample_in_slice_is_map_coordinates_bilinear_nearest():
    from pipeline.segmentation.refine import _sample_in_slice

    rng = np.random.default_rng(0)
    a = rng.normal(size=(17, 13, 4)).astype(np.float32)
    n = 5000
    rows = rng.uniform(-3, 20, n)  # inside, at and past the edges
    cols = rng.uniform(-3, 16, n)
    rows[:50], cols[:50] = np.round(rows[:50]), np.round(cols[:50])  # on the grid
    k = rng.integers(0, 4, n)
    want = ndimage.map_coordinates(a, [rows, cols, k.astype(np.float32)], order=1, mode="nearest")
    assert np.allclose(_sample_in_slice(a, rows, cols, k), want, atol=1e-6)


def test_signed_distance_matches_two_distance_transforms():
    from pipeline.segmentation.refine import _signed_distance

    rng = np.random.default_rng(1)
    for sp in ((1.0, 1.0, 1.0), (0.7, 0.9, 4.0)):
        body = _random_bodies(rng) > 0
        inside = ndimage.distance_transform_edt(body, sampling=sp)
        outside, idx = ndimage.distance_transform_edt(~body, sampling=sp, return_indices=True)
        sd, got_idx = _signed_distance(body, sp)
        assert np.allclose(sd, np.where(body, inside, -outside).astype(np.float32), atol=1e-5)
        assert np.array_equal(got_idx, idx)


def test_fill_holes_matches_binary_fill_holes_per_slice():
    from pipeline.segmentation.refine import _fill_holes

    per_slice = np.zeros((3, 3, 3), bool)
    per_slice[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    rng = np.random.default_rng(2)
    for _ in range(20):
        mask = _random_bodies(rng) == 1
        mask[10:20, 10:20, 2] = True
        mask[13:16, 13:16, 2] = False  # a hole for sure
        want = ndimage.binary_fill_holes(mask, per_slice)
        got = _fill_holes(mask, per_slice)
        assert got[14, 14, 2] and np.array_equal(got, want)


def test_probability_edges_matches_whole_crop_filters():
    """probability_edges re-decides only the voxels that can change; the result is what the whole-crop filters
    (dilation, erosion with border 1, grey dilation over the in-plane ellipse) give."""
    from pipeline.segmentation.refine import probability_edges

    def reference(view, p, spacing, threshold, band_mm=1.5):
        view = view.copy()
        inside = view > 0
        reach = [max(1, int(round(band_mm / float(s)))) for s in spacing[:2]]
        plane = np.zeros((2 * reach[0] + 1, 2 * reach[1] + 1, 1), bool)
        rr, cc = np.ogrid[-reach[0]:reach[0] + 1, -reach[1]:reach[1] + 1]
        plane[:, :, 0] = (rr / reach[0]) ** 2 + (cc / reach[1]) ** 2 <= 1.0
        near = ndimage.grey_dilation(view, footprint=plane)
        band = ndimage.binary_dilation(inside, plane) & ~ndimage.binary_erosion(inside, plane, border_value=1)
        view[band & inside & (p <= threshold)] = 0
        add = band & ~inside & (p > threshold)
        view[add] = near[add]
        return keep_largest_and_fill(view, np.unique(view[view > 0]))

    rng = np.random.default_rng(3)
    changed = 0
    for spacing in ((0.5, 0.5, 4.0), (1.0, 0.8, 3.0)):
        for _ in range(10):
            labels = _random_bodies(rng)
            prob = np.clip(ndimage.gaussian_filter((labels > 0).astype(np.float32), 1.5)
                           + rng.normal(0, 0.15, labels.shape), 0, 1).astype(np.float32)
            box = tuple(slice(0, n) for n in labels.shape)  # the whole array: its edges are the crop's border
            got = probability_edges(labels, prob, spacing, box, 0.5)
            assert np.array_equal(got, reference(labels, prob, spacing, 0.5))
            changed += int((got != labels).sum())
    assert changed > 0  # the comparison saw edges move

"""Disc patches and the disc CNN (pipeline/disc_cnn.py, pipeline/training/train_disc_cnn.py): patch geometry on
synthetic spines with known positions, the inference crop equals the training's, the exported ONNX graph gives
the torch nets' probability, a net learns a planted band, and the shipped disc model uses its CNN."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.disc_cnn import CROP_MM, PATCH_MM, centre_crop, cnn_probability, disc_patches

MARROW, DISC, BAND = 100.0, 300.0, 250.0


def two_bodies(tilt_deg: float = 0.0, n_slices: int = 1, spacing=(0.5, 0.5, 4.0)):
    """Upper and lower body (30 x 36 mm) with a 10 mm disc between them, the upper body's lowest 6 mm bright
    (a planted band at its inferior endplate), rotated by ``tilt_deg`` in the sagittal plane; 0.5 mm pixels."""
    h, w = 320, 240
    rows, cols = np.mgrid[0:h, 0:w] * spacing[0]
    c = np.array([h, w]) * spacing[0] / 2
    a = np.deg2rad(tilt_deg)
    u = np.cos(a) * (rows - c[0]) + np.sin(a) * (cols - c[1])  # along the column, 0 = disc centre
    v = -np.sin(a) * (rows - c[0]) + np.cos(a) * (cols - c[1])
    in_ap = np.abs(v) <= 18
    upper = in_ap & (u >= -35) & (u < -5)
    lower = in_ap & (u > 5) & (u <= 35)
    lab2 = np.where(upper, 1, np.where(lower, 2, 0)).astype(np.int16)
    img = np.full((h, w), 20.0)
    img[upper | lower] = MARROW
    img[upper & (u >= -11)] = BAND
    img[in_ap & (np.abs(u) < 5)] = DISC
    labels = np.repeat(lab2[:, :, None], n_slices, axis=2)
    image = np.repeat(img[:, :, None], n_slices, axis=2)
    return {"T1": image.copy(), "T2": image.copy()}, labels, spacing


def planted_patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, patches): every patch a bright disc in noisy marrow; about half (label 1) with a dark T1 band
    above the disc (a Modic-like change along the upper endplate)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    patches = np.ones((n, 2, *PATCH_MM), np.float32) + rng.normal(0, 0.15, (n, 2, *PATCH_MM)).astype(np.float32)
    cu = PATCH_MM[0] // 2
    patches[:, :, cu - 4:cu + 4] = 2.5
    patches[y == 1, 0, cu - 12:cu - 5, 12:60] = 0.4
    return y, ndimage.gaussian_filter(patches, (0, 0, 1, 1))


def test_patch_is_centred_on_the_disc_and_aligned_with_the_column():
    for tilt in (0.0, 25.0):
        images, labels, sp = two_bodies(tilt)
        (patch,) = disc_patches(images, labels, [1, 2], sp, {"T1": MARROW, "T2": MARROW})
        assert patch.shape == (2, *PATCH_MM)
        cu, cv = PATCH_MM[0] // 2, PATCH_MM[1] // 2
        t2 = patch[1]
        # centre in the disc (ratio 3), marrow 12-20 mm below it (ratio 1), the band 6-10 mm above it (ratio 2.5)
        assert t2[cu, cv] == pytest.approx(DISC / MARROW, abs=0.05), tilt
        assert np.median(t2[cu + 12:cu + 20, cv - 10:cv + 10]) == pytest.approx(1.0, abs=0.05), tilt
        assert np.median(t2[cu - 10:cu - 6, cv - 10:cv + 10]) == pytest.approx(BAND / MARROW, abs=0.05), tilt
        # aligned: the disc spans the patch's rows cu-4..cu+4 across the body's AP width, whatever the tilt
        assert np.all(t2[cu - 3:cu + 4, cv - 15:cv + 16] > 2.5), tilt


def test_patch_geometry_with_uneven_pixels_and_the_pair_off_the_first_slices():
    """Rows 0.5 mm, columns 0.8 mm; the pair only on slices 2-4 of 6 (slice 3 whole), other slices darker: the
    patch is read on slice 3, in mm, so the disc is 10 mm tall and centred."""
    images, labels, _ = two_bodies(tilt_deg=20.0, n_slices=6)
    sp = (0.5, 0.8, 4.0)
    # squeeze the columns so that 0.8 mm pixels give the same anatomy in mm (every 8th of 5 columns kept)
    cols = np.round(np.arange(0, labels.shape[1], 0.8 / 0.5)).astype(int)
    cols = cols[cols < labels.shape[1]]
    labels, images = labels[:, cols], {r: v[:, cols] for r, v in images.items()}
    labels[:, :, [0, 1, 5]] = 0
    labels[:, :, [2, 4]] = np.where(labels[:, :, [2, 4]] == 2, 0, labels[:, :, [2, 4]])  # lower body on 3 only
    for v in images.values():
        v[:, :, [0, 1, 2, 4, 5]] *= 0.5  # a wrong slice would halve the ratios
    (patch,) = disc_patches(images, labels, [1, 2], sp, {"T1": MARROW, "T2": MARROW})
    cu, cv = PATCH_MM[0] // 2, PATCH_MM[1] // 2
    assert patch[1, cu, cv] == pytest.approx(DISC / MARROW, abs=0.05)
    assert np.median(patch[1, cu + 12:cu + 20, cv - 10:cv + 10]) == pytest.approx(1.0, abs=0.05)
    assert np.median(patch[1, cu - 10:cu - 6, cv - 10:cv + 10]) == pytest.approx(BAND / MARROW, abs=0.05)
    assert np.all(patch[1, cu - 3:cu + 4, cv - 12:cv + 13] > 2.5)  # the disc: 10 mm of rows across the body
    assert np.all(patch[1, cu + 7:cu + 20, cv - 12:cv + 13] < 1.5)  # ... and no more


def test_a_disc_without_a_patch_is_decided_by_the_regression_alone():
    from pipeline.disc_cnn import patch_valid
    from pipeline.disc_model import feature_names, load_disc_model

    images, labels, sp = two_bodies(n_slices=2)
    labels[:, :, 0][labels[:, :, 0] == 2] = 0
    labels[:, :, 1][labels[:, :, 1] == 1] = 0  # the two bodies never on one slice
    (patch,) = disc_patches(images, labels, [1, 2], sp, {"T1": MARROW, "T2": MARROW})
    assert not patch_valid(patch[None]).any()
    zero_ref = disc_patches(*two_bodies()[:2], [1, 2], sp, {"T1": 0.0, "T2": MARROW})
    assert patch_valid(zero_ref).all()  # a zero reference falls back to the body voxels' median
    good = disc_patches(*two_bodies()[:2], [1, 2], sp, {"T1": MARROW, "T2": MARROW})
    model = load_disc_model()
    x = np.full((2, len(feature_names())), np.nan)
    p, t = model.decide(x, np.concatenate([patch[None], good]))
    assert p[0] == pytest.approx(model.score(x[:1])[0]) and t[0] == model.threshold
    assert p[1] != pytest.approx(model.score(x[1:])[0]) and t[1] == model.cnn["threshold"]


def test_patch_reference_and_slice_choice():
    images, labels, sp = two_bodies(n_slices=5)
    others = labels[:, :, [0, 1, 3, 4]]
    others[others == 2] = 0  # the lower body only on slice 2: the pair is seen whole there alone
    labels[:, :, [0, 1, 3, 4]] = others
    images["T2"][:, :, 2] *= 2.0
    (patch,) = disc_patches(images, labels, [1, 2], sp, {"T1": MARROW, "T2": 2 * MARROW})
    cu, cv = PATCH_MM[0] // 2, PATCH_MM[1] // 2
    assert patch[1, cu, cv] == pytest.approx(DISC / MARROW, abs=0.05)  # slice 2 read, over its own reference
    assert disc_patches(images, labels, [1], sp, {}).shape == (0, 2, *PATCH_MM)
    # no reference: the median of the body voxels stands in (here the marrow)
    (no_ref,) = disc_patches(*two_bodies()[:2], [1, 2], sp, {})
    assert np.median(no_ref[1, cu + 12:cu + 20, cv - 10:cv + 10]) == pytest.approx(1.0, abs=0.05)


def test_centre_crop_is_the_trainings_evaluation_crop():
    torch = pytest.importorskip("torch", reason="PyTorch is only needed to train (pip install -e '.[train]')")
    from pipeline.training.train_disc_cnn import as_tensor, augment

    patches = np.random.default_rng(0).uniform(0, 5, (3, 2, *PATCH_MM)).astype(np.float32)
    crop = centre_crop(patches)
    assert crop.shape == (3, 2, *CROP_MM) and crop.max() <= 4.0
    with torch.no_grad():
        ref = augment(torch, as_tensor(torch, patches), None, False).numpy()
    np.testing.assert_allclose(crop, ref, atol=1e-4)  # grid_sample at pixel centres, up to float rounding


def test_a_net_learns_a_planted_band_and_the_onnx_export_matches_it(tmp_path):
    pytest.importorskip("torch", reason="PyTorch is only needed to train (pip install -e '.[train]')")
    pytest.importorskip("onnx", reason="exporting needs onnx (pip install -e '.[train]')")
    from pipeline.training.train_disc_cnn import export_onnx, grouped_nets, predict

    n = 96
    y, patches = planted_patches(n, seed=1)
    groups = np.repeat([f"p{i}" for i in range(n // 4)], 4)
    nets, oof = grouped_nets(patches, y, groups, seed=0, epochs=8)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, oof) > 0.9  # out of fold: patients no net saw
    path = tmp_path / "cnn.onnx"
    export_onnx(nets, path)
    np.testing.assert_allclose(cnn_probability(patches[:10], path), predict(nets, patches[:10]), atol=1e-4)
    with pytest.raises(FileNotFoundError, match="retrain"):
        cnn_probability(patches[:1], tmp_path / "missing.onnx")


def test_shipped_disc_model_averages_its_cnn_with_the_regression():
    from pipeline.disc_model import feature_names, load_disc_model

    model = load_disc_model()
    assert model.cnn is not None and (model.folder / model.cnn["file"]).is_file()
    images, labels, sp = two_bodies()
    patches = disc_patches(images, labels, [1, 2], sp, {"T1": MARROW, "T2": MARROW})
    x = np.full((1, len(feature_names())), np.nan)
    p, t = model.decide(x, patches)
    expected = (model.score(x) + cnn_probability(patches, model.folder / model.cnn["file"])) / 2
    assert p == pytest.approx(expected) and np.all(t == model.cnn["threshold"])
    p_alone, t_alone = model.decide(x)  # no patches: the regression and its own threshold
    assert p_alone == pytest.approx(model.score(x)) and np.all(t_alone == model.threshold)
    onepass = load_disc_model(body_model="onepass")  # the other body model's pair ships too
    assert onepass.cnn is not None and (onepass.folder / onepass.cnn["file"]).is_file()
    with pytest.raises(ValueError, match="patches"):
        model.decide(np.vstack([x, x]), patches)


def test_nested_cv_of_regression_and_cnn_reads_a_signal_only_the_patches_carry():
    """train_modic's nested CV with the CNN: features are noise, the planted change is in the patches only; the
    outer test patients' calls (threshold chosen inside each training split) still recover it."""
    pytest.importorskip("torch", reason="PyTorch is only needed to train (pip install -e '.[train]')")
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from pipeline.training.train_modic import cross_validate_with_cnn

    n = 120
    y, patches = planted_patches(n, seed=3)
    groups = np.repeat([f"p{i}" for i in range(n // 3)], 3)
    x = np.random.default_rng(4).normal(size=(n, 5))
    ((p, call),), (p_cnn,) = cross_validate_with_cnn(x, patches, y, groups, c=0.1, repeats=1, epochs=8)
    assert p.shape == call.shape == p_cnn.shape == (n,)
    assert roc_auc_score(y, p_cnn) > 0.85  # the CNN of the outer training split, on patients it never saw
    assert balanced_accuracy_score(y, call) > 0.7  # diluted by the noise regression, still far above chance


def test_aux_targets_scale_the_gradings_and_mask_what_is_missing(tmp_path):
    from pipeline.evaluation.findings import read_grading_rows, read_gradings
    from pipeline.training.train_disc_cnn import AUX_GRADINGS, aux_targets

    cols = [c for c, _, _ in AUX_GRADINGS]
    rows = [{"pfirrmann": "5", "up_endplate": "1", "low_endplate": "0", "disc_narrowing": "1", "disc_bulging": "0"},
            {"pfirrmann": "1", "up_endplate": "", "low_endplate": "7"},  # empty, out of range, absent columns
            {}]
    a = aux_targets(rows)
    assert a.shape == (3, len(AUX_GRADINGS))
    assert a[0, cols.index("pfirrmann")] == 1.0 and a[1, cols.index("pfirrmann")] == 0.0
    assert a[0, cols.index("up_endplate")] == 1.0 and a[0, cols.index("low_endplate")] == 0.0
    assert np.isnan(a[1, cols.index("up_endplate")]) and np.isnan(a[1, cols.index("low_endplate")])
    assert np.isnan(a[2]).all()
    # as train_modic reads them: one row per (case, ivd) of the gradings CSV; Modic-only gradings give no targets
    csv_file = tmp_path / "g.csv"
    csv_file.write_text("case,ivd,modic,pfirrmann,up_endplate\nc1,1,2,4,1\nc2,2,0,,0\n")
    rows = read_grading_rows(csv_file)
    assert set(rows) == {("c1", 1), ("c2", 2)}
    assert read_gradings(csv_file) == {("c1", 1): 2, ("c2", 2): 0}  # the Modic column of the same rows
    bad = tmp_path / "bad.csv"
    bad.write_text("case,ivd,modic,pfirrmann\nc1,x,0,1\n")
    with pytest.raises(ValueError, match="line 2"):  # one reader, one check: training no longer skips it silently
        read_grading_rows(bad)
    b = aux_targets([rows["c1", 1], rows["c2", 2]])
    assert b[0, cols.index("pfirrmann")] == 0.75 and b[0, cols.index("up_endplate")] == 1.0
    assert np.isnan(b[1, cols.index("pfirrmann")]) and b[1, cols.index("up_endplate")] == 0.0
    modic_only = tmp_path / "m.csv"
    modic_only.write_text("case,ivd,modic\nc1,1,2\n")
    assert np.isnan(aux_targets(list(read_grading_rows(modic_only).values()))).all()


def test_the_auxiliary_head_learns_its_gradings_and_the_exported_net_gives_modic_only(tmp_path):
    """A second planted change (a dark T2 disc, independent of the Modic band) given as an auxiliary grading, half
    of them unknown: the net's auxiliary head learns it for patients it never saw, the Modic output still reads
    the band, and the exported graph has the Modic output alone, as without auxiliary gradings."""
    torch = pytest.importorskip("torch", reason="PyTorch is only needed to train (pip install -e '.[train]')")
    pytest.importorskip("onnx", reason="exporting needs onnx (pip install -e '.[train]')")
    from sklearn.metrics import roc_auc_score

    from pipeline.training.train_disc_cnn import as_tensor, augment, export_onnx, predict, train_net

    n = 160
    y, patches = planted_patches(n, seed=5)
    dark = (np.random.default_rng(6).random(n) < 0.5).astype(int)
    cu = PATCH_MM[0] // 2
    patches[dark == 1, 1, cu - 4:cu + 4] = 0.6  # the disc dark on T2 ("degenerated")
    aux = np.full((n, 2), np.nan, np.float32)
    aux[:, 0] = dark
    aux[::2, 0] = np.nan  # half unknown: masked out of the loss
    aux[:, 1] = 1.0 - dark  # a second column, fully known
    train, test = np.arange(n) < 120, np.arange(n) >= 120
    net = train_net(patches[train], y[train], seed=0, epochs=10, aux=aux[train])
    plain = train_net(patches[train], y[train], seed=0, epochs=1)
    assert net.aux_head is not None and net.aux_head.out_features == 2 and plain.aux_head is None
    with torch.no_grad():
        logit, aux_logit = net.forward_all(augment(torch, as_tensor(torch, patches[test]), None, False))
    assert logit.shape == (test.sum(),) and aux_logit.shape == (test.sum(), 2)
    assert roc_auc_score(dark[test], aux_logit[:, 0].numpy()) > 0.9
    assert roc_auc_score(dark[test], -aux_logit[:, 1].numpy()) > 0.9
    # the unknown half is masked, not read as "0": the dark discs' predicted level stays high (about 0.4 when the
    # unknowns count as zeros, 0.8 when masked)
    assert torch.sigmoid(aux_logit[dark[test] == 1, 0]).mean() > 0.65
    with pytest.raises(ValueError, match="rows"):
        train_net(patches[:8], y[:8], seed=0, epochs=1, aux=aux[:7])
    assert roc_auc_score(y[test], predict([net], patches[test])) > 0.85
    path = tmp_path / "cnn.onnx"
    export_onnx([net], path)
    np.testing.assert_allclose(cnn_probability(patches[test][:6], path), predict([net], patches[test][:6]), atol=1e-4)

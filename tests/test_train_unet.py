"""Training the body U-Nets (pipeline.training.train_unet): training slices and their targets (body, L5), batches
and augmentation, the pseudo-labelled sacrum, the slice cache, and (with PyTorch installed) a few training steps."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.segmentation import unet


def _slice(value: float, body_box=None, shape=(60, 70)):
    x = np.full((3, *shape), value, np.float32)
    y = np.zeros(shape, bool)
    if body_box is not None:
        y[body_box] = True
    return x, y, np.ones(shape, bool)


def test_training_batches_mix_sources_as_asked_and_pad_small_slices():
    from pipeline.training.train_unet import sample_batch

    real = [_slice(0.25, (slice(20, 40), slice(20, 40)))]
    phantom = [_slice(0.75, (slice(10, 30), slice(10, 30)))]
    rng = np.random.default_rng(0)
    x, y, m = sample_batch(real, phantom, rng, batch=400, patch=32, phantom_share=0.25)
    assert x.shape == (400, 3, 32, 32) and y.shape == m.shape == (400, 1, 32, 32)
    from_phantom = x[:, 0, 16, 16] > 0.5  # the gamma keeps 0.25 below and 0.75 above 0.5 for any g in reason
    assert 0.15 < from_phantom.mean() < 0.35
    assert (y.reshape(400, -1).any(axis=1)).mean() > 0.75  # most crops hold body
    # a slice smaller than the patch: its crop is padded with zeros, and padding is never counted in the loss
    small = [_slice(0.5, (slice(2, 8), slice(2, 8)), shape=(10, 12))]
    x, y, m = sample_batch(small, [], rng, batch=4, patch=32, rotate_deg=0, scale_log=0)
    assert (m[:, 0, 11:21, 10:22] == 1).all() and m.sum() == 4 * 10 * 12  # the slice, centred; nothing else known
    assert not x[np.broadcast_to(m == 0, x.shape)].any()
    x, y, m = sample_batch(small, [], rng, batch=50, patch=32)  # rotated and zoomed: still only the slice is known
    assert not x[np.broadcast_to(m == 0, x.shape)].any()
    known = m.reshape(50, -1).sum(axis=1)
    assert (known > 120 * np.exp(-0.3) - 12).all() and (known < 120 * np.exp(0.3) + 12).all()


def test_training_crops_move_image_and_target_together_and_swap_the_side_slices():
    from pipeline.training.train_unet import sample_batch

    x, y, m = _slice(0.2, (slice(15, 45), slice(20, 40)))
    x[1][y] = 1.0  # the centre channel shows the body
    x[0], x[2] = 0.1, 0.9  # the side channels tell left from right
    xb, yb, mb = sample_batch([(x, y, m)], [], np.random.default_rng(3), batch=200, patch=32)
    known = mb[:, 0] > 0
    bright = xb[:, 1] > 0.6  # any gamma in reason keeps 1.0 above and 0.2 below
    agree = (bright == (yb[:, 0] > 0))[known].mean()
    assert agree > 0.97  # rotated and zoomed alike (the rest: interpolated edge pixels)
    body_px = yb[:, 0].sum(axis=(1, 2))
    assert body_px.std() > 0  # zoom varies the apparent size
    swapped = xb[:, 0, 16, 16] > xb[:, 2, 16, 16]
    assert 0.35 < swapped.mean() < 0.65


def test_training_slices_know_the_phantom_sacrum_but_not_the_rows_below_a_real_scan(tmp_path):
    import nibabel as nib

    from pipeline.training.train_unet import MARGIN_MM, case_slices

    lab = np.zeros((100, 60, 20), np.int16)
    lab[20:35, 20:40, 8:12] = 1
    lab[45:60, 20:40, 8:12] = 2
    img = np.where(lab > 0, 300.0, 100.0).astype(np.float32) + np.arange(20, dtype=np.float32)
    # sagittal slices 4 mm apart, 1.5 mm in-plane (already the working grid): rows head -> foot, columns front -> back
    aff = np.array([[0, 0, 4.0, 0], [0, -1.5, 0, 0], [-1.5, 0, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "l.nii.gz")
    row = {"image_path": str(tmp_path / "i.nii.gz"), "labels_path": str(tmp_path / "l.nii.gz")}
    real = case_slices(row)
    phantom = case_slices({**row, "known_below_mm": 30.0})
    assert len(real) == 4 + 2 * round(MARGIN_MM / 4.0)  # the body slices and 8 mm either side
    x, y, known, l5, l5_known = real[len(real) // 2]
    assert x.shape == (3, *y.shape) and y.sum() > 0
    assert not l5_known and not l5.any()  # a real scan's levels are unknown unless its row says so
    # the working grid is in the scanner's head-to-foot order; whichever way it runs, the annotated rows are known,
    # and the phantom knows 30 mm (20 rows) more below its lowest body than the real scan (3 rows margin)
    rows_real, rows_ph = known.any(axis=1).sum(), phantom[len(real) // 2][2].any(axis=1).sum()
    rows_body = np.flatnonzero(y.any(axis=1))
    assert rows_real == rows_body[-1] - rows_body[0] + 1 + 2 * 3
    assert rows_ph == rows_real + 20 - 3


def test_l5_target_is_the_lowest_annotated_body_of_a_row_that_says_so_and_a_phantoms_level_value(tmp_path):
    import nibabel as nib

    from pipeline.training.train_unet import case_slices, l5_mask
    from pipeline.types import level_value

    lab = np.zeros((100, 60, 20), np.int16)
    lab[20:35, 20:40, 8:12] = 7  # the annotators' own numbers: the lower body is the smaller number
    lab[45:60, 20:40, 8:12] = 3
    assert l5_mask({"source": "vb3"}, lab) is None  # not said: unknown
    assert np.array_equal(l5_mask({"source": "vb3", "lowest_is_l5": True}, lab), lab == 3)
    ph = np.zeros_like(lab)
    ph[20:35] = level_value("L4")
    ph[45:60] = level_value("L5")
    ph[70:85] = level_value("S1")
    assert np.array_equal(l5_mask({"source": "phantom"}, ph), ph == level_value("L5"))
    img = np.where(lab > 0, 300.0, 100.0).astype(np.float32)
    aff = np.array([[0, 0, 4.0, 0], [0, -1.5, 0, 0], [-1.5, 0, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "l.nii.gz")
    row = {"image_path": str(tmp_path / "i.nii.gz"), "labels_path": str(tmp_path / "l.nii.gz"), "lowest_is_l5": True}
    slices = case_slices(row)
    mid = slices[len(slices) // 2]
    assert mid[4] and mid[3].any() and (mid[3] <= mid[1]).all()  # L5 is part of the body target
    assert mid[3].sum() * 2 == pytest.approx(mid[1].sum(), rel=0.1)  # one of the two bodies


def test_sample_batch_level_channel_is_known_only_where_the_slice_knows_its_l5():
    from pipeline.training.train_unet import sample_batch

    x, y, m = _slice(0.2, (slice(16, 40), slice(20, 44)), shape=(64, 64))
    l5 = np.zeros_like(y)
    l5[30:40] = y[30:40]
    known_l5 = (x, y, m, l5, True)
    unknown_l5 = (x, y, m, l5, False)
    _, yb, mb = sample_batch([known_l5], [], np.random.default_rng(0), batch=6, patch=32, level_channel=True)
    assert yb.shape == mb.shape == (6, 2, 32, 32)
    assert yb[:, 1].sum() > 0 and (yb[:, 1] <= yb[:, 0] + 1e-6).mean() > 0.99  # L5 lies inside the body
    assert mb[:, 1].sum() > 0
    _, yb, mb = sample_batch([unknown_l5], [], np.random.default_rng(0), batch=6, patch=32, level_channel=True)
    assert not mb[:, 1].any() and not yb[:, 1].any()
    _, yb, mb = sample_batch([(x, y, m)], [], np.random.default_rng(0), batch=2, patch=32)
    assert yb.shape == (2, 1, 32, 32)  # the cascade net: body only


def test_pseudo_sacrum_takes_the_body_sized_piece_behind_and_one_level_below_the_lowest_annotated_body():
    from pipeline.training.train_unet import pseudo_sacrum

    sp = (1.5, 1.5, 4.0)  # working frame (I, P, R): rows head -> foot, columns front -> back
    lab = np.zeros((160, 80, 8), np.int16)
    for i, top in enumerate((10, 30, 50)):  # three annotated bodies, 30 mm apart (20 rows)
        lab[top:top + 14, 30:50, 2:6] = i + 1
    seg = np.zeros_like(lab)
    seg[10:24, 30:50, 2:6] = 1  # the annotated bodies, found again: not candidates
    seg[71:85, 36:56, 2:6] = 2  # S1: one spacing below, a little behind, 14 x 20 x 4 voxels = 10.1 ml
    seg[71:85, 8:28, 2:6] = 3  # as large, as low, but in front (pelvis)
    seg[88:92, 40:44, 3:4] = 4  # a fragment
    seg[120:134, 36:56, 2:6] = 5  # far below (S2 / S3)
    s1 = pseudo_sacrum(lab, seg, sp)
    assert s1 is not None and np.array_equal(s1, seg == 2)
    seg[seg == 2] = 0
    assert pseudo_sacrum(lab, seg, sp) is None  # the pelvic blob, fragment and far piece never stand in
    seg[68:85, 36:56, 2:6] = 6  # S1 again, but touching the lowest annotated body: part of it, not the sacrum
    seg[50:64, 30:50, 2:6] = 6
    assert pseudo_sacrum(lab, seg, sp) is None
    assert pseudo_sacrum(lab[:, :, :] * (lab == 1), seg, sp) is None  # one annotated body: no spacing to go by


def test_a_few_training_steps_lower_the_loss_and_export_a_net_onnx_runtime_runs(tmp_path):
    pytest.importorskip("torch", reason="PyTorch is only needed to train (pip install -e '.[train]')")
    pytest.importorskip("onnx", reason="exporting needs the onnx package (pip install -e '.[train]')")
    import torch

    from pipeline.training.train_unet import build_net, export_onnx, fit, masked_loss, sample_batch

    rng = np.random.default_rng(1)
    real = []
    for _ in range(4):
        x, y, m = _slice(0.2, (slice(16, 40), slice(20, 44)), shape=(64, 64))
        x[:, y] = 0.9
        real.append((x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), y, m))
    xb, yb, mb = (torch.from_numpy(a) for a in sample_batch(real, [], np.random.default_rng(2), batch=8, patch=32))
    torch.manual_seed(0)
    with torch.no_grad():
        before = float(masked_loss(build_net().eval()(xb), yb, mb))
    net = fit(real, [], iters=40, threads=1, log_every=0)
    with torch.no_grad():
        after = float(masked_loss(net(xb), yb, mb))
    assert after < before
    path = tmp_path / "net.onnx"
    export_onnx(net, path)
    prob = unet.run_net(unet.load_session(str(path)), np.stack([s[0] for s in real]))
    with torch.no_grad():
        ref = torch.sigmoid(net(torch.from_numpy(np.stack([s[0] for s in real])))).numpy()[:, 0]
    np.testing.assert_allclose(prob, ref, atol=1e-4)
    # the one-pass net's second output (L5) trains and exports too
    real2 = [(x, y, m, y & (np.arange(64)[:, None] >= 28), True) for x, y, m in real]
    net2 = fit(real2, [], iters=5, threads=1, log_every=0, outputs=2)
    export_onnx(net2, tmp_path / "net2.onnx")
    both = unet.run_net(unet.load_session(str(tmp_path / "net2.onnx")), np.stack([s[0] for s in real]),
                        all_channels=True)
    assert both.shape == (4, 2, 64, 64)


def test_train_unet_refuses_a_source_no_case_has_before_loading_anything(tmp_path, capsys):
    from pipeline.training.train_unet import main

    cases = tmp_path / "cases.csv"
    cases.write_text("case,image,labels\nvb1-01,missing.nii.gz,missing_labels.nii.gz\n")
    with pytest.raises(SystemExit) as exc:
        main([str(cases), "--source", "vb9", "--out", str(tmp_path / "net.onnx")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "vb9" in err and "vb1" in err
    with pytest.raises(SystemExit) as exc:  # an empty source is no source: it would train on every case
        main([str(cases), "--source", "", "--out", str(tmp_path / "net.onnx")])
    assert exc.value.code == 2 and "''" in capsys.readouterr().err
    assert not (tmp_path / "net.onnx").exists()


def test_case_slices_are_cached_once_per_case_and_read_back_equal(tmp_path, monkeypatch):
    from pipeline.training import train_unet

    made = []

    def fake_slices(row):
        made.append(row["case"])
        rng = np.random.default_rng(len(made))
        return [(rng.random((3, 6, 7)).astype(np.float32), rng.random((6, 7)) > 0.5, np.ones((6, 7), bool),
                 rng.random((6, 7)) > 0.8, bool(i)) for i in range(2)]

    monkeypatch.setattr(train_unet, "case_slices", fake_slices)
    first = train_unet.cached_case_slices({"case": "vb9-01", "pseudo_s1": True}, tmp_path)
    again = train_unet.cached_case_slices({"case": "vb9-01", "pseudo_s1": True}, tmp_path)
    assert made == ["vb9-01"]  # prepared once, then read from the cache
    assert [p.name for p in tmp_path.iterdir()] == ["vb9-01_s11_l50.npz"]  # no temp file left behind
    for a, b in zip(first, again, strict=True):
        assert len(a) == len(b) == 5 and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert [s[4] for s in again] == [False, True]
    train_unet.cached_case_slices({"case": "vb9-01", "pseudo_s1": False}, tmp_path)
    assert made == ["vb9-01", "vb9-01"]  # the pseudo-S1 choice is part of the key

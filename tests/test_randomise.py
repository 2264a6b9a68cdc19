"""Domain randomisation of training crops (pipeline.training.randomise) and its use in the U-Net's batches."""

from __future__ import annotations

import numpy as np

from pipeline.training import randomise


def test_random_lookup_maps_equal_intensities_equally_and_reorders_tissues():
    x = np.array([0.1, 0.1, 0.5, 0.9, 0.9], np.float32)
    orders = set()
    for seed in range(20):
        y = randomise.random_lookup(x, np.random.default_rng(seed))
        assert y[0] == y[1] and y[3] == y[4]  # one tissue, one brightness: texture and edges survive
        assert ((y >= 0) & (y <= 1)).all()
        orders.add(tuple(np.argsort(y[[0, 2, 3]])))
    assert len(orders) >= 4  # dark / mid / bright tissues come out in many brightness orders, not only the input's


def test_bias_field_is_smooth_positive_and_centred_on_one():
    fields = [randomise.bias_field((96, 128), np.random.default_rng(s)) for s in range(30)]
    assert all(f.shape == (96, 128) and (f > 0).all() for f in fields)
    logs = np.log(np.stack(fields))
    assert abs(float(logs.mean())) < 0.1
    assert 0.1 < float(logs.std()) < 0.6  # BIAS_LOG_SD = 0.3: neither flat nor wild
    steps = np.abs(np.diff(logs, axis=2)).max()
    assert steps < 0.1  # a coil's sensitivity varies over centimetres, not from pixel to pixel


def test_randomised_crop_is_normalised_zero_outside_the_slice_and_differs_from_the_input():
    rng = np.random.default_rng(3)
    x = np.zeros((3, 64, 64), np.float32)
    x[:, 16:48, 20:44] = 0.8  # a bright "body" on a mid-grey background
    x[:, :, :] += 0.3
    inside = np.ones((64, 64), bool)
    inside[:, 56:] = False  # the crop runs past the slice's edge
    y = randomise.randomise_crop(x, inside, rng)
    assert y.shape == x.shape and y.dtype == np.float32
    assert (y[:, :, 56:] == 0).all()
    fg = y[:, inside]
    assert 0.5 < np.percentile(fg, 99) < 1.6  # the pipeline's normalisation: foreground's 98th percentile ~ 1
    same = randomise.randomise_crop(x, inside, np.random.default_rng(3))
    np.testing.assert_array_equal(y, same)  # reproducible from the seed
    assert not np.allclose(y[:, inside], x[:, inside], atol=0.05)


def test_sample_batch_randomises_images_but_never_the_labels():
    from pipeline.training.train_unet import sample_batch

    rng = np.random.default_rng(0)
    body = np.zeros((80, 90), bool)
    body[30:50, 30:60] = True
    img = np.stack([np.where(body, 0.9, 0.3)] * 3).astype(np.float32) + rng.normal(0, 0.02, (3, 80, 90)).astype(np.float32)
    real = [(img, body, np.ones_like(body))]
    plain = sample_batch(real, [], np.random.default_rng(5), batch=1, patch=64)
    mixed = sample_batch(real, [], np.random.default_rng(5), batch=1, patch=64, randomise=1.0)
    np.testing.assert_array_equal(plain[1], mixed[1])  # same crop, same label
    np.testing.assert_array_equal(plain[2], mixed[2])
    assert not np.allclose(plain[0], mixed[0], atol=0.05)
    assert plain[1].any()  # the crop holds the body (body_share 0.8 and this seed)

"""Per-disc Modic model (pipeline/disc_model.py): features on a synthetic study with known values, the shipped
model loads and scores, classify uses it only when ``classification.disc_model`` is ``model``."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.classify import classify_study
from pipeline.config import Config
from pipeline.disc_model import MODEL_PATH, disc_features, feature_names, load_disc_model
from pipeline.measure import ZONE_CORE, ZONE_INFERIOR, ZONE_SUPERIOR, StudyMeasurements

# Three bodies of 30 rows x 20 columns (1 mm pixels) on one sagittal slice, discs of 10 and 20 rows between them.
TOPS = (0, 40, 90)
HEIGHT, WIDTH = 30, 20


def synthetic_study() -> StudyMeasurements:
    """Normal marrow (ratio 1.0) except: L4's inferior band T1 1.5, T2 1.2 (fatty), L5's superior band T2 0.5."""
    shape = (TOPS[-1] + HEIGHT, WIDTH, 1)
    ii, jj = np.meshgrid(np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
    body, i, j = [], [], []
    for b, top in enumerate(TOPS):
        body.append(np.full(ii.size, b))
        i.append(ii.ravel() + top)
        j.append(jj.ravel())
    body, i, j = np.concatenate(body), np.concatenate(i), np.concatenate(j)
    top = np.array(TOPS)[body]
    depth_sup = (i - top).astype(np.float32)  # mm from the body's top row (the measure's convention)
    depth_inf = (top + HEIGHT - 1 - i).astype(np.float32)
    rim = np.minimum(j, WIDTH - 1 - j).astype(np.float32) + 0.5
    zone = np.where(np.minimum(depth_sup, depth_inf) >= 10, ZONE_CORE,
                    np.where(depth_sup <= depth_inf, ZONE_SUPERIOR, ZONE_INFERIOR))
    r1 = np.ones(body.size, dtype=np.float32)
    r2 = np.ones(body.size, dtype=np.float32)
    r1[(body == 0) & (depth_inf + 0.5 <= 10)] = 1.5
    r2[(body == 0) & (depth_inf + 0.5 <= 10)] = 1.2
    r2[(body == 1) & (depth_sup + 0.5 <= 10)] = 0.5
    levels = ["L4", "L5", "S1"]
    discs = [{"level": f"{a}-{b}", "upper": a, "lower": b, "height_mm": h, "t2_median": 100.0 * t,
              "t2_ratio_to_marrow": t, "t2_ratio_to_discs": t / 1.5, "bright": False}
             for (a, b), h, t in ((("L4", "L5"), 10.0, 2.0), (("L5", "S1"), 20.0, 1.0))]
    return StudyMeasurements(
        levels=levels, values=np.array([4, 5, 6]), spacing=(1.0, 1.0, 1.0), shape=shape,
        vertebrae=[{"level": lv, "height_ratios": {}} for lv in levels], discs=discs,
        reference={"T1": 100.0, "T2": 100.0}, zone_map=np.zeros(shape, dtype=np.int16),
        vox_index=np.ravel_multi_index((i, j, np.zeros_like(i)), shape), vox_body=body, vox_zone=zone,
        vox_depth_sup_mm=depth_sup, vox_depth_inf_mm=depth_inf, vox_col_height_mm=np.full(body.size, 30.0),
        vox_rim_mm=rim, vox_ratio={"T1": r1, "T2": r2, "STIR": None},
        body_voxels=np.bincount(body), labelling_confidence=1.0)


def test_disc_features_on_a_synthetic_study_have_the_planted_values():
    x = disc_features(synthetic_study())
    f = dict(zip(feature_names(), range(x.shape[1]), strict=True))
    assert x.shape == (2, len(feature_names()))
    d0, d1 = x[0], x[1]
    # disc L4-L5: upper band (L4 inferior) T1 1.5 / T2 1.2, lower band (L5 superior) T2 0.5
    assert d0[f["max_t1_q50"]] == pytest.approx(1.5) and d0[f["min_t1_q50"]] == pytest.approx(1.0)
    assert d0[f["diff_t1_q50"]] == pytest.approx(0.5)
    assert d0[f["max_t1_gt14"]] == pytest.approx(1.0) and d0[f["min_t1_gt14"]] == pytest.approx(0.0)
    assert d0[f["max_t2_lt06"]] == pytest.approx(1.0) and d0[f["min_t2_q50"]] == pytest.approx(0.5)
    assert d0[f["max_t1_core"]] == pytest.approx(1.5)  # band 1.5 against a core of 1.0
    assert d0[f["max_t1_p0"]] == pytest.approx(1.5)  # 2-4 mm from the endplate
    assert d0[f["max_t2_q50"]] == pytest.approx(1.2) and d0[f["diff_t2_q50"]] == pytest.approx(0.7)
    assert d0[f["max_t1hi_t2iso"]] == pytest.approx(1.0)  # T1 1.5 with T2 1.2: the no-STIR Modic II rule
    # disc L5-S1: all normal
    assert d1[f["max_t1_q50"]] == pytest.approx(1.0) and d1[f["max_t2_lt06"]] == pytest.approx(0.0)
    # disc features, position from the sacrum, and context = the other disc's values
    assert d0[f["disc_t2_marrow"]] == 2.0 and d0[f["disc_height"]] == 10.0
    assert d0[f["disc_height_rel"]] == pytest.approx(10.0 / 15.0)
    assert (d0[f["ivd"]], d1[f["ivd"]]) == (2, 1)
    assert d0[f["ctx_max_t1_q50"]] == pytest.approx(1.0) and d1[f["ctx_max_t1_q50"]] == pytest.approx(1.5)
    assert d0[f["ctx_disc_height"]] == 20.0 and d1[f["ctx_disc_height"]] == 10.0


def test_shipped_model_loads_and_scores():
    assert MODEL_PATH.is_file()
    model = load_disc_model()
    assert 0.0 < model.threshold < 1.0
    p = model.score(disc_features(synthetic_study()))
    assert p.shape == (2,) and np.all((p >= 0) & (p <= 1))
    # all-unmeasured rows (NaN) are imputed, not an error
    assert np.isfinite(model.score(np.full((1, len(feature_names())), np.nan))).all()


def test_classify_uses_the_model_only_when_configured():
    meas = synthetic_study()
    cfg = Config().classification
    assert cfg.disc_model == "model"
    by_model = classify_study(meas, cfg, "T2").discs
    expected = load_disc_model().score(disc_features(meas))
    assert [d["modic"]["score"] for d in by_model] == pytest.approx(expected, abs=1e-4)
    thr = load_disc_model().threshold
    for d, p in zip(by_model, expected, strict=True):
        assert (d["modic"]["modic_type"] != "0") == (p >= thr)
    cfg.disc_model = "thresholds"
    by_rules = classify_study(meas, cfg, "T2").discs
    # L4 inferior band: T1 1.5 with T2 1.2 -> Modic II by the threshold rules, with its band fraction as score
    assert by_rules[0]["modic"]["modic_type"] == "II" and by_rules[0]["modic"]["score"] > 0.5
    assert by_rules[1]["modic"]["modic_type"] == "0"


def test_each_body_model_gets_the_disc_model_trained_on_its_outlines():
    """The one-pass net's bodies give other band features: its own disc model scores them; the cascade and the
    pixel classifier share the default one."""
    from pipeline.disc_model import ONEPASS_MODEL_PATH, model_path

    assert model_path("onepass") == ONEPASS_MODEL_PATH != MODEL_PATH
    assert model_path("unet") == model_path("classifier") == MODEL_PATH
    onepass = load_disc_model(body_model="onepass")
    assert onepass.info["body_model"] == "onepass"  # recorded by train_modic from the config it measured with
    meas = synthetic_study()
    expected = onepass.score(disc_features(meas))
    assert not np.allclose(expected, load_disc_model().score(disc_features(meas)))  # not the same model twice
    by_onepass = classify_study(meas, Config().classification, "T2", body_model="onepass").discs
    assert [d["modic"]["score"] for d in by_onepass] == pytest.approx(expected, abs=1e-4)


def test_model_trained_on_other_features_is_refused(tmp_path):
    import joblib

    bundle = joblib.load(MODEL_PATH)
    bundle["features"] = bundle["features"][:-1]
    path = tmp_path / "old.joblib"
    joblib.dump(bundle, path)
    with pytest.raises(ValueError, match="retrain"):
        load_disc_model(str(path))


def test_training_cross_validation_groups_patients_and_learns_a_planted_signal():
    """train_modic's CV on synthetic rows: one informative feature, patients with 5 discs each; the threshold is
    chosen on training folds only and the out-of-fold calls recover the signal (and not from noise)."""
    from sklearn.metrics import balanced_accuracy_score

    from pipeline.training.train_modic import choose_threshold, cross_validate

    rng = np.random.RandomState(0)
    groups = np.repeat([f"p{i}" for i in range(40)], 5)
    y = rng.rand(groups.size) < 0.35
    x = rng.randn(groups.size, 6)
    x[:, 0] += 2.0 * y  # the planted signal
    t = choose_threshold(x, y.astype(int), groups, c=0.1)
    assert 0.0 < t < 1.0
    (p, call), = cross_validate(x, y.astype(int), groups, c=0.1, repeats=1)
    assert balanced_accuracy_score(y, call) > 0.75
    (_, noise_call), = cross_validate(x[:, 1:], y.astype(int), groups, c=0.1, repeats=1)
    assert balanced_accuracy_score(y, noise_call) < 0.65


def test_training_cache_is_reused_only_under_the_same_config(tmp_path, monkeypatch):
    """A cached case measured under one body model is measured again under another (never mixed in silently)."""
    from pipeline.training import train_modic

    calls = []

    def fake_rows(row, cfg):
        calls.append(cfg.segmentation.body_model)
        return {"case": row["case"], "error": "FAKE"}

    monkeypatch.setattr(train_modic, "case_rows", fake_rows)
    row = {"case": "c1", "paths": {}}
    cascade, onepass = Config(), Config()
    onepass.segmentation.body_model = "onepass" if cascade.segmentation.body_model != "onepass" else "unet"
    train_modic._extract(row, cascade, tmp_path)
    train_modic._extract(row, cascade, tmp_path)  # cached
    assert calls == [cascade.segmentation.body_model]
    train_modic._extract(row, onepass, tmp_path)  # another config: measured again
    assert calls == [cascade.segmentation.body_model, onepass.segmentation.body_model]
    train_modic._extract(row, cascade, tmp_path)  # ... without evicting the first config's rows
    train_modic._extract(row, onepass, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.glob("c1_*.pkl"))) == 2


def test_training_rejects_a_missing_config(tmp_path):
    from pipeline.training.train_modic import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tmp_path / "missing.yaml"), "--no-save", "--repeats", "0"])
    assert exc.value.code == 2


def test_a_disc_model_is_trained_on_one_body_models_features():
    """``auto`` resolves per case, so train_modic saves the disc model of the body model the cases really ran and
    refuses a mix (one model's outlines differ from the other's: their features must not be pooled)."""
    from pipeline.training.train_modic import trained_body_model

    spider_like = [{"x": 1, "body_model": "onepass"}, {"x": 1, "body_model": "onepass"}, {"case": "failed"}]
    assert trained_body_model(spider_like, "auto") == "onepass"
    assert trained_body_model([{"x": 1}], "unet") == "unet"  # rows cached before the field: the configured model
    with pytest.raises(SystemExit, match="different body models"):
        trained_body_model(spider_like + [{"x": 1, "body_model": "unet"}], "auto")
    with pytest.raises(SystemExit, match="unknown"):  # never saved as the disc model of "auto"
        trained_body_model([{"x": 1}], "auto")

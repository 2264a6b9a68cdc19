"""Measurement and classification on small synthetic volumes with planted truth (no DICOM)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.classify import classify_study
from pipeline.config import ClassificationConfig, MeasurementConfig
from pipeline.measure import ZONE_CORE, ZONE_INFERIOR, ZONE_SUPERIOR, group_quantiles, measure_study
from pipeline.types import Segmentation, VertebralBody, level_value

LEVELS = ["L1", "L2", "L3", "L4", "L5"]
BODY_ROWS = [(4, 24), (30, 50), (56, 76), (82, 102), (108, 128)]  # 20 mm bodies, 6 mm discs
COLS = (6, 40)
SLICES = (1, 8)
NORMAL = {"T1": 100.0, "T2": 50.0, "STIR": 20.0}


def make_case(modify=None):
    shape = (134, 46, 9)
    labels = np.zeros(shape, np.int16)
    imgs = {k: np.full(shape, 5.0, np.float32) for k in NORMAL}
    for lv, (r0, r1) in zip(LEVELS, BODY_ROWS, strict=True):
        labels[r0:r1, COLS[0]:COLS[1], SLICES[0]:SLICES[1]] = level_value(lv)
        for k, v in NORMAL.items():
            imgs[k][r0:r1, COLS[0]:COLS[1], SLICES[0]:SLICES[1]] = v
    for (_, a1), (b0, _) in zip(BODY_ROWS[:-1], BODY_ROWS[1:], strict=True):  # discs
        imgs["T2"][a1:b0, COLS[0]:COLS[1], SLICES[0]:SLICES[1]] = 80.0
    if modify:
        modify(labels, imgs)
    bodies = [VertebralBody(lv, level_value(lv), (float(np.mean(r)), 23.0, 4.0), 0.0)
              for lv, r in zip(LEVELS, BODY_ROWS, strict=True) if (labels == level_value(lv)).any()]
    return Segmentation(labels, bodies, 1.0, []), imgs


def run(seg, imgs, fluid="STIR", mcfg=None, ccfg=None):
    meas = measure_study(imgs, seg, (1.0, 1.0, 1.0), mcfg or MeasurementConfig())
    return meas, classify_study(meas, ccfg or ClassificationConfig(), fluid)


def test_group_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=1000).astype(np.float32)
    groups = rng.integers(0, 7, size=1000)
    q = group_quantiles(vals, groups, 8, qs=(0.1, 0.5, 0.9))
    for g in range(7):
        np.testing.assert_allclose(q[g], np.percentile(vals[groups == g], [10, 50, 90]), rtol=1e-5)
    assert np.isnan(q[7]).all()


def test_zones_have_the_configured_thickness():
    seg, imgs = make_case()
    meas, _ = run(seg, imgs, mcfg=MeasurementConfig(endplate_band_mm=5.0))
    zm = meas.zone_map[:, 23, 4]
    r0, r1 = BODY_ROWS[1]
    assert (zm[r0:r0 + 5] == 2 * 10 + ZONE_SUPERIOR).all() and zm[r0 + 5] != 2 * 10 + ZONE_SUPERIOR
    assert (zm[r1 - 5:r1] == 2 * 10 + ZONE_INFERIOR).all() and zm[r1 - 6] != 2 * 10 + ZONE_INFERIOR
    # core leaves core_margin_fraction (0.3) of the 20 mm height at each end
    core_rows = np.flatnonzero(zm == 2 * 10 + ZONE_CORE)
    assert core_rows.min() - r0 >= 6 and r1 - 1 - core_rows.max() >= 6


def test_stats_equal_independent_percentiles_and_ratios_to_reference():
    rng = np.random.default_rng(1)
    seg, imgs = make_case()
    imgs["T1"] += rng.normal(0, 5, imgs["T1"].shape).astype(np.float32)
    meas, _ = run(seg, imgs)
    zm = meas.zone_map
    for b, lv in enumerate(LEVELS):
        for zname, code in (("core", ZONE_CORE), ("superior", ZONE_SUPERIOR), ("inferior", ZONE_INFERIOR)):
            vals = imgs["T1"][zm == level_value(lv) * 10 + code]
            st = meas.vertebrae[b]["zones"][zname]["signal"]["T1"]
            p10, p25, p50, p75, p90 = np.percentile(vals, [10, 25, 50, 75, 90])
            assert st["median"] == pytest.approx(p50, rel=1e-5)
            assert st["p10"] == pytest.approx(p10, rel=1e-5) and st["p90"] == pytest.approx(p90, rel=1e-5)
            assert st["iqr"] == pytest.approx(p75 - p25, rel=1e-4)
    assert meas.reference["T1"] == pytest.approx(100.0, abs=1.0)
    assert meas.reference["STIR"] == pytest.approx(20.0)


def test_reference_excludes_an_abnormal_core():
    def bright_core(labels, imgs):
        imgs["T1"][60:72, 10:36, 2:7] = 300.0  # L3 core: fatty (abnormal)

    seg, imgs = make_case(bright_core)
    meas, _ = run(seg, imgs)
    assert "L3" not in meas.reference["levels_used"] and len(meas.reference["levels_used"]) == 4
    assert meas.reference["T1"] == pytest.approx(100.0)
    assert not meas.vertebrae[2]["in_reference"]


def test_heights_of_a_wedge_body():
    def wedge(labels, imgs):
        r0, r1 = BODY_ROWS[2]
        for c in range(COLS[0], COLS[1]):  # anterior (low column index) shorter: 10 mm -> 20 mm
            h = int(round(10 + 10 * (c - COLS[0]) / (COLS[1] - COLS[0] - 1)))
            labels[r0:r1 - h, c, SLICES[0]:SLICES[1]] = 0
            for k in imgs:
                imgs[k][r0:r1 - h, c, SLICES[0]:SLICES[1]] = 5.0

    seg, imgs = make_case(wedge)
    meas, _ = run(seg, imgs)
    h = meas.vertebrae[2]["heights_mm"]
    assert h["anterior"] < h["middle"] < h["posterior"]
    assert meas.vertebrae[2]["height_ratios"]["anterior_to_posterior"] < 0.75
    assert meas.vertebrae[0]["height_ratios"]["anterior_to_posterior"] == pytest.approx(1.0, abs=0.06)


def _band(level, side, values, depth=6):
    b = LEVELS.index(level)
    r0, r1 = BODY_ROWS[b]
    rows = slice(r0, r0 + depth) if side == "superior" else slice(r1 - depth, r1)

    def modify(labels, imgs):
        for k, v in values.items():
            imgs[k][rows, COLS[0]:COLS[1], SLICES[0]:SLICES[1]] = v
    return modify


@pytest.mark.parametrize("mtype,values", [
    ("I", {"T1": 50.0, "T2": 90.0, "STIR": 60.0}),
    ("II", {"T1": 160.0, "T2": 60.0, "STIR": 8.0}),
    ("III", {"T1": 40.0, "T2": 25.0, "STIR": 8.0}),
])
def test_each_modic_type_found_at_the_planted_endplate_only(mtype, values):
    seg, imgs = make_case(_band("L4", "inferior", values))
    _, f = run(seg, imgs)
    for v in f.vertebrae:
        for side, ep in v["endplates"].items():
            expected = mtype if (v["level"], side) == ("L4", "inferior") else "0"
            assert ep["modic_type"] == expected, (v["level"], side, ep)
    ep = f.vertebrae[3]["endplates"]["inferior"]
    assert 20 <= ep["extent_height_pct"] <= 40  # 6 mm band of a 20 mm body
    assert (f.class_map == {"I": 1, "II": 2, "III": 3}[mtype]).sum() > 0


def test_mixed_type_I_II():
    def mixed(labels, imgs):
        _band("L5", "superior", {"T1": 50.0, "T2": 90.0, "STIR": 60.0}, depth=6)(labels, imgs)
        r0 = BODY_ROWS[4][0]
        imgs["T1"][r0:r0 + 6, 23:COLS[1], :] = np.where(labels[r0:r0 + 6, 23:COLS[1], :] > 0, 160.0, 5.0)
        imgs["STIR"][r0:r0 + 6, 23:COLS[1], :] = np.where(labels[r0:r0 + 6, 23:COLS[1], :] > 0, 8.0, 5.0)

    seg, imgs = make_case(mixed)
    _, f = run(seg, imgs)
    assert f.vertebrae[4]["endplates"]["superior"]["modic_type"] == "I/II"


def test_fracture_flag_needs_edema_and_height_loss():
    def wedge_edema(labels, imgs, edema=True):
        r0, r1 = BODY_ROWS[1]
        labels[r0:r0 + 7, COLS[0]:COLS[0] + 12, :] = 0
        if edema:
            inside = labels[r0:r1] > 0
            imgs["T1"][r0:r1][inside] = 55.0
            imgs["STIR"][r0:r1][inside] = 70.0
            imgs["T2"][r0:r1][inside] = 90.0

    seg, imgs = make_case(wedge_edema)
    _, f = run(seg, imgs)
    codes = {(fl["code"], tuple(fl["levels"])) for fl in f.flags}
    assert ("POSSIBLE_ACUTE_FRACTURE", ("L2",)) in codes
    assert f.vertebrae[1]["edema"]["present"] and f.vertebrae[1]["edema"]["extent_volume_pct"] > 80
    assert all("for review" in fl["message"] for fl in f.flags)
    seg, imgs = make_case(lambda lab, im: wedge_edema(lab, im, edema=False))
    _, f = run(seg, imgs)
    assert not any(fl["code"] == "POSSIBLE_ACUTE_FRACTURE" for fl in f.flags)


def test_infection_flag_bilateral_edema_and_bright_disc():
    def infection(labels, imgs):
        _band("L3", "inferior", {"T1": 50.0, "T2": 90.0, "STIR": 60.0}, depth=8)(labels, imgs)
        _band("L4", "superior", {"T1": 50.0, "T2": 90.0, "STIR": 60.0}, depth=8)(labels, imgs)
        a1, b0 = BODY_ROWS[2][1], BODY_ROWS[3][0]
        imgs["T2"][a1:b0, COLS[0]:COLS[1], SLICES[0]:SLICES[1]] = 200.0

    seg, imgs = make_case(infection)
    _, f = run(seg, imgs)
    inf = [fl for fl in f.flags if fl["code"] == "POSSIBLE_INFECTION"]
    assert len(inf) == 1 and inf[0]["levels"] == ["L3", "L4"]
    assert [d["bright"] for d in f.discs] == [False, False, True, False]


def test_atypical_edema_in_the_core_only():
    def core_edema(labels, imgs):
        imgs["STIR"][64:69, 6:40, 1:8] = 70.0  # the middle 5 mm of the 20 mm L3 body

    seg, imgs = make_case(core_edema)
    _, f = run(seg, imgs)
    assert f.vertebrae[2]["edema"]["present"] and not f.vertebrae[2]["edema"]["adjacent_to_endplate"]
    assert [fl["code"] for fl in f.flags] == ["ATYPICAL_EDEMA"]


def test_zero_reference_gives_no_nan_and_a_warning():
    seg, imgs = make_case()
    imgs["T1"][:] = 0.0
    meas, f = run(seg, imgs)
    assert meas.reference["T1"] is None
    assert any("reference" in w for w in meas.warnings + f.warnings)
    import json

    text = json.dumps([f.vertebrae, f.discs, f.reference], allow_nan=False)  # raises on NaN
    assert "NaN" not in text
    assert all(ep["modic_type"] == "0" for v in f.vertebrae for ep in v["endplates"].values())


def test_t2_only_fluid_lowers_confidence():
    seg, imgs = make_case(_band("L4", "inferior", {"T1": 50.0, "T2": 90.0, "STIR": 60.0}))
    _, f_stir = run(seg, imgs, "STIR")
    _, f_t2 = run(seg, imgs, "T2")
    assert f_t2.vertebrae[3]["endplates"]["inferior"]["modic_type"] == "I"
    assert f_t2.vertebrae[3]["edema"]["source"] == "T2"
    assert f_t2.vertebrae[3]["edema"]["confidence"] < f_stir.vertebrae[3]["edema"]["confidence"]
    assert any("T2" in w for w in f_t2.warnings)


def test_vertebra_records_validate_against_the_schema():
    import jsonschema

    from pipeline.report.schema import load_schema

    seg, imgs = make_case(_band("L4", "inferior", {"T1": 50.0, "T2": 90.0, "STIR": 60.0}))
    _, f = run(seg, imgs)
    schema = load_schema("report.schema.json")
    for name, items in (("vertebra", f.vertebrae), ("disc", f.discs), ("flag", f.flags)):
        validator = jsonschema.Draft202012Validator({**schema["$defs"][name], "$defs": schema["$defs"]})
        for item in items:
            assert not list(validator.iter_errors(item)), (name, item)


def test_lateral_depth_counts_slices_to_the_outermost_slice_of_each_line():
    def narrower_row(labels, imgs):
        labels[40, 20, 1] = labels[40, 20, 7] = 0  # this (row, AP) line of L2 spans slices 2-6 only

    seg, imgs = make_case(narrower_row)
    meas = measure_study(imgs, seg, (1.0, 1.0, 4.0), MeasurementConfig())
    lat = np.full(seg.labels.shape, -1.0, np.float32)
    lat.reshape(-1)[meas.vox_index] = meas.vox_lateral_mm
    assert lat[40, 23, 1:8].tolist() == [0.0, 4.0, 8.0, 12.0, 8.0, 4.0, 0.0]
    assert lat[40, 20, 2:7].tolist() == [0.0, 4.0, 8.0, 4.0, 0.0]
    # one sagittal slice: the lateral surface is not seen, nothing is lateral
    one = Segmentation(seg.labels[:, :, 4:5].copy(), seg.bodies, 1.0, [])
    meas1 = measure_study({k: v[:, :, 4:5].copy() for k, v in imgs.items()}, one, (1.0, 1.0, 4.0), MeasurementConfig())
    assert np.isinf(meas1.vox_lateral_mm).all()


def test_partial_volume_at_the_lateral_surface_is_not_edema():
    """A 4 mm slice on a body's lateral edge averages marrow with the STIR-bright tissue beside it: a segmentation
    that reaches one slice too far must not turn that into edema, while the same signal inside the body is."""
    def bright_outer_slices(labels, imgs):
        imgs["STIR"][30:50, 6:40, 1] = imgs["STIR"][30:50, 6:40, 7] = 40.0  # L2's two outermost slices, 2x normal

    def bright_inner_slice(labels, imgs):
        imgs["STIR"][30:50, 6:40, 4] = 40.0  # the same signal in L2's middle slice

    spacing = (1.0, 1.0, 4.0)
    seg, imgs = make_case(bright_outer_slices)
    meas = measure_study(imgs, seg, spacing, MeasurementConfig())
    outer = (meas.vox_body == 1) & (meas.vox_ratio["STIR"] > ClassificationConfig().fluid_high)
    # the bright outer slices alone are well over the edema fraction: only the surface rule keeps them out
    assert outer.sum() / meas.body_voxels[1] > 2 * ClassificationConfig().edema_min_fraction
    f = classify_study(meas, ClassificationConfig(), "STIR")
    assert not f.vertebrae[1]["edema"]["present"]
    assert (f.class_map[:, :, [1, 7]] == 0).all()
    seg, imgs = make_case(bright_inner_slice)
    f = classify_study(measure_study(imgs, seg, spacing, MeasurementConfig()), ClassificationConfig(), "STIR")
    assert f.vertebrae[1]["edema"]["present"]
    assert [v["level"] for v in f.vertebrae if v["edema"]["present"]] == ["L2"]


def test_a_body_two_slices_thick_keeps_its_interior_and_its_edema():
    """With fewer than three slices a body's lateral surface is not resolved: the lateral rule would leave no interior,
    so it is not applied, and whole-body edema is still found."""
    def two_slices(labels, imgs):
        labels[:, :, 3:] = 0
        labels[:, :, :1] = 0  # every body on slices 1-2 only
        imgs["STIR"][30:50, 6:40, 1:3] = 60.0  # L2 fluid-bright throughout

    seg, imgs = make_case(two_slices)
    meas = measure_study(imgs, seg, (1.0, 1.0, 4.0), MeasurementConfig())
    assert np.isinf(meas.vox_lateral_mm).all()
    f = classify_study(meas, ClassificationConfig(), "STIR")
    assert f.vertebrae[1]["edema"]["present"] and f.vertebrae[1]["edema"]["extent_volume_pct"] > 90
    assert not any(v["edema"]["present"] for i, v in enumerate(f.vertebrae) if i != 1)


def test_a_body_with_no_interior_is_not_judged_for_edema():
    def thin_l3(labels, imgs):
        labels[56:76] = 0
        labels[65:68, 6:40, 1:8] = level_value("L3")  # 3 mm tall: nothing lies 2 mm from both endplates
        imgs["STIR"][65:68, 6:40, 1:8] = 60.0

    seg, imgs = make_case(thin_l3)
    meas = measure_study(imgs, seg, (1.0, 1.0, 1.0), MeasurementConfig())
    f = classify_study(meas, ClassificationConfig(), "STIR")
    l3 = f.vertebrae[2]
    assert l3["level"] == "L3" and not l3["edema"]["present"]
    assert l3["edema"]["confidence"] <= 0.1
    assert any("L3" in w and "edema not judged" in w for w in f.warnings)

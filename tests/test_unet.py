"""The U-Net body probability: input stacking, padding and chunking, column crop, the second (L5) output, the
shipped nets on phantoms and real scans, choosing the process's net. Training: tests/test_train_unet.py."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import StudyError
from pipeline.segmentation import unet


class _Input:
    name = "x"


class FakeSession:
    """Stands in for an ONNX Runtime session: logit = 10 * (middle channel - 0.5); records the input shapes."""

    def __init__(self):
        self.shapes = []

    def get_inputs(self):
        return [_Input()]

    def run(self, _outputs, feeds):
        x = feeds["x"]
        self.shapes.append(x.shape)
        return [10.0 * (x[:, 1:2] - 0.5)]


def test_context_stack_pairs_each_slice_with_its_neighbours_at_the_same_distance_in_mm():
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32), (6, 5, 20))  # value of a voxel = its slice index
    thin = unet.context_stack(ramp, 1.0, np.array([0, 10, 19]))  # 4 mm = 4 slices, clamped at the ends
    assert thin.shape == (3, 3, 6, 5)
    assert [tuple(thin[i, :, 0, 0]) for i in range(3)] == [(0, 0, 4), (6, 10, 14), (15, 19, 19)]
    thick = unet.context_stack(ramp, 4.0)  # 4 mm slices: the next slice on either side
    assert thick.shape == (20, 3, 6, 5) and tuple(thick[7, :, 0, 0]) == (6, 7, 8)
    coarse = unet.context_stack(ramp, 6.0, np.array([5]))  # never the slice itself as its own neighbour
    assert tuple(coarse[0, :, 0, 0]) == (4, 5, 6)


def test_run_net_pads_to_the_pooling_grid_runs_in_chunks_and_returns_the_sigmoid():
    rng = np.random.default_rng(0)
    x = rng.random((unet.SLICES_PER_RUN + 3, 3, 37, 50)).astype(np.float32)
    fake = FakeSession()
    out = unet.run_net(fake, x)
    assert out.shape == (x.shape[0], 37, 50)
    assert [s[0] for s in fake.shapes] == [unet.SLICES_PER_RUN, 3]
    assert all(s[2] % 16 == 0 and s[3] % 16 == 0 and s[2] >= 37 and s[3] >= 50 for s in fake.shapes)
    expected = 1.0 / (1.0 + np.exp(-10.0 * (x[:, 1] - 0.5)))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_unet_probability_stays_in_its_columns_and_interpolates_skipped_thin_slices():
    norm = np.zeros((32, 40, 13), np.float32)
    norm[:, :, :] = np.linspace(0.0, 1.0, 13)[None, None, :]  # brighter slice by slice
    fake = FakeSession()
    prob = unet.unet_probability(norm, 1.0, slice(10, 30), session=fake)
    assert prob.shape == norm.shape
    assert not prob[:, :10].any() and not prob[:, 30:].any()
    # 1 mm slices, 3 mm pitch: slices 0, 3, 6, 9, 12 go through the net, the others are interpolated
    assert sum(s[0] for s in fake.shapes) == 5
    run = 1.0 / (1.0 + np.exp(-10.0 * (np.linspace(0.0, 1.0, 13)[[0, 3, 6, 9, 12]] - 0.5)))
    np.testing.assert_allclose(prob[5, 15, [0, 3, 6, 9, 12]], run, rtol=1e-5)
    np.testing.assert_allclose(prob[5, 15, 4], run[1] + (run[2] - run[1]) / 3, rtol=1e-5)


class TwoOutputSession(FakeSession):
    """A net with a second output (the one-pass net's L5): the left slice's value, so it can be told apart."""

    def run(self, _outputs, feeds):
        x = feeds["x"]
        self.shapes.append(x.shape)
        return [np.concatenate([10.0 * (x[:, 1:2] - 0.5), 10.0 * (x[:, 0:1] - 0.5)], axis=1)]


def test_level_map_is_the_second_output_interpolated_like_the_body_and_none_for_a_one_output_net():
    norm = np.zeros((32, 40, 13), np.float32)
    norm[:, :, :] = np.linspace(0.0, 1.0, 13)[None, None, :]
    body = unet.unet_probability(norm, 1.0, slice(10, 30), session=FakeSession())
    prob, l5 = unet.unet_probability(norm, 1.0, slice(10, 30), session=TwoOutputSession(), level_map=True)
    np.testing.assert_array_equal(prob, body)  # the body channel is unchanged by the second output
    assert l5.shape == norm.shape and not l5[:, :10].any() and not l5[:, 30:].any()
    left = np.linspace(0.0, 1.0, 13)[np.clip(np.array([0, 3, 6, 9, 12]) - 4, 0, 12)]  # the slice 4 mm to the left
    run = 1.0 / (1.0 + np.exp(-10.0 * (left - 0.5)))
    np.testing.assert_allclose(l5[5, 15, [0, 3, 6, 9, 12]], run, rtol=1e-5)
    np.testing.assert_allclose(l5[5, 15, 4], run[1] + (run[2] - run[1]) / 3, rtol=1e-5)
    _, none = unet.unet_probability(norm, 1.0, slice(10, 30), session=FakeSession(), level_map=True)
    assert none is None
    two = unet.run_net(TwoOutputSession(), norm[None, :, :, :3].transpose(0, 3, 1, 2).copy(), all_channels=True)
    assert two.shape == (1, 2, 32, 40)


def test_needed_slices_come_out_as_without_the_option_and_the_others_are_skipped():
    rng = np.random.default_rng(0)
    for n_k, slice_mm in ((13, 1.0), (15, 4.0), (40, 0.9)):  # thin slices are interpolated, thick ones each run
        norm = rng.random((20, 30, n_k)).astype(np.float32)
        full = unet.unet_probability(norm, slice_mm, slice(5, 25), session=FakeSession())
        for _ in range(10):
            needed = rng.random(n_k) < 0.3
            fake = FakeSession()
            part = unet.unet_probability(norm, slice_mm, slice(5, 25), session=fake, needed=needed)
            np.testing.assert_array_equal(part[:, :, needed], full[:, :, needed])
            if slice_mm >= 3.0:
                assert sum(s[0] for s in fake.shapes) == needed.sum()  # one net slice per needed slice, no more


def test_the_net_runs_on_the_columns_near_the_spine_and_near_a_given_region_only():
    from pipeline.segmentation.grid import WORK_MM
    from pipeline.segmentation.probability import _unet_columns

    width = 200
    dist = np.broadcast_to((np.arange(width) - 80.0) * WORK_MM, (50, width))  # the column runs down column 80
    cols = _unet_columns(dist, None, width)
    half = int(unet.COLUMN_HALF_MM / WORK_MM)
    assert (cols.start, cols.stop) == (80 - half, 80 + half + 1)
    assert _unet_columns(None, None, width) == slice(0, width)  # no column found: everything
    region = np.zeros((50, width, 4), bool)
    region[10:20, 100:110, 1] = True  # e.g. the ring around the bodies T2 found, for a T1 / STIR image
    margin = int(round(24.0 / WORK_MM))
    near = _unet_columns(dist, region, width)
    assert (near.start, near.stop) == (100 - margin, min(80 + half + 1, 110 + margin))
    nowhere = _unet_columns(dist, np.zeros_like(region), width)  # an empty region: no column at all
    assert nowhere.stop == nowhere.start


def test_onepass_runs_whole_slices_and_keeps_only_the_column_it_finds(monkeypatch):
    """body_model onepass: no classifier; the net sees whole slices, the column is fitted through its own output
    and what lies beyond the cascade's reach of it (iliac bone, bowel) is dropped."""
    from pipeline.segmentation import probability
    from pipeline.segmentation.grid import WORK_MM

    fake = FakeSession()
    monkeypatch.setattr(unet, "load_session", lambda path=None, body_model="unet", int8=False: fake)
    monkeypatch.setattr(probability, "load_model", lambda: pytest.fail("onepass must not load the classifier"))
    h, w, k = 200, 240, 5
    norm = np.zeros((h, w, k), np.float32)
    for top in range(10, 190, 30):  # a column of bright "bodies" down AP column 150, 18 px apart
        norm[top:top + 22, 140:160] = 1.0
    norm[80:110, 10:30] = 1.0  # a bright blob 120 px (180 mm) in front of the column
    prob, column, l5 = probability.onepass_probability(norm, (WORK_MM, WORK_MM, 4.0))
    assert l5 is None  # a net with one output has no L5 map
    assert fake.shapes[0][0] == k and fake.shapes[0][3] >= w  # every slice, every column
    assert prob[15, 150, 2] > 0.99 and prob[95, 20, 2] == 0  # the column kept, the far blob dropped
    assert column is not None and column[15, 150, 0] and not column[15, 20, 0]
    half = int(probability.COLUMN_HALF_WIDTH_MM / WORK_MM)
    assert column[15, 150 + half - 2, 0] and not column[15, 150 + half + 3, 0]
    region = np.zeros_like(norm, bool)
    region[10:60, 130:170, 1:4] = True  # another contrast: only near the bodies T2 found
    fake.shapes.clear()
    p2, col2, _ = probability.onepass_probability(norm, (WORK_MM, WORK_MM, 4.0), region)
    assert col2 is None and not p2[~region].any() and p2[15, 150, 2] > 0.99
    assert fake.shapes[0][3] < w  # the region's columns (and the net's margin) only


def test_missing_or_corrupt_network_file_is_a_clear_study_error(tmp_path):
    with pytest.raises(StudyError, match="missing"):
        unet.load_session(str(tmp_path / "none.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a network")
    with pytest.raises(StudyError, match="cannot be loaded"):
        unet.load_session(str(bad))


def test_the_shipped_net_finds_the_bodies_of_a_phantom_t2(tmp_path):
    """The shipped net on a synthetic T2 with Modic bands (seed 7: not one of the training phantoms' seeds): P > 0.5
    covers the lumbar bodies and little else around them."""
    from pipeline.evaluation.cases import load_case
    from pipeline.segmentation.grid import normalise
    from pipeline.training.samples import phantom_rows
    from pipeline.types import level_value

    (row,) = [r for r in phantom_rows(tmp_path, 1, first_seed=7) if "T2" in r["case"].upper()]
    work, lab, sp = load_case(row)
    prob = unet.unet_probability(normalise(work), sp[2])
    body = np.isin(lab, [level_value(name) for name in ("L1", "L2", "L3", "L4", "L5")])
    found = prob > 0.5
    assert body.sum() > 1000
    assert (found & body).sum() / body.sum() > 0.85  # the lumbar bodies, their Modic bands included
    rows = np.flatnonzero(body.any(axis=(1, 2)))
    between = np.zeros_like(body)
    between[rows[0]:rows[-1] + 1] = True
    assert (found & ~(lab > 0) & between).sum() < 0.2 * body.sum()  # little else: discs, canal, muscle


@pytest.mark.parametrize("body_model", ["unet", "onepass"])
def test_the_shipped_int8_nets_decide_like_the_float_nets_on_a_phantom_t2(tmp_path, body_model):
    """``segmentation.int8``: each body model's shipped int8 net (quantize_nets) gives the float net's body / not
    body decision on nearly every voxel of an unseen phantom T2 (seed 7), and its probability stays close."""
    from pipeline.evaluation.cases import load_case
    from pipeline.segmentation.grid import normalise
    from pipeline.training.samples import phantom_rows

    (row,) = [r for r in phantom_rows(tmp_path, 1, first_seed=7) if "T2" in r["case"].upper()]
    work, _, sp = load_case(row)
    norm = normalise(work)
    assert unet.net_path(body_model, int8=True) == unet.int8_path(body_model) != unet.net_path(body_model)
    p32 = unet.unet_probability(norm, sp[2], session=unet.load_session(body_model=body_model))
    p8 = unet.unet_probability(norm, sp[2], session=unet.load_session(body_model=body_model, int8=True))
    a, b = p32 > 0.5, p8 > 0.5
    assert a.sum() > 1000
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97
    assert np.abs(p32 - p8).mean() < 0.02


@pytest.mark.parametrize("body_model", ["unet", "onepass"])
def test_each_shipped_int8_net_was_quantised_from_the_shipped_float_net(body_model):
    """A float net retrained without running quantize_nets again would leave a stale int8 net as the default: the
    int8 file records the digest of the float net it came from."""
    onnx = pytest.importorskip("onnx")
    from pipeline.training.quantize_nets import float_net_digest

    meta = {p.key: p.value for p in onnx.load(str(unet.int8_path(body_model))).metadata_props}
    assert meta.get("float_net_sha256") == float_net_digest(unet.net_path(body_model)), (
        "re-run python -m pipeline.training.quantize_nets after retraining the float net")


def _int8_requests(monkeypatch) -> list[bool]:
    """Record the ``int8`` flag of every net session asked for (the sessions are the real ones)."""
    asked: list[bool] = []
    real = unet.load_session

    def recording(path=None, body_model="unet", int8=False):
        asked.append(int8)
        return real(path, body_model, int8)

    monkeypatch.setattr(unet, "load_session", recording)
    return asked


def test_segmentation_runs_the_int8_nets_only_when_configured(monkeypatch):
    """``segmentation.int8`` picks the int8 file for every net pass: T2's and the other contrasts'."""
    from pipeline.config import SegmentationConfig
    from pipeline.segmentation import probability, segment

    asked = _int8_requests(monkeypatch)
    rng = np.random.default_rng(0)
    image = rng.random((120, 120, 3)).astype(np.float32)
    for body_model, int8 in (("onepass", False), ("onepass", True), ("unet", False), ("unet", True)):
        asked.clear()
        cfg = SegmentationConfig(body_model=body_model, int8=int8, refine_edges=False)
        try:
            segment.segment_vertebrae(image, (probability.WORK_MM, probability.WORK_MM, 4.0), cfg,
                                      extra_images=[image.copy()])
        except Exception:  # noise has no spine: only which nets ran matters here
            pass
        assert asked and set(asked) == {int8}


def test_calibration_records_the_float_nets_inputs_and_refuses_to_quantise_nothing(monkeypatch):
    """quantize_nets records what the float net sees (an int8 copy must not calibrate its own successor, and may not
    exist yet); no recorded input stops it with a reason."""
    from pipeline.training.quantize_nets import record_net_inputs

    asked = _int8_requests(monkeypatch)
    image = np.random.default_rng(2).random((96, 96, 2)).astype(np.float32)
    chunks = record_net_inputs("onepass", [(image, (1.5, 1.5, 4.0), [])])
    assert chunks and chunks[0].shape[1] == 3 and set(asked) == {False}
    with pytest.raises(SystemExit, match="no calibration input"):
        record_net_inputs("onepass", [])


def test_levels_refuses_a_net_whose_body_model_auto_would_guess(tmp_path):
    """``levels --unet NET`` on single slices: ``auto`` would run any net as the one-pass net; the body model the
    net is must be named."""
    from pipeline.evaluation.levels import main as levels_main

    cases = tmp_path / "cases.csv"
    cases.write_text("case,t2\n")
    with pytest.raises(SystemExit) as exc:
        levels_main([str(cases), "-o", str(tmp_path / "out"), "--unet", str(unet.UNET_PATH)])
    assert exc.value.code == 2


def test_quantize_writes_an_int8_net_onnx_runtime_runs(tmp_path):
    """quantize_nets.quantize: a QDQ int8 copy of a float net, calibrated on the given inputs, that ONNX Runtime
    runs with an output close to the float net's on those inputs."""
    import onnx

    from pipeline.training.quantize_nets import float_net_digest, quantize

    rng = np.random.default_rng(1)
    chunks = [rng.random((2, 3, 64, 48)).astype(np.float32) for _ in range(3)]
    dst = tmp_path / "net_int8.onnx"
    quantize(unet.ONEPASS_PATH, dst, chunks)
    model = onnx.load(str(dst))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["float_net_sha256"] == float_net_digest(unet.ONEPASS_PATH) and meta["float_net"] == unet.ONEPASS_PATH.name
    x = chunks[0]
    f = unet.run_net(unet.load_session(str(unet.ONEPASS_PATH)), x)
    q = unet.run_net(unet.load_session(str(dst)), x)
    assert q.shape == f.shape and np.corrcoef(f.ravel(), q.ravel())[0, 1] > 0.9


# ------------------------------------------------------------------------------------------- real scans
@pytest.fixture(scope="module")
def unet_on_three_real_scans(vertebral_bodies_dir, tmp_path_factory):
    from pipeline.config import SegmentationConfig
    from pipeline.evaluation.cases import read_cases
    from pipeline.evaluation.segmentation import evaluate_rows

    rows = [r for r in read_cases(vertebral_bodies_dir / "cases.csv") if r["case"] in ("vb1-15", "vb2-05", "vb3-09")]
    assert len(rows) == 3
    return evaluate_rows(rows, tmp_path_factory.mktemp("unet_eval"), write_png=False,
                         cfg=SegmentationConfig(body_model="unet"), first_levels={"vb2": "T11", "vb3": "L1"})


# A regression floor for the shipped U-Net on the three cases of test_segment's floor (in-sample: 0.913 on
# 2026-11-27 with the net trained on rotated and zoomed crops, 0.875 before it, when vb1-15's S1 behind a slipped
# L5 was missed; the classifier: 0.81), not the project target (0.92).
UNET_DICE_FLOOR = 0.89


def test_unet_outlines_three_real_scans_above_a_dice_floor(unet_on_three_real_scans):
    summary = unet_on_three_real_scans
    assert summary["n_annotated_bodies"] == 19
    assert summary["mean_body_dice"] >= UNET_DICE_FLOOR, summary
    assert summary["per_source"]["vb2"] >= 0.9 and summary["per_source"]["vb3"] >= 0.9, summary["per_source"]
    assert summary["missed"] == 0
    assert summary["level_naming"]["vb3"]["wrong"] == 0  # vb3-09 shows no sacrum: no level names at all


def test_unet_names_the_levels_of_a_healthy_t2_with_its_sacrum(unet_on_three_real_scans):
    # vb2 annotates T11-L5; vb2-05 shows its sacrum. (The net trained before S1 was pseudo-labelled missed S1 here:
    # L5 was named S1 and every level one too low.)
    assert unet_on_three_real_scans["level_naming"]["vb2"] == {"correct": 7, "wrong": 0, "unnamed": 0}


@pytest.fixture(scope="module")
def onepass_on_three_real_scans(vertebral_bodies_dir, tmp_path_factory):
    from pipeline.config import SegmentationConfig
    from pipeline.evaluation.cases import read_cases
    from pipeline.evaluation.segmentation import evaluate_rows

    rows = [r for r in read_cases(vertebral_bodies_dir / "cases.csv") if r["case"] in ("vb1-15", "vb2-05", "vb3-09")]
    return evaluate_rows(rows, tmp_path_factory.mktemp("onepass_eval"), write_png=False,
                         cfg=SegmentationConfig(body_model="onepass"), first_levels={"vb2": "T11", "vb3": "L1"})


# The shipped one-pass net on the same three scans (in-sample: it saw them; 0.850 with the net that also gives
# P(L5), 2026-12-07, worst vb1-15 0.782; the net before it, body only: 0.876). Its held-out figures (fold 0,
# leave each source out) are in the README; this is a regression floor.
ONEPASS_DICE_FLOOR = 0.82


def test_onepass_net_outlines_and_names_three_real_scans(onepass_on_three_real_scans):
    summary = onepass_on_three_real_scans
    assert summary["n_annotated_bodies"] == 19 and summary["missed"] == 0
    assert summary["mean_body_dice"] >= ONEPASS_DICE_FLOOR, summary
    assert summary["level_naming"]["vb2"] == {"correct": 7, "wrong": 0, "unnamed": 0}, summary["level_naming"]


def test_the_shipped_onepass_net_outlines_every_body_of_a_phantom_study(tmp_path):
    """Seed 7 (not a training phantom), T2 alone: whole slices, no classifier; every body from T12 to S1 is found as
    one instance (best-overlap Dice > 0.8), the net's P(L5) is high on the phantom's L5 only, and the run is named
    T12..S1 (the net before the L5 output named this T2 one level too low: its S1 was too faint for the shapes)."""
    from scipy import ndimage

    from pipeline.config import SegmentationConfig
    from pipeline.evaluation.cases import load_case
    from pipeline.segmentation.grid import normalise
    from pipeline.segmentation.probability import onepass_probability
    from pipeline.segmentation.segment import segment_vertebrae
    from pipeline.training.samples import phantom_rows
    from pipeline.types import level_value

    (row,) = [r for r in phantom_rows(tmp_path, 1, first_seed=7) if "T2" in r["case"].upper()]
    work, lab, sp = load_case(row)
    _, _, l5 = onepass_probability(normalise(work), sp)
    ids = np.unique(lab[lab > 0])
    evidence = dict(zip(ids.tolist(), ndimage.mean(l5, lab, ids), strict=True))
    assert evidence.pop(level_value("L5")) > 0.5 and max(evidence.values()) < 0.2
    seg = segment_vertebrae(work, sp, SegmentationConfig(body_model="onepass"))
    assert [b.level for b in seg.bodies] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    for t in np.unique(lab[lab > 0]):
        truth = lab == t
        best = np.bincount(seg.labels[truth].astype(np.int64)).argmax()
        assert best > 0, t
        found = seg.labels == best
        assert 2 * (truth & found).sum() / (truth.sum() + found.sum()) > 0.8, t


def test_use_network_switches_the_process_net_and_refuses_a_bad_file(tmp_path):
    import shutil

    shipped = unet.UNET_PATH
    before = unet.load_session()
    copy = tmp_path / "fold0.onnx"
    shutil.copy(shipped, copy)
    try:
        unet.use_network(copy)
        assert unet.net_path() == copy and unet.load_session() is not before  # a new session, from the copy
        assert unet.net_path("onepass") == copy  # one net for the process, whichever body model asks
        with pytest.raises(StudyError, match="missing"):
            unet.use_network(tmp_path / "fold9.onnx")  # fails when asked, not at the first study
        (tmp_path / "bad.onnx").write_bytes(b"not a network")
        with pytest.raises(StudyError, match="cannot be loaded"):
            unet.use_network(tmp_path / "bad.onnx")
        assert unet.net_path() == copy  # a refused file leaves the current net in place
        unet.load_session()
    finally:
        unet.use_network(None)
    assert unet.net_path() == shipped and unet.load_session() is before
    assert unet.net_path("onepass") == unet.ONEPASS_PATH

"""A reader's L5 on single-slice scans as training truth for the one-pass net's L5 output
(pipeline.training.reader_l5, train_unet --l5-cases) and the patient folds its evaluation shares
(pipeline.evaluation.levels.patient_folds, --fold)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.levels import L5_TOLERANCE_MM, fold_rows, patient_folds


def _three_bodies(shape=(120, 60, 1)):
    lab = np.zeros(shape, np.int16)
    for value, top in ((3, 10), (4, 45), (5, 80)):  # centroid rows 19.5, 54.5, 89.5
        lab[top:top + 20, 20:45] = value
    return lab


def test_reader_l5_mask_is_the_component_nearest_the_reading_and_none_beyond_the_tolerance():
    from pipeline.training.reader_l5 import reader_l5_mask

    lab = _three_bodies()
    spacing = (0.5, 0.5, 4.0)  # centroids at 9.75, 27.25, 44.75 mm
    mask = reader_l5_mask(lab, 40.0, spacing)
    assert mask is not None and mask.sum() == 20 * 25 and (lab[mask] == 5).all()
    assert (lab[reader_l5_mask(lab, 30.0, spacing)] == 4).all()
    assert reader_l5_mask(lab, 44.75 + L5_TOLERANCE_MM + 1.0, spacing) is None  # read below every body
    assert reader_l5_mask(np.zeros_like(lab), 40.0, spacing) is None


def test_patient_folds_keep_a_patients_rows_together_and_do_not_depend_on_the_other_rows():
    rows = [{"case": f"c{i:03d}-{j}", "patient": str(2 * i)} for i in range(40) for j in range(2)]
    folds = patient_folds(rows)
    by_patient = {}
    for r, f in zip(rows, folds, strict=True):
        by_patient.setdefault(r["patient"], set()).add(f)
    assert all(len(f) == 1 for f in by_patient.values())
    assert 10 <= sum(folds) // 2 <= 30  # both folds hold patients, although every patient number is even
    subset = rows[::3]
    assert patient_folds(subset) == folds[::3]  # a training over the read cases splits them as the evaluation
    assert patient_folds([{"case": "x-1"}]) == patient_folds([{"case": "x-1", "patient": ""}])  # no patient: case


def test_a_training_and_the_evaluation_of_one_fold_split_the_read_cases_between_them():
    everyone = [{"case": f"c{i}", "patient": str(i)} for i in range(30)]
    read = everyone[1::2] + everyone[::7]  # the reading covers some cases, listed in another order
    for k in (0, 1):
        trained = {r["case"] for r in fold_rows(read, k, held_out=False)}
        evaluated = {r["case"] for r in fold_rows(everyone, k, held_out=True)}
        assert trained and evaluated and not trained & evaluated
        assert trained | (evaluated & {r["case"] for r in read}) == {r["case"] for r in read}
    assert fold_rows(read, None, held_out=True) == read == fold_rows(read, None, held_out=False)


def test_evaluate_levels_fold_keeps_only_that_folds_patients(tmp_path, monkeypatch):
    from pipeline.evaluation import levels

    cases = tmp_path / "cases.csv"
    cases.write_text("case,patient,t1,t2\n" + "".join(f"c{i},{i},t1.nii.gz,t2.nii.gz\n" for i in range(12)))
    seen = []

    def fake_case(row, root, cfg):
        seen.append(row["case"])
        return {"case": row["case"], "levels": "", "l5_row_mm": None, "s1_row_mm": None, "flags": "",
                "confidence": None, "error": "no body"}, None, None

    monkeypatch.setattr(levels, "segment_case", fake_case)
    rows = [{"case": f"c{i}", "patient": str(i)} for i in range(12)]
    expected = {k: [r["case"] for r, f in zip(rows, patient_folds(rows), strict=True) if f == k] for k in (0, 1)}
    for k in (0, 1):
        seen.clear()
        summary = levels.evaluate_levels(cases, tmp_path / f"o{k}", None, write_png=False, fold=k)
        assert seen == expected[k] and summary["n_cases"] == len(expected[k])
    assert sorted(expected[0] + expected[1], key=lambda c: int(c[1:])) == [r["case"] for r in rows]


def _reader_slice(shape=(64, 64)):
    x = np.full((3, *shape), 0.3, np.float32)
    l5 = np.zeros(shape, bool)
    l5[40:52, 20:34] = True
    x[:, l5] = 0.9
    empty = np.zeros(shape, bool)
    return x, empty, empty, l5, True


def test_read_slices_train_l5_only_and_their_crops_hold_the_read_l5():
    from pipeline.training.train_unet import sample_batch

    real = [(np.zeros((3, 64, 64), np.float32), np.ones((64, 64), bool), np.ones((64, 64), bool),
             np.zeros((64, 64), bool), False)]
    xb, yb, mb = sample_batch(real, [], np.random.default_rng(0), batch=40, patch=32, level_channel=True,
                              reader=[_reader_slice()], reader_share=1.0, body_share=1.0, rotate_deg=0,
                              scale_log=0)
    assert not mb[:, 0].any() and not yb[:, 0].any()  # the body is unknown on a read slice, not background
    assert mb[:, 1].all()  # L5 (and "not L5") known on the whole slice
    assert (yb[:, 1].sum(axis=(1, 2)) > 0).mean() > 0.9  # around the read L5, as body crops are around bodies
    xb, yb, mb = sample_batch(real, [], np.random.default_rng(0), batch=40, patch=32, level_channel=True,
                              reader=[_reader_slice()], reader_share=0.0)
    assert mb[:, 0].any(axis=(1, 2)).all() and not mb[:, 1].any()  # share 0: none of them
    _, _, mb = sample_batch(real, [], np.random.default_rng(1), batch=400, patch=32, level_channel=True,
                            reader=[_reader_slice()], reader_share=0.25)
    assert 0.15 < (~mb[:, 0].any(axis=(1, 2))).mean() < 0.35


def test_read_slices_are_cached_with_the_cases_no_reading_matched(tmp_path, monkeypatch):
    from pipeline.training import reader_l5, train_unet

    made = []

    def fake(row, cfg=None):
        made.append(row["case"])
        return [] if row["case"] == "nomatch" else [_reader_slice()]

    monkeypatch.setattr(reader_l5, "reader_case_slices", fake)
    first = train_unet.cached_reader_slices({"case": "a", "l5_row_mm": 180.0}, tmp_path)
    again = train_unet.cached_reader_slices({"case": "a", "l5_row_mm": 180.0}, tmp_path)
    assert len(first) == len(again) == 1
    assert all(np.array_equal(u, v) for u, v in zip(first[0], again[0], strict=True))
    assert train_unet.cached_reader_slices({"case": "nomatch", "l5_row_mm": 90.0}, tmp_path) == []
    assert train_unet.cached_reader_slices({"case": "nomatch", "l5_row_mm": 90.0}, tmp_path) == []
    assert made == ["a", "nomatch"]  # each case prepared once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_reader_l5_180.0.npz", "nomatch_reader_l5_90.0.npz"]
    train_unet.cached_reader_slices({"case": "a", "l5_row_mm": 150.5}, tmp_path)  # a revised reading
    assert made == ["a", "nomatch", "a"]


def test_a_read_case_that_does_not_segment_is_left_out_not_fatal(tmp_path, monkeypatch):
    import nibabel as nib

    from pipeline.errors import StudyError
    from pipeline.segmentation import segment
    from pipeline.training.reader_l5 import reader_case_slices

    nib.save(nib.Nifti1Image(np.zeros((40, 40, 1), np.float32), np.eye(4)), tmp_path / "t2.nii.gz")

    def no_body(*a, **k):
        raise StudyError("SEGMENTATION_FAILED", "no vertebral body was found")

    monkeypatch.setattr(segment, "segment_vertebrae", no_body)
    assert reader_case_slices({"case": "c", "root": str(tmp_path), "t2": "t2.nii.gz", "l5_row_mm": 20.0}) == []


def test_read_slices_are_segmented_by_the_cascades_float_nets_whatever_the_default(tmp_path, monkeypatch):
    """The L5 targets come from the cascade (the one-pass net must not learn from itself: the default ``auto``
    would run it on these single slices) and from its float nets, not the int8 copies."""
    import nibabel as nib

    from pipeline.errors import StudyError
    from pipeline.segmentation import segment
    from pipeline.training.reader_l5 import reader_case_slices

    nib.save(nib.Nifti1Image(np.zeros((40, 40, 1), np.float32), np.eye(4)), tmp_path / "t2.nii.gz")
    used = []

    def record(image, spacing, cfg=None, **kw):
        used.append((cfg.body_model, cfg.int8))
        raise StudyError("SEGMENTATION_FAILED", "recorded")

    monkeypatch.setattr(segment, "segment_vertebrae", record)
    reader_case_slices({"case": "c", "root": str(tmp_path), "t2": "t2.nii.gz", "l5_row_mm": 20.0})
    assert used == [("unet", False)]


def test_train_unet_wants_the_reading_with_the_read_cases_and_the_one_pass_net(tmp_path, capsys):
    from pipeline.training.train_unet import main

    for args in (["--onepass", "--l5-cases", "c.csv"], ["--l5-cases", "c.csv", "--l5-reading", "r.csv"],
                 ["--onepass", "--l5-fold", "1"]):
        with pytest.raises(SystemExit) as exc:
            main([str(tmp_path / "cases.csv"), *args, "--out", str(tmp_path / "n.onnx")])
        assert exc.value.code == 2 and "--l5-reading" in capsys.readouterr().err
    assert not (tmp_path / "n.onnx").exists()


def test_a_read_spider_slice_gives_one_single_slice_sample_with_a_body_sized_l5(repo_root):
    from conftest import SHARED_DATA

    from pipeline.segmentation.grid import WORK_MM
    from pipeline.training.reader_l5 import read_l5_rows, reader_case_slices

    cases = SHARED_DATA / "modic-spider" / "cases.csv"
    if not cases.is_file():
        pytest.skip(f"real data not available: {cases} is absent (see README, 'Real data')")
    rows = {r["case"]: r for r in read_l5_rows(cases, repo_root / "docs" / "spider_l5_reading.csv")}
    assert len(rows) >= 70  # the reading covers most of the 92 cases
    (x, body, known, l5, l5_known), = reader_case_slices(rows["spider-016"])  # S1 seen whole: called L5 once
    assert x.shape == (3, *l5.shape) and np.array_equal(x[0], x[2])  # one slice: no side context
    assert not body.any() and not known.any() and l5_known
    area_mm2 = l5.sum() * WORK_MM ** 2
    assert 500 < area_mm2 < 2500, area_mm2  # a lumbar body's mid-sagittal section (~35 x 30 mm)
    rr = np.nonzero(l5)[0]
    assert abs(rr.mean() * WORK_MM - rows["spider-016"]["l5_row_mm"]) < 5.0  # grids agree: not off by a zoom


def _column(tops, height=20, shape=(200, 40, 1)):
    """Segmentation of bodies whose masks start at rows ``tops`` (1 mm rows), named upward from L5."""
    from pipeline.types import Segmentation, VertebralBody

    lab = np.zeros(shape, np.int16)
    bodies = []
    for i, top in enumerate(tops):
        value = 100 + i
        lab[top:top + height, 10:30] = value
        bodies.append(VertebralBody(f"B{i}", value, (top + (height - 1) / 2, 19.5, 0.0), 1.0))
    return Segmentation(lab, bodies, 1.0, [])


def test_the_disc_under_a_body_is_counted_from_the_top_only_when_the_count_is_sure():
    from pipeline.evaluation.levels import count_outcome, disc_number_from_top

    sp = (1.0, 1.0, 4.0)
    seg = _column([0, 30, 60, 90, 120, 150])  # the top body cut by the image's top edge
    assert disc_number_from_top(seg, sp, 159.5) == 6  # the lowest body: its disc is the 6th from the top
    assert disc_number_from_top(seg, sp, 99.5 + 5) == 4  # within the tolerance of the 4th body
    assert disc_number_from_top(seg, sp, 159.5 + L5_TOLERANCE_MM + 2) is None  # no body there
    assert disc_number_from_top(seg, sp, None) is None and disc_number_from_top(None, sp, 50.0) is None
    assert disc_number_from_top(_column([20, 50, 80, 110]), sp, 119.5) is None  # a disc or body above may be in view
    gap = _column([0, 30, 90, 120])  # a body missed between rows 50 and 90
    assert disc_number_from_top(gap, sp, 129.5) is None
    assert disc_number_from_top(gap, sp, 39.5) == 2  # above the gap the count holds
    assert count_outcome(6, "6") == "agrees" and count_outcome(5, "6") == "disagrees"
    assert count_outcome(None, "6") == count_outcome(6, "") == count_outcome(6, None) == "not_countable"

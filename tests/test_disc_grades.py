"""The Pfirrmann check of the disc numbering (pipeline.evaluation.disc_grades, levels --gradings)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation import disc_grades, levels
from pipeline.types import Segmentation, VertebralBody

BODY, GAP = 20, 8  # rows of a body and of the disc under it (1 mm rows)


def _spine(disc_values, marrow=100.0, shape_w=40):
    """A single-slice spine: bodies (marrow) with discs of the given intensities between them, top to bottom;
    returns (labels, image, segmentation)."""
    n_bodies = len(disc_values) + 1
    h = n_bodies * (BODY + GAP) + 10
    lab = np.zeros((h, shape_w, 1), np.int16)
    image = np.full(lab.shape, 10.0, np.float32)  # background
    bodies = []
    for i in range(n_bodies):
        top = 5 + i * (BODY + GAP)
        lab[top:top + BODY, 10:30] = 100 + i
        image[top:top + BODY, 10:30] = marrow
        if i < len(disc_values):
            image[top + BODY:top + BODY + GAP, 10:30] = disc_values[i]
        bodies.append(VertebralBody(f"B{i}", 100 + i, (top + (BODY - 1) / 2, 19.5, 0.0), 1.0))
    return lab, image, Segmentation(lab, bodies, 1.0, [])


def test_disc_ratios_are_the_gap_over_the_two_bodies_marrow():
    lab, image, seg = _spine([50.0, 150.0, 80.0])
    ratios = disc_grades.disc_t2_ratios(lab, image, [b.value for b in seg.bodies])
    assert ratios == pytest.approx([0.5, 1.5, 0.8])
    # bodies that share no columns have no disc between them
    lab2 = lab.copy()
    lab2[lab2 == 101] = 0
    lab2[33:53, 32:38] = 101
    assert np.isnan(disc_grades.disc_t2_ratios(lab2, image, [100, 101, 102, 103])[:2]).all()


def test_the_numbering_from_the_real_l5_fits_the_grades_best_and_one_body_off_does_not():
    # six discs top -> bottom, the lowest is L5-S1; dark discs (low ratio) carry high grades
    ratios = np.array([1.4, 1.3, 1.5, 0.6, 1.2, 0.5])
    grades = {6: 1, 5: 2, 4: 1, 3: 4, 2: 2, 1: 5}  # ivd 1 = L5-S1: the disc under body 5
    corr = disc_grades.grade_correlations(ratios, 5, grades)
    assert set(corr) == {-1, 0, 1}
    assert corr[0] < -0.9 and corr[0] < corr[-1] and corr[0] < corr[1]
    assert disc_grades.grade_outcome(corr) == "agrees"
    # L5 taken one body too high: our disc numbered ivd k is the readers' k + 1, offset +1 fits best
    shifted = disc_grades.grade_correlations(ratios, 4, grades)
    assert min(shifted, key=shifted.get) == 1 and disc_grades.grade_outcome(shifted) == "one_off"


def test_too_few_graded_discs_or_no_spread_are_not_gradable():
    assert disc_grades.grade_correlations(np.array([1.0, 0.5, 0.8]), 2, {1: 3, 2: 1, 3: 2}) == {}
    flat = disc_grades.grade_correlations(np.array([1.0, 0.5, 0.8, 0.9, 0.7]), 4, {i: 3 for i in range(1, 7)})
    assert flat == {}
    assert disc_grades.grade_outcome({}) == "not_gradable"
    assert disc_grades.grade_outcome({0: -0.5}) == "not_gradable"  # nothing to compare the numbering with


def test_grades_check_numbers_the_discs_from_the_body_at_the_given_row():
    lab, image, seg = _spine([140.0, 130.0, 150.0, 60.0, 120.0, 50.0])
    grades = {6: 1, 5: 2, 4: 1, 3: 4, 2: 2, 1: 5}
    l5_row = seg.bodies[5].centroid_vox[0]
    assert levels.grades_check(seg, image, (1.0, 1.0, 4.0), l5_row, grades)[0] == "agrees"
    assert levels.grades_check(seg, image, (1.0, 1.0, 4.0), seg.bodies[4].centroid_vox[0], grades)[0] == "one_off"
    far = seg.bodies[-1].centroid_vox[0] + levels.L5_TOLERANCE_MM + 5  # below the lowest body: no body there
    assert levels.grades_check(seg, image, (1.0, 1.0, 4.0), far, grades) == ("not_gradable", {})
    assert levels.grades_check(seg, image, (1.0, 1.0, 4.0), l5_row, {}) == ("not_gradable", {})


def test_gradings_without_a_pfirrmann_column_are_refused(tmp_path):
    bad = tmp_path / "g.csv"
    bad.write_text("case,ivd,modic\nspider-002,1,0\n")
    with pytest.raises(ValueError, match="pfirrmann"):
        levels.read_pfirrmann(bad)
    good = tmp_path / "g2.csv"
    good.write_text("case,ivd,modic,pfirrmann\nspider-002,1,0,4\nspider-002,2,2,\n")
    assert levels.read_pfirrmann(good) == {"spider-002": {1: 4}}  # an empty grade is no grade
    cases = tmp_path / "cases.csv"
    cases.write_text("case,t1,t2\n")
    with pytest.raises(SystemExit) as exc:
        levels.main([str(cases), "-o", str(tmp_path / "out"), "--gradings", str(tmp_path / "missing.csv")])
    assert exc.value.code == 2


def test_evaluate_levels_writes_the_grades_check_per_case_and_in_the_summary(tmp_path, monkeypatch):
    lab, image, seg = _spine([140.0, 130.0, 150.0, 60.0, 120.0, 50.0])

    class Volume:
        data, spacing = image, (1.0, 1.0, 4.0)

    def fake_case(row, root, cfg):
        res = {"case": row["case"], "levels": "", "l5_row_mm": seg.bodies[5].centroid_vox[0], "s1_row_mm": None,
               "flags": "", "confidence": 0.8, "error": ""}
        return res, Volume(), seg

    monkeypatch.setattr(levels, "segment_case", fake_case)
    cases = tmp_path / "cases.csv"
    cases.write_text("case,patient,t1,t2,n_discs\nc1,1,a,b,6\n")
    gradings = tmp_path / "g.csv"
    gradings.write_text("case,ivd,pfirrmann\n" + "".join(f"c1,{i},{g}\n" for i, g in
                                                          {6: 1, 5: 2, 4: 1, 3: 4, 2: 2, 1: 5}.items()))
    summary = levels.evaluate_levels(cases, tmp_path / "out", None, write_png=False, gradings=gradings)
    assert summary["disc_grades"]["ours"] == {"agrees": 1, "one_off": 0, "not_gradable": 0}
    assert summary["disc_grades"]["reading"]["not_gradable"] == 1  # no reading given
    row = (tmp_path / "out" / "levels.csv").read_text().splitlines()
    assert "grades_ours" in row[0] and "agrees" in row[1]

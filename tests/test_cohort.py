"""Cohort prevalence from hand-built rows (the numbers are counted by hand)."""

from __future__ import annotations

from pipeline.report.cohort import cohort_rows, prevalence_summary


def _row(study, level, side, mtype, edema=False):
    return {"study_key": study, "level": level, "endplate": side, "modic_type": mtype, "edema_present": edema}


def test_prevalence_by_level_and_study():
    rows = [
        _row("a", "L4", "inferior", "II"), _row("a", "L4", "superior", "0"),
        _row("a", "L5", "superior", "II"), _row("a", "L5", "inferior", "0"),
        _row("b", "L4", "inferior", "I", edema=True), _row("b", "L4", "superior", "0", edema=True),
        _row("b", "L5", "superior", "0"), _row("b", "L5", "inferior", "0"),
        _row("c", "L4", "inferior", "0"), _row("c", "L4", "superior", "0"),
        _row("c", "L5", "superior", "0"), _row("c", "L5", "inferior", "0"),
    ]
    s = prevalence_summary(rows, n_studies=4)  # study d: no vertebra rows (e.g. nothing segmented)
    assert s["studies_with_any_modic_pct"] == 50.0  # a and b of 4
    assert s["endplates_any_modic_pct"] == 25.0  # 3 of 12
    assert s["endplates_by_type_pct"]["II"] == round(100 * 2 / 12, 2)
    assert s["by_level"]["L4"]["any_modic_pct"] == round(100 * 2 / 6, 2)
    assert s["by_level"]["L4"]["edema_pct_of_vertebrae"] == round(100 / 3, 2)
    assert s["by_level"]["L5"]["by_type_pct"]["II"] == round(100 / 6, 2)
    assert "L1" not in s["by_level"] and "43 %" in s["literature"]


def test_cohort_rows_carry_the_disc_next_to_each_endplate():
    def vert(level):
        ep = {"modic_type": "0", "confidence": 0.9, "extent_height_pct": 0.0, "extent_volume_pct": 0.0,
              "type_fractions": {"I": 0.0, "II": 0.0, "III": 0.0}}
        zone = {"signal": {}}
        return {"level": level, "endplates": {"superior": ep, "inferior": ep},
                "zones": {"superior": zone, "inferior": zone, "core": zone},
                "edema": {"present": False, "source": "T2", "extent_volume_pct": 0.0, "confidence": 0.8},
                "heights_mm": {"anterior": 25.0, "middle": 24.0, "posterior": 26.0},
                "height_ratios": {"anterior_to_posterior": 0.96}}
    report = {"study": {"key": "k"}, "flags": [], "segmentation": {"labelling_confidence": 0.9},
              "confidence": {"overall": 0.8}, "vertebrae": [vert("L4"), vert("L5"), vert("S1")],
              "discs": [{"level": "L4-L5", "upper": "L4", "lower": "L5", "modic": {"modic_type": "II", "score": 0.4}},
                        {"level": "L5-S1", "upper": "L5", "lower": "S1", "modic": {"modic_type": "0", "score": 0.02}}]}
    got = {(r["level"], r["endplate"]): (r["disc_level"], r["disc_modic_type"], r["disc_modic_score"])
           for r in cohort_rows([report])}
    assert got[("L4", "superior")] == (None, None, None)  # no disc above L4 in this report
    assert got[("L4", "inferior")] == got[("L5", "superior")] == ("L4-L5", "II", 0.4)
    assert got[("L5", "inferior")] == got[("S1", "superior")] == ("L5-S1", "0", 0.02)
    assert got[("S1", "inferior")] == (None, None, None)

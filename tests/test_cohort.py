"""Cohort prevalence from hand-built rows (the numbers are counted by hand)."""

from __future__ import annotations

from pipeline.report.cohort import prevalence_summary


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

"""Role assignment from headers: vendor styles, fat-sat, post-contrast, missing roles."""

from __future__ import annotations

import pytest

from pipeline.errors import StudyError
from pipeline.roles import assign_roles
from pipeline.types import SeriesSummary, StudyFiles

SAG = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def S(uid, desc="", tr=None, te=None, ti=None, ss=("SE",), sv=(), so=(), iop=SAG, n=15, number=1, agent="",
      image_type=("ORIGINAL", "PRIMARY", "M"), localizer=False):
    return SeriesSummary(series_uid=uid, study_uid="1", files=[f"{uid}.dcm"], n_frames=n, series_description=desc,
                         series_number=number, orientation="sagittal" if iop == SAG else "axial", image_orientation=iop,
                         repetition_time=tr, echo_time=te, inversion_time=ti, scanning_sequence=ss, sequence_variant=sv,
                         scan_options=so, contrast_agent=agent, image_type=image_type, pixel_spacing=(0.6, 0.6),
                         is_localizer=localizer)


def study(*series):
    return StudyFiles(study_uid="1", series={s.series_uid: s for s in series})


def roles_of(st):
    return {k: v.series_uid for k, v in assign_roles(st).roles.items()}


def test_siemens_style_with_tirm():
    st = study(S("t1", "t1_tse_sag", 600, 9, sv=("SK", "SP", "OSP")), S("t2", "t2_tse_sag", 3800, 96),
               S("stir", "t2_tirm_sag", 4000, 60, 160, ss=("SE", "IR"), so=("IR",)))
    assert roles_of(st) == {"T1": "t1", "T2": "t2", "STIR": "stir"}


def test_ge_style_fat_sat_t2_serves_as_fluid_series_and_descriptions_do_not_decide():
    # Descriptions deliberately misleading: the headers must win.
    st = study(S("a", "SAG T2 FSE", 500, 12, so=("FAST_GEMS",)), S("b", "SAG T1", 3200, 102, so=("FAST_GEMS",)),
               S("c", "SAG T2", 3500, 85, so=("FAST_GEMS", "FS")))
    r = assign_roles(st)
    assert {k: v.series_uid for k, v in r.roles.items()} == {"T1": "a", "T2": "b", "STIR": "c"}
    assert r.roles["STIR"].kind == "T2 fat-sat"
    assert any("TR 500" in e for e in r.roles["T1"].evidence)


def test_flair_inversion_is_not_stir():
    st = study(S("t1", "", 550, 10), S("t2", "", 3500, 100), S("flair", "t1 flair", 2000, 20, 860, ss=("IR",)))
    r = assign_roles(st)
    assert "STIR" not in r.roles and any("STIR" in w for w in r.warnings)


def test_native_t1_preferred_over_post_contrast_and_later_repeat_chosen():
    st = study(S("pre", "t1 sag", 550, 10, number=3), S("post", "t1 sag +c", 550, 10, agent="GADOVIST", number=9),
               S("t2", "t2", 3500, 100, number=4), S("t2b", "t2 repeat", 3500, 100, number=7))
    r = assign_roles(st)
    assert r.roles["T1"].series_uid == "pre"
    assert r.roles["T2"].series_uid == "t2b"
    assert [c["series_uid"] for c in r.candidates["T2"]] == ["t2"]


def test_missing_timing_falls_back_to_description_with_lower_confidence():
    st = study(S("x", "T1 SAG", None, None), S("y", "T2 SAG", None, None))
    r = assign_roles(st)
    assert r.roles["T1"].series_uid == "x" and r.roles["T1"].confidence <= 0.5


@pytest.mark.parametrize("series,code", [
    ((S("t2", "", 3500, 100), S("stir", "", 4000, 60, 150, ss=("IR",))), "NO_SAGITTAL_T1"),
    ((S("t1", "", 550, 10),), "NO_SAGITTAL_T2"),
    ((S("t1", "", 550, 10, iop=AX), S("t2", "", 3500, 100, iop=AX)), "NO_SAGITTAL_SERIES"),
    ((S("loc", "localizer", 8, 3, localizer=True, n=3),), "NO_SAGITTAL_SERIES"),
])
def test_missing_roles_raise_specific_codes(series, code):
    with pytest.raises(StudyError) as e:
        assign_roles(study(*series))
    assert e.value.code == code and len(e.value.message) > 20


def test_axial_series_ignored_when_sagittal_exist():
    st = study(S("ax", "t2 tra", 3500, 100, iop=AX), S("t1", "", 550, 10), S("t2", "", 3500, 100))
    assert roles_of(st) == {"T1": "t1", "T2": "t2"}

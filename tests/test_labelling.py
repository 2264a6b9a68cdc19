"""Level names from the lumbosacral junction (pipeline.segmentation.labelling): synthetic columns with known
levels, label maps with known endplate tilts, images with known discs, and a floor on real scans."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import SegmentationConfig
from pipeline.segmentation.labelling import (
    GEOMETRY_COLUMNS,
    body_geometry,
    disc_contrasts,
    label_levels,
    pair_slices,
)

CFG = SegmentationConfig()
SPACING = 35.0  # mm between body centroids
LUMBAR = ["L1", "L2", "L3", "L4", "L5"]


def _body(centre: float, sup: float, inf: float, height: float = 28.0) -> list[float]:
    return [sup, inf, height, centre + height / 2]


def _column(n_above_l5: int = 5, sacrum: bool = True):
    """Centroids, geometry, volumes of T12 (or more) .. L5 and, with ``sacrum``, the top of the sacrum as the
    networks find it: a short piece whose lower outline curves back under a sloped upper endplate."""
    cents, geo, vols = [], [], []
    for n in range(n_above_l5):
        c = 20.0 + SPACING * n
        cents.append(c)
        geo.append(_body(c, 8.0, 4.0))  # lordosis: endplates tilted a little, parallel
        vols.append(30.0 + n)
    c = 20.0 + SPACING * n_above_l5
    cents.append(c)
    geo.append(_body(c, -12.0, -26.0))  # L5: the wedge of the L5-S1 disc under it
    vols.append(34.0)
    if sacrum:
        c += 0.85 * SPACING
        cents.append(c)
        geo.append(_body(c, -32.0, 18.0, height=16.0))
        vols.append(16.0)
    return np.array(cents), np.array(geo), np.array(vols)


def test_levels_counted_up_from_l5_with_the_top_of_the_sacrum_under_it():
    cents, geo, vols = _column()
    names, conf, flags, notes = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100)
    assert names == ["T12", *LUMBAR, "S1"]
    assert conf >= 0.7 and not any(f.startswith(("NO_", "S1_", "LEVELS_")) for f in flags), (flags, notes)
    # sacral segments below S1 (smaller, closer) stay unnamed
    cents2 = np.r_[cents, cents[-1] + 20, cents[-1] + 38]
    geo2 = np.vstack([geo, _body(cents[-1] + 20, -30, 10, 12), _body(cents[-1] + 38, -30, 10, 12)])
    names2, _, _, _ = label_levels(cents2, geo2, np.r_[vols, 8.0, 6.0], CFG, fov_end_mm=cents2[-1] + 60)
    assert names2 == [*names, "", ""]


def test_the_geometry_is_what_names_the_levels_not_the_count():
    cents, geo, vols = _column()
    # the same column with one more thoracic body on top: every name moves with the anatomy, none with the count
    more = np.r_[cents[0] - SPACING, cents]
    names, _, _, _ = label_levels(more, np.vstack([_body(more[0], 8, 4), geo]), np.r_[29.0, vols], CFG,
                                  fov_end_mm=cents[-1] + 100)
    assert names == ["T11", "T12", *LUMBAR, "S1"]


def test_s1_out_of_view_under_l5_names_the_column_and_says_so():
    cents, geo, vols = _column(4, sacrum=False)  # L1..L5; the image ends 10 mm under L5
    names, conf, flags, notes = label_levels(cents, geo, vols, CFG, fov_end_mm=geo[-1, 3] + 10.0)
    assert names == LUMBAR and "S1_NOT_IN_VIEW" in flags and 0.5 <= conf < 0.8
    assert any("out of view" in n for n in notes)


def test_a_whole_body_cut_by_the_image_edge_runs_out_of_view_and_a_sliver_is_no_body():
    cents, geo, vols = _column(4, sacrum=False)
    geo[-2, 1] = -10.0  # L4's lower endplate: ordinary
    cut = np.zeros(5, bool)
    cut[-1] = True  # L5 cut by the bottom edge: its outline says nothing, its size that it is a body
    geo[-1, :2] = [-20.0, 6.0]  # ... e.g. a cut outline that looks like the sacrum's top
    names, _, flags, _ = label_levels(cents, geo, vols, CFG, cut=cut, fov_end_mm=geo[-1, 3])
    assert names == LUMBAR and "S1_NOT_IN_VIEW" in flags
    # a sliver of S1 cut under a whole L5: L5 keeps its name either way
    c2, g2, v2 = _column(4, sacrum=True)
    g2[-1] = _body(c2[-1], -5.0, -5.0, height=8.0)
    names2, _, _, _ = label_levels(c2, g2, np.r_[v2[:-1], 4.0], CFG, cut=np.r_[np.zeros(5, bool), True],
                                   fov_end_mm=g2[-1, 3] + 2)
    assert names2[:5] == LUMBAR


def test_a_piece_far_below_the_column_does_not_end_it():
    cents, geo, vols = _column()
    far = cents[-1] + 3 * SPACING  # pelvis or coccyx at the image's edge, three levels down
    names, _, _, _ = label_levels(np.r_[cents, far], np.vstack([geo, _body(far, 0, 0)]), np.r_[vols, 40.0], CFG,
                                  cut=np.r_[np.zeros(len(cents), bool), True], fov_end_mm=far + 10)
    assert names[:-1] == ["T12", *LUMBAR, "S1"] and names[-1] == ""
    # ... nor through a fragment half-way down to it (the gap filling is for a compressed body between two bodies),
    # even when the top of the sacrum is hard to read (vb1-02: the cut piece would otherwise be read as L5)
    geo[-1] = _body(cents[-1], -4.5, 4.0, 24.0)
    frag = 0.5 * (cents[-1] + far)
    names2, _, _, _ = label_levels(np.r_[cents, frag, far], np.vstack([geo, _body(frag, 0, 0, 10), _body(far, 0, 0)]),
                                   np.r_[vols, 7.0, 40.0], CFG, cut=np.r_[np.zeros(len(cents) + 1, bool), True],
                                   fov_end_mm=far + 10)
    assert names2[: len(cents)] == ["T12", *LUMBAR, "S1"] and names2[-1] == ""


def test_s1_found_whole_with_the_image_going_on_under_it_is_s1_not_l5():
    # the phantoms' S1: a whole body, both endplates as steep as the sacral slope; the image goes on under it
    cents, geo, vols = _column(5, sacrum=False)
    geo[-2, 1] = -17.0  # L5's lower endplate (the body above)
    geo[-1] = _body(cents[-1], -29.0, -22.0)
    names, _, flags, _ = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 60)
    assert names == [*LUMBAR, "S1"] and "S1_NOT_FOUND" not in flags
    # a real L5 is wedged (upper endplate far less steep than the lower): with nothing under it, it stays L5
    geo[-1] = _body(cents[-1], -12.0, -28.0)
    names2, _, flags2, _ = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 60)
    assert names2[-1] == "L5" and "S1_NOT_FOUND" in flags2


def test_no_lumbosacral_junction_leaves_bodies_unnamed_with_a_reason():
    cents = 20.0 + SPACING * np.arange(6)
    geo = np.array([_body(c, 5.0, 5.0) for c in cents])  # parallel endplates throughout, image going on below
    names, conf, flags, notes = label_levels(cents, geo, np.full(6, 30.0), CFG, fov_end_mm=cents[-1] + 150)
    assert names == [f"B{i + 1}" for i in range(6)] and "NO_LUMBOSACRAL_JUNCTION" in flags and conf < 0.5
    assert notes and "cannot be counted" in notes[0]
    assert label_levels(np.zeros(0), np.zeros((0, 4)), np.zeros(0), CFG)[2] == ["NO_BODIES"]


def test_a_disc_under_the_piece_read_as_s1_makes_it_a_mobile_l5():
    # L5 that looks like the sacrum's top (steep upper endplate, lower outline curving back, short) over the
    # real top of the sacrum; L4's lower endplate steep too (a held-out SPIDER slice: S1 named on L5)
    cents, geo, vols = _column(5, sacrum=True)
    geo[-3, 1] = -24.0  # L4
    geo[-2] = _body(cents[-2], -44.0, -24.0, height=20.0)  # L5
    without, _, _, _ = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100)
    assert without[-2:] == ["S1", ""]  # one level too low: the reading the disc corrects
    discs = np.full(len(cents) - 1, 0.4)  # the column's discs ...
    discs[-1] = 0.5  # ... and one between L5 and the sacrum's top
    names, _, _, _ = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100, discs=discs)
    assert names == ["T12", *LUMBAR, "S1"]
    # bone between them instead (S1 and the fused S2): no disc, the first reading stands
    discs[-1] = 0.05
    assert label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100, discs=discs)[0] == without


def test_a_small_compressed_body_in_the_rhythm_keeps_its_level():
    cents, geo, vols = _column()
    vols[1] = 6.0  # L1 fractured: a fifth of a normal body
    names, _, _, _ = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100)
    assert names == ["T12", *LUMBAR, "S1"]  # without it in the chain, T12 would be called L1
    # a small piece that is not where a level is missing stays out of the chain (a fragment)
    c2 = np.r_[cents[:2], cents[1] + 17, cents[2:]]
    g2 = np.vstack([geo[:2], _body(c2[2], 0, 0, 8), geo[2:]])
    names2, _, _, _ = label_levels(c2, g2, np.r_[30.0, 31.0, 6.0, vols[2:]], CFG, fov_end_mm=cents[-1] + 100)
    assert names2 == ["T12", "L1", "", "L2", "L3", "L4", "L5", "S1"]


def _parallelogram(shape, top: int, height: int, cols: slice, slope: float, value: int, lab=None):
    """A body whose upper and lower outlines rise ``slope`` rows per column towards posterior (larger columns)."""
    lab = np.zeros(shape, np.int32) if lab is None else lab
    for j in range(cols.start, cols.stop):
        r0 = int(round(top - slope * (j - cols.start)))
        lab[r0: r0 + height, j, :] = value
    return lab


def test_body_geometry_reads_endplate_tilts_heights_and_bottoms():
    shape = (120, 60, 3)
    lab = _parallelogram(shape, 20, 24, slice(10, 50), 0.0, 1)  # flat
    lab = _parallelogram(shape, 90, 16, slice(10, 50), np.tan(np.radians(20)), 2, lab)  # anterior edge lower
    geo = body_geometry(lab, np.array([1, 2]), (1.5, 1.0, 1.0))
    assert geo.shape == (2, len(GEOMETRY_COLUMNS))
    assert np.allclose(geo[0, :2], 0.0, atol=0.5) and geo[0, 2] == pytest.approx(23 * 1.5)
    assert geo[0, 3] == pytest.approx(43 * 1.5)
    # rows are 1.5 mm, columns 1 mm: tan(tilt) = 1.5 * tan(20 deg) rows per column, negative (anterior lower)
    expected = -np.degrees(np.arctan(1.5 * np.tan(np.radians(20))))
    assert np.allclose(geo[1, :2], expected, atol=2.0) and geo[1, 2] == pytest.approx(15 * 1.5)


def test_disc_contrast_sees_a_disc_of_either_brightness_and_not_fused_bone():
    shape = (80, 40, 3)
    lab = np.zeros(shape, np.int32)
    lab[10:30, 5:35] = 1
    lab[40:60, 5:35] = 2
    lab[64:74, 5:35] = 3  # fused to 2: bone between them
    image = np.full(shape, 100.0)
    image[30:40] = 30.0  # a dark (degenerated) disc between 1 and 2
    ks = pair_slices(lab, np.array([1, 2, 3]))
    assert list(ks) == [1, 1]
    dark = disc_contrasts(image[:, :, ks], lab, np.array([1, 2, 3]), ks)
    assert dark[0] == pytest.approx(70.0) and dark[1] == pytest.approx(0.0)
    image[30:40] = 180.0  # a bright (healthy) one
    assert disc_contrasts(image[:, :, ks], lab, np.array([1, 2, 3]), ks)[0] == pytest.approx(80.0)
    # neighbours that share no slice: nothing to read
    lab2 = lab.copy()
    lab2[:, :, 2][lab2[:, :, 2] == 2] = 0
    lab2[:, :, :2][lab2[:, :, :2] == 3] = 0
    ks2 = pair_slices(lab2, np.array([1, 2, 3]))
    assert ks2[1] == -1 and np.isnan(disc_contrasts(image[:, :, np.maximum(ks2, 0)], lab2, np.array([1, 2, 3]), ks2)[1])


# Floors for the shipped U-Net on real scans (level names of the annotated bodies; all in-sample for the net, the
# naming rules were set by hand on vb2 / vb3): on 2026-12-06 these three scans were named 17 of 17 correctly
# (vb3-33: L5 cut by the image's edge, S1 out of view; before issue 29 all 17 were unnamed or one level off).
REAL_CASES = ("vb2-05", "vb3-09", "vb3-33")
MIN_CORRECT, MAX_WRONG = 0.9, 0


def test_real_scans_get_their_level_names(vertebral_bodies_dir, tmp_path):
    from pipeline.evaluation.cases import read_cases
    from pipeline.evaluation.segmentation import evaluate_rows

    rows = [r for r in read_cases(vertebral_bodies_dir / "cases.csv") if r["case"] in REAL_CASES]
    assert len(rows) == len(REAL_CASES)
    cfg = SegmentationConfig(refine_edges=False)  # the names are given before the edges are refined
    summary = evaluate_rows(rows, tmp_path, write_png=False, first_levels={"vb2": "T11", "vb3": "L1"}, cfg=cfg)
    counts = {k: sum(s[k] for s in summary["level_naming"].values()) for k in ("correct", "wrong", "unnamed")}
    assert sum(counts.values()) == 7 + 2 * 5
    assert counts["correct"] >= MIN_CORRECT * sum(counts.values()) and counts["wrong"] <= MAX_WRONG, summary


def _spider_like_cases(tmp_path, n=3):
    import nibabel as nib

    affine = np.array([[0, 0, 4.0, 0], [0, -0.5, 0, 0], [-0.5, 0, 0, 0], [0, 0, 0, 1]])  # as the SPIDER slices
    lines = ["case,patient,t1,t2,n_discs"]
    for i in range(n):
        for kind in ("t1", "t2"):
            nib.save(nib.Nifti1Image(np.ones((60, 50, 1), np.float32), affine), tmp_path / f"c{i}_{kind}.nii.gz")
        lines.append(f"c{i},{i},c{i}_t1.nii.gz,c{i}_t2.nii.gz,6")
    (tmp_path / "cases.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "cases.csv"


def test_level_evaluation_scores_our_l5_against_a_reading(tmp_path, monkeypatch):
    from pipeline.errors import StudyError
    from pipeline.evaluation import levels
    from pipeline.segmentation import segment
    from pipeline.types import Segmentation, VertebralBody

    calls = []

    def fake_segment(image, spacing, cfg=None, extra_images=None, **_):
        assert extra_images and extra_images[0].shape == image.shape  # the T1 goes along, on the T2's grid
        assert spacing[0] == pytest.approx(0.5)
        calls.append(1)
        case = (len(calls) - 1) % 3
        if case == 2:
            raise StudyError("SEGMENTATION_FAILED", "no vertebral body was found")
        if case == 1:
            return Segmentation(np.zeros(image.shape, np.int16), [VertebralBody("B1", 101, (20.0, 10.0, 0.0), 1.0)],
                                0.2, ["NO_LUMBOSACRAL_JUNCTION"])
        bodies = [VertebralBody("L4", 4, (20.0, 10.0, 0.0), 1.0), VertebralBody("L5", 5, (40.0, 10.0, 0.0), 1.0)]
        return Segmentation(np.zeros(image.shape, np.int16), bodies, 0.8, [])

    monkeypatch.setattr(segment, "segment_vertebrae", fake_segment)
    cases = _spider_like_cases(tmp_path)
    reading = tmp_path / "reading.csv"
    # our L5 sits at row 40 of 0.5 mm rows = 20 mm from the top; c0 read 5 mm lower: the same body
    reading.write_text("case,l5_row_mm\nc0,25.0\nc1,20.0\n")
    summary = levels.evaluate_levels(cases, tmp_path / "out", reading, write_png=False)
    assert summary["outcomes"] == {"correct": 1, "wrong": 0, "unnamed": 1, "failed": 1, "not_read": 0}
    assert summary["unnamed_flags"] == ["NO_LUMBOSACRAL_JUNCTION"] and summary["correct_of_read_pct"] == 100.0
    rows = (tmp_path / "out" / "levels.csv").read_text().splitlines()
    assert len(rows) == 4 and "SEGMENTATION_FAILED" in rows[3]
    # a reading one body (35 mm) lower: our L5 is wrong; no reading at all: not read
    reading.write_text("case,l5_row_mm\nc0,55.0\n")
    assert levels.evaluate_levels(cases, tmp_path / "out2", reading, write_png=False)["outcomes"]["wrong"] == 1
    assert levels.evaluate_levels(cases, tmp_path / "out3", None, write_png=False)["outcomes"]["not_read"] == 1


# The first eight SPIDER slices (unseen scanners: 1.5 / 3 T, Siemens / Philips); docs/spider_l5_reading.csv puts
# L5 on all eight. On 2026-12-06 the cascade named all eight correctly; before issue 29, two were unnamed (no sacrum
# found). The default (auto: the one-pass net on a single slice) names seven as the reading does; on spider-016 its
# L5 is the reading's S1, where the experts' disc count sides with it. Four of the eight allow the disc count.
SPIDER_CASES, SPIDER_MIN_CORRECT = 8, 7


@pytest.mark.parametrize("body_model", ["unet", "auto"])
def test_spider_slices_get_l5_where_the_reading_and_the_experts_disc_count_put_it(repo_root, tmp_path, body_model):
    from conftest import SHARED_DATA

    from pipeline.config import SegmentationConfig
    from pipeline.evaluation.levels import evaluate_levels

    cases = SHARED_DATA / "modic-spider" / "cases.csv"
    if not cases.is_file():
        pytest.skip(f"real data not available: {cases} is absent (see README, 'Real data')")
    summary = evaluate_levels(cases, tmp_path, repo_root / "docs" / "spider_l5_reading.csv", write_png=False,
                              limit=SPIDER_CASES, cfg=SegmentationConfig(body_model=body_model))
    assert summary["outcomes"]["correct"] >= SPIDER_MIN_CORRECT, summary
    assert summary["outcomes"]["wrong"] <= (0 if body_model == "unet" else 1), summary
    if body_model == "auto":  # the lowest graded disc (counted down from the top) is the one under our L5
        assert summary["disc_count"]["ours"]["agrees"] >= 4 and summary["disc_count"]["ours"]["disagrees"] == 0


def test_two_bodies_are_no_column_even_when_the_lower_one_looks_like_l5():
    """A knee's femur and tibia (two body-sized blobs) once read as "L4, L5, S1 out of view": fewer than three
    bodies are never counted as lumbar levels, however L5-like the lower one's endplate is."""
    cents, geo, vols = _column(n_above_l5=1, sacrum=False)  # one body above an L5 with the lumbosacral wedge
    names, conf, flags, _ = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 20)
    assert names == ["B1", "B2"] and conf < 0.5 and "NO_LUMBOSACRAL_JUNCTION" in flags
    cents3, geo3, vols3 = _column(n_above_l5=2, sacrum=False)  # three bodies: counted
    names3, _, _, _ = label_levels(cents3, geo3, vols3, CFG, fov_end_mm=cents3[-1] + 20)
    assert names3 == ["L3", "L4", "L5"]


def test_the_nets_l5_evidence_names_the_column_when_the_sacrum_was_missed():
    """The one-pass net's P(L5) per body: with the sacrum missed, the shapes alone read the real L5 as the top of
    the sacrum (the failure seen on SPIDER slices); the net's L5 names it right, and a net that disagrees with a
    clear anatomy reading is flagged."""
    cents, geo, vols = _column()
    # the sacrum was not segmented, and the real L5 (index 5) looks like a sacral top: short, reversed wedge
    cents, geo, vols = cents[:-1], geo[:-1].copy(), vols[:-1]
    geo[5] = _body(cents[5], -32.0, 18.0, height=16.0)
    geo[4] = _body(cents[4], -10.0, -26.0)
    without, _, _, _ = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100)
    assert without[5] == "S1"  # the shapes alone: one level off
    evidence = np.r_[0.0, 0.0, 0.0, 0.02, 0.1, 0.9]
    names, _, flags, notes = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100, l5_evidence=evidence)
    assert names == ["T12", *LUMBAR]
    # the net moved the junction the shapes chose: the names follow it, flagged (a net can be confidently wrong)
    assert "LEVELS_UNCERTAIN" in flags and any("endplate shapes" in n for n in notes)
    with pytest.raises(ValueError, match="one value per component"):
        label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100, l5_evidence=evidence[:-1])
    # a clear anatomy reading and a net that is sure of another body: the names are flagged, not silently trusted
    cents, geo, vols = _column()
    names, conf, flags, notes = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100,
                                             l5_evidence=np.r_[0, 0, 0, 0, 0.6, 0.55, 0.0])
    assert "LEVELS_UNCERTAIN" in flags and any("network" in n for n in notes) and conf < 0.7
    sure = label_levels(cents, geo, vols, CFG, fov_end_mm=cents[-1] + 100, l5_evidence=np.r_[0, 0, 0, 0, 0, 0.9, 0])
    assert sure[0] == ["T12", *LUMBAR, "S1"] and "LEVELS_UNCERTAIN" not in sure[2]


def test_a_confidently_wrong_net_does_not_overrule_a_clear_shape_reading():
    """Two held-out scans (labelling inputs recorded from the one-pass nets that did not see them, 2026-12-08):
    vb3-11 (vb3 left out: an unseen water-fat contrast; S1 cut by the image's edge) and vb2-19 (fold 1; S1 seen
    whole). The endplate shapes read the junction right and clearly; the net is sure of the body above (vb3-11) or
    calls S1 'L5' (vb2-19). With ``L5_NET_WEIGHT`` 3 both were named one level off; the names now follow the
    shapes, and the disagreement is flagged. A third (vb3-33, fold 1) needs the net to win against wrong shapes:
    the three bound the weight from both sides (this test fails at 1.5 and at 3)."""
    vb3_11 = dict(
        cents=np.array([13.75, 44.62, 76.63, 112.28, 150.17, 184.91, 207.95]),
        vols=np.array([31.23, 40.07, 45.62, 49.3, 44.12, 42.66, 13.13]),
        geo=np.array([[0.0, 6.12, 24.0, 30.0], [16.54, 7.62, 24.0, 60.0], [17.93, 8.64, 24.0, 93.0],
                      [5.1, -7.93, 25.5, 129.0], [-12.49, -21.62, 25.5, 168.0], [-25.55, -28.42, 26.25, 205.5],
                      [-16.53, 4.71, 13.5, 217.5]]),
        cut=np.array([0, 0, 0, 0, 0, 0, 1], bool), fov=223.5, others=np.zeros(0),
        discs=np.array([44.47, 57.38, 57.88, 53.34, 43.53, 65.02]),
        l5=np.array([0, 0, 0, 0, 0.72, 0.12, 0]), truth=["L1", "L2", "L3", "L4", "L5", "S1"], first=1)
    vb2_19 = dict(
        cents=np.array([11.39, 41.28, 72.01, 104.1, 139.07, 175.68, 213.05, 251.29, 280.77]),
        vols=np.array([20.88, 22.67, 26.8, 30.9, 37.35, 42.79, 45.79, 40.68, 24.57]),
        geo=np.array([[0.0, 10.3, 21.75, 25.5], [10.28, 7.51, 21.0, 54.0], [11.19, 6.58, 22.5, 91.5],
                      [6.27, 1.89, 24.0, 120.0], [10.52, -1.02, 25.5, 153.0], [5.1, -0.82, 25.5, 190.5],
                      [-0.0, -6.72, 27.0, 229.5], [-15.57, -28.18, 25.5, 271.5], [-30.92, 14.77, 21.0, 298.5]]),
        cut=np.zeros(9, bool), fov=381.0, others=np.array([304.09]),
        discs=np.array([12.47, 15.23, 15.19, 15.95, 15.39, 16.58, 15.3, 7.81]),
        l5=np.array([0, 0, 0, 0, 0, 0, 0, 0.39, 0.64]),
        truth=["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"], first=1)
    # and the other way round (fold 1's vb3-33): the shapes read one level off (the real L5 is taken for the top of
    # the sacrum), the net is right (0.78 on L5): the net must still decide there (wrong below a weight of 2)
    vb3_33 = dict(
        cents=np.array([2.12, 24.1, 56.5, 89.2, 124.39, 161.79, 191.69]),
        vols=np.array([5.24, 32.46, 39.04, 43.67, 48.1, 44.79, 26.43]),
        geo=np.array([[0.0, 10.12, 4.5, 6.0], [16.24, 17.96, 24.0, 40.5], [14.75, 16.78, 25.5, 73.5],
                      [22.5, 15.0, 24.0, 105.0], [6.96, -3.79, 24.0, 139.5], [-17.63, -32.01, 25.5, 183.0],
                      [-26.06, 13.29, 16.5, 208.5]]),
        cut=np.zeros(7, bool), fov=223.5, others=np.array([166.84]),
        discs=np.array([31.75, 23.72, 36.91, 31.37, 31.91, 52.84]),
        l5=np.array([0, 0, 0, 0, 0, 0.13, 0.78]), truth=["L1", "L2", "L3", "L4", "L5"], first=2)
    for case in (vb3_11, vb2_19, vb3_33):
        names, _, flags, notes = label_levels(case["cents"], case["geo"], case["vols"], CFG, case["others"],
                                              case["cut"], fov_end_mm=case["fov"], discs=case["discs"],
                                              l5_evidence=case["l5"])
        f = case["first"]
        assert names[f:f + len(case["truth"])] == case["truth"], names
        assert "LEVELS_UNCERTAIN" in flags and any("network" in n for n in notes)

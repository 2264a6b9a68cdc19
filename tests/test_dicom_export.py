"""--dicom-out: DICOM SEG of the vertebral bodies and TID 1500 SR, checked against vertebrae.nii.gz / report.json."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from pipeline import phantom
from pipeline.batch.executors import get_executor
from pipeline.batch.run import run_batch
from pipeline.cli import main
from pipeline.config import Config
from pipeline.report.dicom_export import SCHEME, _apply_identity, modic_code, vertebra_code
from pipeline.report.schema import schema_errors
from pipeline.types import level_value

PATIENT = {"patient_name": "DICOMOUT^PLANTED", "patient_id": "PID-DICOMOUT-77"}


def _run(root: Path, out: Path) -> Path:
    # inline: in this process, so that a test's monkeypatch reaches the study (workers are separate processes)
    res = run_batch(root, out, Config(), jobs=1, progress=False, executor=get_executor("inline"),
                    options={"dicom_out": True, "overlays": "none", "write_masks": True})
    assert res.exit_code == 0, [(o.status, o.code, o.message) for o in res.outcomes]
    (study_out,) = [p.parent for p in out.glob("*/report.json")]
    return study_out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Seed 0 (Modic I at L4 inferior / L5 superior): RLE-compressed single-frame files in shuffled instance order,
    and the same study as enhanced multi-frame (one file per series)."""
    root = tmp_path_factory.mktemp("dicom_export")
    out = {}
    for name, kw in (("classic", {"transfer_syntax": "rle", "shuffle_instances": True}), ("enhanced", {"enhanced": True})):
        phantom.make_study(root / name / "in", 0, matrix=128, n_slices=15, study_name="s", **PATIENT, **kw)
        study_out = _run(root / name / "in", root / name / "out")
        out[name] = {"src": root / name / "in" / "s" / "DICOM", "out": study_out,
                     "report": json.loads((study_out / "report.json").read_text())}
    return out


def _t2_sources(run) -> list[pydicom.Dataset]:
    uid = run["report"]["series"]["T2"]["series_uid"]
    found = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(run["src"].rglob("*.dcm"))]
    return [ds for ds in found if ds.SeriesInstanceUID == uid]


def _seg_to_volume(seg: pydicom.Dataset, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Scatter every SEG frame into the working volume through the SEG's own plane geometry (independent of the
    exporter's sampling): pixel (r, c) at IPP + c*dc*IOP[:3] + r*dr*IOP[3:] (LPS) -> RAS -> inverse affine."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    dr, dc = (float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing)
    label_of = {int(s.SegmentNumber): level_value(str(s.SegmentLabel)) for s in seg.SegmentSequence}
    frames = seg.pixel_array.reshape((int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns)))
    inv = np.linalg.inv(affine)
    out = np.zeros(shape, np.int16)
    hits = np.zeros(shape, np.int32)
    for fi, per in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ipp = np.array(per.PlanePositionSequence[0].ImagePositionPatient, float)
        number = int(per.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        r, c = np.nonzero(frames[fi])
        lps = ipp + c[:, None] * dc * iop[:3] + r[:, None] * dr * iop[3:]
        ras = lps * np.array([-1.0, -1.0, 1.0])
        vox = ras @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(vox).astype(int)
        assert np.abs(vox - idx).max() < 1e-3, "SEG pixels do not fall on the T2 voxel grid"
        out[idx[:, 0], idx[:, 1], idx[:, 2]] = label_of[number]
        np.add.at(hits, (idx[:, 0], idx[:, 1], idx[:, 2]), 1)
    # no voxel may be claimed twice (by two segments or two frames)
    assert hits.max() <= 1
    return out


@pytest.mark.parametrize("variant", ["classic", "enhanced"])
def test_seg_references_t2_and_reproduces_label_volume(runs, variant):
    run = runs[variant]
    sources = _t2_sources(run)
    if variant == "enhanced":
        assert len(sources) == 1 and int(sources[0].NumberOfFrames) == 15
    else:
        assert len(sources) == 15
    seg = pydicom.dcmread(run["out"] / "seg.dcm")
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == run["report"]["series"]["T2"]["series_uid"]
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == {ds.SOPInstanceUID for ds in sources}

    # segments: one per vertebra of the report, labelled with the level name and coded anatomy
    by_label = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert set(by_label) == {v["level"] for v in run["report"]["vertebrae"]}
    for level, s in by_label.items():
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == vertebra_code(level).value
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.AnatomicalStructure.value
        assert s.SegmentAlgorithmName == "modicscan"

    # every SEG frame sits at the position of the source frame it says it was derived from
    ipp_of = {}
    for ds in sources:
        if "PerFrameFunctionalGroupsSequence" in ds:
            for k, per in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                ipp_of[(ds.SOPInstanceUID, k)] = per.PlanePositionSequence[0].ImagePositionPatient
        else:
            ipp_of[(ds.SOPInstanceUID, 1)] = ds.ImagePositionPatient
    for per in seg.PerFrameFunctionalGroupsSequence:
        src = per.DerivationImageSequence[0].SourceImageSequence[0]
        key = (src.ReferencedSOPInstanceUID, int(src.get("ReferencedFrameNumber", 1)))
        np.testing.assert_allclose(per.PlanePositionSequence[0].ImagePositionPatient, ipp_of[key], atol=1e-3)

    nii = nib.load(run["out"] / "vertebrae.nii.gz")
    truth = np.asarray(nii.dataobj).astype(np.int16)
    rebuilt = _seg_to_volume(seg, truth.shape, nii.affine)
    for value in np.unique(truth[truth > 0]):
        a, b = truth == value, rebuilt == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99, f"label {value}"
    np.testing.assert_array_equal(rebuilt, truth)

    # highdicom parses it back with the same segments
    hseg = hd.seg.segread(run["out"] / "seg.dcm")
    assert sorted(hseg.get_segment_numbers()) == list(range(1, len(by_label) + 1))


def _groups(run) -> dict[str, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.srread(run["out"] / "sr.dcm")
    groups = sr.content.get_volumetric_roi_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    assert len(by_id) == len(groups), "tracking identifiers must be unique"
    return by_id


def _value(group, concept: str) -> float | None:
    found = [m for m in group.get_measurements() if m.name.value == concept and m.name.scheme_designator == SCHEME]
    assert len(found) <= 1
    return found[0].value if found else None


@pytest.mark.parametrize("variant", ["classic", "enhanced"])
def test_sr_matches_report(runs, variant):
    run = runs[variant]
    report = run["report"]
    sr = pydicom.dcmread(run["out"] / "sr.dcm")
    seg = pydicom.dcmread(run["out"] / "seg.dcm")
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == _t2_sources(run)[0].StudyInstanceUID
    # evidence: the T2 images and the SEG
    evidence = {s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
                for st in sr.CurrentRequestedProcedureEvidenceSequence for s in st.ReferencedSeriesSequence}
    assert evidence[report["series"]["T2"]["series_uid"]] == {ds.SOPInstanceUID for ds in _t2_sources(run)}
    assert evidence[seg.SeriesInstanceUID] == {seg.SOPInstanceUID}
    assert any(i.CodingSchemeDesignator == SCHEME for i in sr.CodingSchemeIdentificationSequence)

    segment_label = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    groups = _groups(run)
    assert len(groups) == 3 * len(report["vertebrae"])
    n_modic = 0
    for vert in report["vertebrae"]:
        level = vert["level"]
        body = groups[f"{level} vertebral body"]
        assert body.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        (number,) = body.referenced_segment.referenced_segment_numbers
        assert segment_label[number] == level
        (edema,) = body.get_qualitative_evaluations(name=codes.SCT.Edema)
        assert edema.value == (codes.SCT.Present if vert["edema"]["present"] else codes.SCT.Absent)
        assert _value(body, "EDEMA-EXT-VOLUME") == pytest.approx(vert["edema"]["extent_volume_pct"], rel=1e-9, abs=1e-9)
        assert [s.value for s in body.finding_sites] == [vertebra_code(level)]
        for side, modifier in (("superior", codes.SCT.Superior), ("inferior", codes.SCT.Inferior)):
            ep = vert["endplates"][side]
            g = groups[f"{level} {side} endplate"]
            (modic,) = g.get_qualitative_evaluations(name=hd.sr.CodedConcept("MODIC-TYPE", SCHEME, "Modic type"))
            assert modic.value == modic_code(ep["modic_type"])
            n_modic += ep["modic_type"] != "0"
            (site,) = g.finding_sites
            assert g.referenced_segment.referenced_segment_numbers == [number]
            assert site.value == vertebra_code(level) and site.topographical_modifier == modifier
            signal = vert["zones"][side]["signal"]
            for role in ("T1", "T2", "STIR"):
                expected = (signal.get(role) or {}).get("ratio")
                got = _value(g, f"RATIO-{role}")
                if expected is None:
                    assert got is None
                else:
                    assert got == pytest.approx(expected, rel=1e-9), (level, side, role)
            assert _value(g, "MODIC-EXT-HEIGHT") == pytest.approx(ep["extent_height_pct"], rel=1e-9, abs=1e-9)
            assert _value(g, "MODIC-EXT-VOLUME") == pytest.approx(ep["extent_volume_pct"], rel=1e-9, abs=1e-9)
            assert _value(g, "MODIC-CONFIDENCE") == pytest.approx(ep["confidence"], rel=1e-9, abs=1e-9)
    assert n_modic >= 1, "the phantom plants Modic changes; the comparison must cover a non-zero type"
    # the disc level's Modic type (both endplates) on the endplates next to each disc
    disc_concept = hd.sr.CodedConcept("DISC-MODIC-TYPE", SCHEME, "Modic type of the disc level (both endplates)")
    for disc in report["discs"]:
        for level, side in ((disc["upper"], "inferior"), (disc["lower"], "superior")):
            (value,) = groups[f"{level} {side} endplate"].get_qualitative_evaluations(name=disc_concept)
            assert value.value == modic_code(disc["modic"]["modic_type"])


def test_identifiers_removed_by_default(runs):
    run = runs["classic"]
    src = _t2_sources(run)[0]
    planted = [PATIENT["patient_name"], PATIENT["patient_id"], str(src.PatientBirthDate), str(src.AccessionNumber),
               str(src.InstitutionName), str(src.ReferringPhysicianName)]
    key = run["report"]["study"]["key"]
    assert run["report"]["study"]["identifiers"] == "removed"
    for name in ("seg.dcm", "sr.dcm"):
        raw = (run["out"] / name).read_bytes()
        for value in planted:
            assert value.encode() not in raw, f"{value!r} leaked into {name}"
        ds = pydicom.dcmread(run["out"] / name)
        assert str(ds.PatientName).rstrip("^") == key and ds.PatientID == key and ds.PatientBirthDate == ""
        assert ds.StudyInstanceUID == src.StudyInstanceUID


def test_identity_modes():
    def fresh():
        ds = pydicom.Dataset()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = "A^B", "P1", "19700101", "ACC1"
        ds.StudyInstanceUID = "1.2.3"
        return ds

    ds = fresh()
    _apply_identity([ds], {"identifiers": "original", "key": "k1"})
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber) == ("A^B", "P1", "19700101", "ACC1")
    ds = fresh()
    _apply_identity([ds], {"identifiers": "pseudonymised", "key": "k1", "patient_id": "hash1"})
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber) == ("k1^", "hash1", "", "")
    assert ds.StudyInstanceUID == "1.2.3"
    ds = fresh()
    _apply_identity([ds], {"identifiers": "removed", "key": "k2", "patient_id": None})
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == ("k2^", "k2", "")


def test_cli_accepts_dicom_out(tmp_path):
    # The option used to exit with a usage error (2); on an empty folder it now reaches the batch (no studies: 4).
    (tmp_path / "in").mkdir()
    res = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--dicom-out", "--no-progress"])
    assert res.exit_code == 4, res.output
    assert "not available" not in res.output


def test_a_failing_export_keeps_the_report_with_a_warning(tmp_path, monkeypatch):
    from pipeline.report import dicom_export

    def broken(*args, **kwargs):
        raise ValueError("planted export failure")

    monkeypatch.setattr(dicom_export, "write_dicom_outputs", broken)
    phantom.make_study(tmp_path / "in", 1, matrix=96, n_slices=12, study_name="s", series=("T1", "T2"))
    study_out = _run(tmp_path / "in", tmp_path / "out")
    report = json.loads((study_out / "report.json").read_text())
    assert report["status"] == "analysed" and not (study_out / "seg.dcm").exists()
    assert any("planted export failure" in w for w in report["qc"]["warnings"])
    assert schema_errors(report) == []

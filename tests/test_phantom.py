"""Synthetic study generator: determinism, DICOM headers, geometry, truth labels and planted contrast.

The checks read the written DICOM files back with a small loader of their own (sort by position along
the slice normal, apply RescaleSlope) so they do not depend on pipeline.io, and derive the expected
regions from the truth label image, not from generator internals.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.config import ClassificationConfig
from pipeline.phantom.scenarios import normalise_findings, scenario_findings
from pipeline.phantom.study import make_sample_data, make_study
from pipeline.types import level_value

# ---------------------------------------------------------------------------------------------- helpers


def _series_dirs(study: Path) -> dict[str, Path]:
    truth = json.loads((study / "truth" / "findings.json").read_text())
    return {role: study / info["folder"] for role, info in truth["series"].items()}


def _read_series(folder: Path) -> tuple[np.ndarray, np.ndarray, list[pydicom.Dataset]]:
    """Stack a classic or enhanced series into (rows, cols, slices) ascending along the slice normal.

    Returns the float image (rescaled), a 4x4 voxel -> LPS matrix and the datasets.
    """
    dss = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    if len(dss) == 1 and int(getattr(dss[0], "NumberOfFrames", 1)) > 1:
        ds = dss[0]
        sh = ds.SharedFunctionalGroupsSequence[0]
        iop = np.array(sh.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
        ps = np.array(sh.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
        ipps = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
                for f in ds.PerFrameFunctionalGroupsSequence]
        frames = ds.pixel_array.astype(np.float64)
        slope = 1.0
        if "PixelValueTransformationSequence" in sh:
            slope = float(sh.PixelValueTransformationSequence[0].RescaleSlope)
        planes = [frames[i] * slope for i in range(frames.shape[0])]
    else:
        iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
        ps = np.array(dss[0].PixelSpacing, dtype=float)
        ipps = [np.array(d.ImagePositionPatient, dtype=float) for d in dss]
        planes = [d.pixel_array.astype(np.float64) * float(getattr(d, "RescaleSlope", 1.0))
                  + float(getattr(d, "RescaleIntercept", 0.0)) for d in dss]
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    pos = np.array([p @ normal for p in ipps])
    order = np.argsort(pos)
    vol = np.stack([planes[i] for i in order], axis=2)
    step = np.diff(pos[order]).mean() if len(pos) > 1 else 1.0
    m = np.eye(4)
    m[:3, 0] = col * ps[0]  # row index moves along the column cosine
    m[:3, 1] = row * ps[1]
    m[:3, 2] = normal * step
    m[:3, 3] = ipps[order[0]]
    return vol, m, dss


def _multi(value) -> list[str]:
    """A DICOM multi-valued string as a list (pydicom gives a plain str when only one value is stored)."""
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _truth(study: Path) -> dict:
    return json.loads((study / "truth" / "findings.json").read_text())


def _labels(study: Path) -> nib.Nifti1Image:
    return nib.load(study / "truth" / "labels.nii.gz")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("phantoms")
    res = {}
    for seed in (0, 1, 2, 3):
        truth = make_study(out, seed)
        res[seed] = out / truth["study_name"]
    return res


def _volumes(study: Path) -> dict[str, np.ndarray]:
    return {role: _read_series(folder)[0] for role, folder in _series_dirs(study).items()}


def _endplate_band(mask2d: np.ndarray, endplate: str, depth_vox: float, rim_vox: float) -> np.ndarray:
    """Per column of a sagittal body mask: voxels within depth of the top / bottom edge (rim excluded)."""
    rows = np.arange(mask2d.shape[0])[:, None]
    has = mask2d.any(axis=0)
    top = np.where(has, np.argmax(mask2d, axis=0), 0)
    bottom = np.where(has, mask2d.shape[0] - 1 - np.argmax(mask2d[::-1], axis=0), 0)
    dist = rows - top[None, :] if endplate == "superior" else bottom[None, :] - rows
    # keep the central 60 % of the AP extent so rounded corners and cortex do not dominate
    cols = np.nonzero(has)[0]
    lo, hi = cols.min(), cols.max()
    central = np.zeros(mask2d.shape[1], dtype=bool)
    central[int(lo + 0.2 * (hi - lo)): int(hi - 0.2 * (hi - lo)) + 1] = True
    return mask2d & (dist >= rim_vox) & (dist <= depth_vox) & central[None, :]


def _core(mask2d: np.ndarray) -> np.ndarray:
    rows = np.nonzero(mask2d.any(axis=1))[0]
    cols = np.nonzero(mask2d.any(axis=0))[0]
    r0, r1 = rows.min(), rows.max()
    c0, c1 = cols.min(), cols.max()
    box = np.zeros_like(mask2d)
    box[int(r0 + 0.35 * (r1 - r0)): int(r1 - 0.35 * (r1 - r0)) + 1, int(c0 + 0.25 * (c1 - c0)): int(c1 - 0.25 * (c1 - c0)) + 1] = True
    return mask2d & box


def _band_ratios(study: Path, level: str, endplate: str, depth_mm: float, ref_level: str) -> dict[str, float]:
    """Median in the endplate band of ``level`` / median of the core of ``ref_level``, central slices only."""
    lab = np.asarray(_labels(study).dataobj)
    spacing = np.linalg.norm(_labels(study).affine[:3, :3], axis=0)
    vols = _volumes(study)
    k_mid = lab.shape[2] // 2
    ks = range(k_mid - 1, k_mid + 2)
    out = {}
    for role, vol in vols.items():
        band_vals, ref_vals = [], []
        for k in ks:
            m = lab[:, :, k] == level_value(level)
            band = _endplate_band(m, endplate, (depth_mm - 1.5) / spacing[0], 2.5 / spacing[0])
            band_vals.append(vol[:, :, k][band])
            ref_vals.append(vol[:, :, k][_core(lab[:, :, k] == level_value(ref_level))])
        out[role] = float(np.median(np.concatenate(band_vals)) / np.median(np.concatenate(ref_vals)))
    return out


# ---------------------------------------------------------------------------------------------- tests


def test_deterministic_bytes(tmp_path):
    a = make_study(tmp_path / "a", 7, matrix=96, n_slices=7, transfer_syntax="rle")
    b = make_study(tmp_path / "b", 7, matrix=96, n_slices=7, transfer_syntax="rle")
    assert a == b
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 3 * 7 + 2
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    c = make_study(tmp_path / "c", 8, matrix=96, n_slices=7, transfer_syntax="rle")
    assert c["study_uid"] != a["study_uid"]
    assert {s["series_uid"] for s in c["series"].values()}.isdisjoint({s["series_uid"] for s in a["series"].values()})


def test_headers_present_and_sequence_parameters(studies):
    seen_vendors = set()
    for seed, study in studies.items():
        truth = _truth(study)
        for role, folder in _series_dirs(study).items():
            files = sorted(folder.glob("*.dcm"))
            assert len(files) == 15
            sop_uids = set()
            for f in files:
                ds = pydicom.dcmread(f)
                assert ds.SOPClassUID == pydicom.uid.MRImageStorage
                assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                sop_uids.add(ds.SOPInstanceUID)
                assert ds.Modality == "MR"
                assert str(ds.PatientName) == f"PHANTOM^SEED{seed}"
                assert ds.PatientID and ds.PatientBirthDate and ds.AccessionNumber and ds.StudyDate
                assert ds.StudyInstanceUID == truth["study_uid"]
                assert ds.SeriesInstanceUID == truth["series"][role]["series_uid"]
                assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
                assert float(ds.MagneticFieldStrength) in (1.5, 3.0)
                assert ds.Rows == 256 and ds.Columns == 256
                assert "WindowCenter" in ds and "WindowWidth" in ds
                tr, te = float(ds.RepetitionTime), float(ds.EchoTime)
                if role == "T1":
                    assert tr < 1000 and te < 30
                elif role == "T2":
                    assert tr > 2000 and te >= 60 and "InversionTime" not in ds
                else:
                    assert float(ds.InversionTime) <= 250
                    assert "IR" in _multi(ds.ScanningSequence) + _multi(ds.ScanOptions)
            assert len(sop_uids) == 15
            seen_vendors.add(ds.Manufacturer)
    assert len(seen_vendors) == 3


def test_geometry_step_equals_spacing_and_frame(studies):
    for study in studies.values():
        img = _labels(study)
        assert nib.aff2axcodes(img.affine) == ("I", "P", "R")
        for folder in _series_dirs(study).values():
            vol, m, dss = _read_series(folder)
            iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
            np.testing.assert_allclose(iop, [0, 1, 0, 0, 0, -1])
            normal = np.cross(iop[:3], iop[3:])
            pos = np.sort([np.array(d.ImagePositionPatient, dtype=float) @ normal for d in dss])
            np.testing.assert_allclose(np.diff(pos), float(dss[0].SpacingBetweenSlices), atol=1e-4)
            assert normal @ np.array([-1.0, 0, 0]) > 0.99  # ascending slices run toward patient Right
            # the truth affine (RAS) must be the DICOM voxel -> LPS geometry with x, y flipped
            np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ m, img.affine, atol=1e-3)
            assert vol.shape == img.shape


def test_instance_numbers_shuffled_on_odd_seed(studies):
    for seed, expect_shuffled in ((0, False), (1, True)):
        dss = [pydicom.dcmread(f) for f in sorted(_series_dirs(studies[seed])["T2"].glob("*.dcm"))]
        inst = [int(d.InstanceNumber) for d in dss]
        pos = [-float(d.ImagePositionPatient[0]) for d in dss]  # position toward patient Right
        agrees = list(np.argsort(inst)) == list(np.argsort(pos))
        assert agrees != expect_shuffled


def test_truth_labels_consistent_with_anatomy(studies):
    for study in studies.values():
        truth = _truth(study)
        lab = np.asarray(_labels(study).dataobj)
        assert lab.dtype == np.int16
        values = set(np.unique(lab)) - {0}
        for level in ("L1", "L2", "L3", "L4", "L5", "S1"):
            assert level_value(level) in values, level
        # bodies ordered top -> bottom along axis 0; centroids near the mid-sagittal slice
        rows = [np.nonzero(lab == level_value(lv))[0].mean() for lv in ("L1", "L2", "L3", "L4", "L5", "S1")]
        assert all(np.diff(rows) > 15)
        voxel_ml = float(np.prod(np.linalg.norm(_labels(study).affine[:3, :3], axis=0))) / 1000.0
        for lv in ("L1", "L2", "L3", "L4", "L5"):
            ml = (lab == level_value(lv)).sum() * voxel_ml
            assert 12.0 < ml < 60.0, (lv, ml)  # adult lumbar bodies: ~20-40 ml
            assert truth["vertebrae"][lv]["present"]
        # bodies occupy the middle slices but not the outermost (kidney-shaped, ~45 mm wide)
        per_slice = (lab == level_value("L3")).sum(axis=(0, 1))
        assert per_slice[len(per_slice) // 2] > 5 * max(per_slice[0], per_slice[-1], 1) or per_slice[0] == 0


def test_truth_findings_expected_types(studies):
    v0 = _truth(studies[0])["vertebrae"]
    assert v0["L4"]["endplates"]["inferior"] == {"modic": "I", "edema": True}
    assert v0["L5"]["endplates"]["superior"] == {"modic": "I", "edema": True}
    assert v0["L3"]["endplates"]["inferior"] == {"modic": "0", "edema": False}
    v1 = _truth(studies[1])["vertebrae"]
    assert v1["S1"]["endplates"]["superior"]["modic"] == "II" and not v1["S1"]["endplates"]["superior"]["edema"]
    t2 = _truth(studies[2])
    assert t2["vertebrae"]["L1"]["pattern_flags"] == ["POSSIBLE_ACUTE_FRACTURE"]
    assert t2["vertebrae"]["L3"]["endplates"]["inferior"]["modic"] == "III"
    t3 = _truth(studies[3])
    assert t3["findings"] == [] and t3["pattern_flags"] == []
    assert all(e["modic"] == "0" for v in t3["vertebrae"].values() for e in v["endplates"].values())


@pytest.mark.parametrize(
    "seed,level,endplate,expect",
    [
        (0, "L4", "inferior", {"T1": "low", "T2": "high", "STIR": "high"}),
        (0, "L5", "superior", {"T1": "low", "T2": "high", "STIR": "high"}),
        (1, "L5", "inferior", {"T1": "high", "T2": "iso-high", "STIR": "low"}),
        (1, "S1", "superior", {"T1": "high", "T2": "iso-high", "STIR": "low"}),
        (2, "L3", "inferior", {"T1": "low", "T2": "low", "STIR": "low"}),
        (3, "L4", "inferior", {"T1": "iso", "T2": "iso", "STIR": "iso"}),
    ],
)
def test_planted_band_contrast(studies, seed, level, endplate, expect):
    study = studies[seed]
    depth = next((f["depth_mm"] for f in _truth(study)["findings"] if f.get("level") == level), 8.0)
    ratios = _band_ratios(study, level, endplate, depth, ref_level="L2")
    # the default classification thresholds are what the planted contrast has to clear
    th = ClassificationConfig()
    for role, want in expect.items():
        r = ratios[role]
        low, high = (th.t1_low, th.t1_high) if role == "T1" else (th.fluid_low, th.fluid_high)
        if want == "low":
            assert r < low, (role, r)
        elif want == "high":
            assert r > high, (role, r)
        elif want == "iso-high":
            assert 1.0 < r < th.fluid_high, (role, r)
        else:  # normal marrow next to an endplate: close to the reference, clear of both thresholds
            assert max(low, 0.85) < r < min(high, 1.15), (role, r)


def test_fracture_wedge_and_whole_body_edema(studies):
    study = studies[2]
    lab = np.asarray(_labels(study).dataobj)
    vols = _volumes(study)
    k = lab.shape[2] // 2
    l1, l2 = lab[:, :, k] == level_value("L1"), lab[:, :, k] == level_value("L2")
    core1, core2 = _core(l1), _core(l2)
    assert np.median(vols["STIR"][:, :, k][core1]) > 1.5 * np.median(vols["STIR"][:, :, k][core2])
    assert np.median(vols["T1"][:, :, k][core1]) < 0.8 * np.median(vols["T1"][:, :, k][core2])

    def heights(mask):  # column heights over the anterior and posterior fifth of the body
        cols = np.nonzero(mask.any(axis=0))[0]
        h = mask.sum(axis=0)
        w = max(1, (cols[-1] - cols[0]) // 5)
        return np.median(h[cols[0] + 1: cols[0] + 1 + w]), np.median(h[cols[-1] - w: cols[-1]])

    ant1, post1 = heights(l1)
    ant2, post2 = heights(l2)
    assert ant1 / post1 < 0.85 * ant2 / post2  # L1 is wedged, L2 is not


def test_infection_bright_disc_and_edema(tmp_path):
    truth = make_study(tmp_path, 11, findings=[{"kind": "infection", "disc": "L3-L4"}])
    study = tmp_path / truth["study_name"]
    assert truth["vertebrae"]["L3"]["pattern_flags"] == ["POSSIBLE_INFECTION"]
    assert truth["vertebrae"]["L4"]["endplates"]["superior"]["edema"]
    lab = np.asarray(_labels(study).dataobj)
    vols = _volumes(study)
    k = lab.shape[2] // 2

    def disc_region(upper, lower):  # rows strictly between the two bodies, within their shared columns
        m_up, m_lo = lab[:, :, k] == level_value(upper), lab[:, :, k] == level_value(lower)
        cols = np.nonzero(m_up.any(axis=0) & m_lo.any(axis=0))[0]
        cols = cols[len(cols) // 4: 3 * len(cols) // 4]
        reg = np.zeros_like(m_up)
        for c in cols:  # a handful of columns
            bottom = np.nonzero(m_up[:, c])[0].max()
            top = np.nonzero(m_lo[:, c])[0].min()
            reg[bottom + 2: top - 1, c] = True
        return reg

    infected = disc_region("L3", "L4")
    normal = disc_region("L1", "L2")
    assert infected.sum() > 10 and normal.sum() > 10
    # the infected disc is bright on STIR (like fluid), above a healthy disc
    assert np.median(vols["STIR"][:, :, k][infected]) > 1.05 * np.median(vols["STIR"][:, :, k][normal])
    ratios = _band_ratios(study, "L4", "superior", 8.0, ref_level="L2")
    assert ratios["STIR"] > 1.5 and ratios["T1"] < 0.8


@pytest.mark.parametrize("ts", ["rle", "jpeg2000", "jpegls"])
def test_compressed_transfer_syntaxes_are_lossless(tmp_path, ts):
    ref = make_study(tmp_path / "ref", 4, matrix=64, n_slices=5, series=("T2",))
    comp = make_study(tmp_path / "c", 4, matrix=64, n_slices=5, series=("T2",), transfer_syntax=ts)
    a = _read_series(tmp_path / "ref" / ref["study_name"] / ref["series"]["T2"]["folder"])
    b = _read_series(tmp_path / "c" / comp["study_name"] / comp["series"]["T2"]["folder"])
    assert b[2][0].file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(a[0], b[0])


def test_enhanced_multiframe_matches_classic(tmp_path):
    classic = make_study(tmp_path / "c", 5, matrix=64, n_slices=6)
    multi = make_study(tmp_path / "m", 5, matrix=64, n_slices=6, enhanced=True)
    for role in ("T1", "T2", "STIR"):
        folder = tmp_path / "m" / multi["study_name"] / multi["series"][role]["folder"]
        files = list(folder.glob("*.dcm"))
        assert len(files) == 1
        ds = pydicom.dcmread(files[0])
        assert ds.SOPClassUID == pydicom.uid.EnhancedMRImageStorage
        assert int(ds.NumberOfFrames) == 6 and len(ds.PerFrameFunctionalGroupsSequence) == 6
        sh = ds.SharedFunctionalGroupsSequence[0]
        timing = sh.MRTimingAndRelatedParametersSequence[0]
        te = float(sh.MREchoSequence[0].EffectiveEchoTime)
        assert (float(timing.RepetitionTime) < 1000) == (role == "T1")
        assert (te >= 60) == (role != "T1")
        assert (sh.MRModifierSequence[0].InversionRecovery == "YES") == (role == "STIR")
        a = _read_series(tmp_path / "c" / classic["study_name"] / classic["series"][role]["folder"])
        b = _read_series(folder)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], atol=1e-4)


def test_variants_no_t1_and_axial(tmp_path):
    t = make_study(tmp_path, 3, series=("T2", "STIR"), matrix=64, n_slices=5, study_name="not1")
    assert set(t["series"]) == {"T2", "STIR"}
    assert len(list((tmp_path / "not1" / "DICOM").iterdir())) == 2
    ax = make_study(tmp_path, 3, orientation="axial", series=("T2",), matrix=96, n_slices=9, study_name="ax")
    vol, m, dss = _read_series(tmp_path / "ax" / ax["series"]["T2"]["folder"])
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    assert abs(np.cross(iop[:3], iop[3:]) @ np.array([0, 0, 1.0])) > 0.99  # normal along S-I
    img = _labels(tmp_path / "ax")
    assert nib.aff2axcodes(img.affine) == ("I", "P", "R")
    lab = np.asarray(img.dataobj)
    assert lab.shape == (9, 96, 96) and (lab > 0).any()
    # the DICOM voxel of a labelled truth voxel, mapped through both affines, is the same point in space
    ijk = np.argwhere(lab > 0)[0]
    ras = img.affine @ np.r_[ijk, 1.0]
    lps = np.diag([-1, -1, 1, 1]) @ ras
    vox = np.linalg.solve(m, lps)
    assert np.allclose(vox, np.round(vox), atol=1e-3)


def test_rescale_slope_roundtrip(tmp_path):
    plain = make_study(tmp_path / "p", 9, matrix=64, n_slices=5, series=("T1",), rescale=False)
    scaled = make_study(tmp_path / "s", 9, matrix=64, n_slices=5, series=("T1",), rescale=True)
    ds = pydicom.dcmread(sorted((tmp_path / "s" / scaled["study_name"] / "DICOM").rglob("*.dcm"))[0])
    assert float(ds.RescaleSlope) != 1.0
    a = _read_series(tmp_path / "p" / plain["study_name"] / plain["series"]["T1"]["folder"])[0]
    b = _read_series(tmp_path / "s" / scaled["study_name"] / scaled["series"]["T1"]["folder"])[0]
    # quantisation differs (one stored step = slope), physical values agree
    assert np.abs(a - b).max() <= float(ds.RescaleSlope) + 1.0


def test_extra_tags_and_identifiers(tmp_path):
    t = make_study(tmp_path, 12, matrix=48, n_slices=5, series=("T2",), patient_name="DOE^JANE",
                   patient_id="MRN123", extra_tags={"ContrastBolusAgent": "GADOLINIUM", "StationName": None})
    ds = pydicom.dcmread(sorted((tmp_path / t["study_name"]).rglob("*.dcm"))[0])
    assert str(ds.PatientName) == "DOE^JANE" and ds.PatientID == "MRN123"
    assert ds.ContrastBolusAgent == "GADOLINIUM" and "StationName" not in ds


def test_random_scenarios_are_reproducible_and_valid():
    for seed in range(4, 40):
        f = scenario_findings(seed)
        assert f == scenario_findings(seed)
        normalise_findings(f)  # raises on anything malformed
    assert any(scenario_findings(s) for s in range(4, 40))


@pytest.mark.parametrize(
    "bad",
    [
        [{"kind": "modic", "type": "IV", "level": "L4", "endplate": "inferior"}],
        [{"kind": "modic", "type": "I", "level": "L9", "endplate": "inferior"}],
        [{"kind": "fracture", "level": "L1", "height_loss": 0.9}],
        [{"kind": "infection", "disc": "L2-L4"}],
        [{"kind": "tumour"}],
    ],
)
def test_bad_findings_rejected(bad):
    with pytest.raises(ValueError):
        normalise_findings(bad)


def test_speed_256(tmp_path):
    t0 = time.perf_counter()
    make_study(tmp_path, 21)
    elapsed = time.perf_counter() - t0
    assert elapsed < 8.0, elapsed  # target < 3 s on an idle core; margin for a shared CI machine


def test_matrix_512(tmp_path):
    t = make_study(tmp_path, 22, matrix=512, n_slices=3, series=("T2",))
    ds = pydicom.dcmread(sorted((tmp_path / t["study_name"]).rglob("*.dcm"))[0])
    assert ds.Rows == 512 and abs(float(ds.PixelSpacing[0]) - 280.0 / 512) < 1e-6
    assert (np.asarray(_labels(tmp_path / t["study_name"]).dataobj) == level_value("L3")).any()


def test_committed_sample_data_is_reproducible(repo_root, tmp_path):
    sample = repo_root / "sample_data"
    if not (sample / "phantom_seed0001" / "truth" / "findings.json").is_file():
        pytest.skip("sample_data/ not generated yet")
    truths = make_sample_data(tmp_path)
    assert [t["seed"] for t in truths] == [0, 1, 2, 3]
    for t in truths:
        name = t["study_name"]
        assert (sample / name / "truth" / "findings.json").read_text() == (tmp_path / name / "truth" / "findings.json").read_text()
        for f in sorted((tmp_path / name / "DICOM").rglob("*.dcm"))[::7]:
            rel = f.relative_to(tmp_path)
            assert (sample / rel).read_bytes() == f.read_bytes(), rel


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "phantom_seed0003" / "notes").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        make_study(tmp_path, 3, matrix=32, n_slices=3)
    assert (tmp_path / "phantom_seed0003" / "notes").is_dir()
    make_study(tmp_path, 4, matrix=32, n_slices=3)
    make_study(tmp_path, 4, matrix=32, n_slices=3)  # a previous phantom study is replaced


def test_geometry_agrees_with_dcm2niix(tmp_path):
    """An independent converter must place the T2 series where the truth affine says it is."""
    exe = shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix)")
    for enhanced in (False, True):
        out = tmp_path / f"mf{int(enhanced)}"
        t = make_study(out, 2, matrix=64, n_slices=7, series=("T2",), enhanced=enhanced)
        conv = out / "nii"
        conv.mkdir()
        subprocess.run([exe, "-z", "y", "-o", str(conv), "-f", "%s", str(out / t["study_name"] / "DICOM")],
                       check=True, capture_output=True, timeout=120)
        (nii,) = list(conv.glob("*.nii.gz"))
        a = nib.as_closest_canonical(nib.load(nii))
        b = nib.as_closest_canonical(_labels(out / t["study_name"]))
        assert a.shape[:3] == b.shape
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-2)


def test_series_with_own_matrix(tmp_path):
    t = make_study(tmp_path, 0, matrix=96, n_slices=7, series_matrix={"STIR": 64})
    study = tmp_path / t["study_name"]
    lab_img = _labels(study)
    assert lab_img.shape == (96, 96, 7)  # truth stays on the T2 grid
    t2, m2, _ = _read_series(study / t["series"]["T2"]["folder"])
    stir, ms, dss = _read_series(study / t["series"]["STIR"]["folder"])
    assert stir.shape == (64, 64, 7) and dss[0].Rows == 64
    # both grids cover the same field of view: their outer voxel corners coincide in patient space
    for m, n in ((m2, 96), (ms, 64)):
        corner = m @ np.array([-0.5, -0.5, 0, 1.0])
        far = m @ np.array([n - 0.5, n - 0.5, 0, 1.0])
        np.testing.assert_allclose(corner, m2 @ np.array([-0.5, -0.5, 0, 1.0]), atol=1e-3)
        np.testing.assert_allclose(far, m2 @ np.array([95.5, 95.5, 0, 1.0]), atol=1e-3)
    # the bodies sit at the same place: mean label position mapped to the STIR grid is bright-marrow-free (dark on STIR)
    ijk = np.argwhere(np.asarray(lab_img.dataobj) == level_value("L3")).mean(axis=0)
    lps = np.diag([-1, -1, 1, 1]) @ lab_img.affine @ np.r_[ijk, 1.0]
    i, j, k = np.rint(np.linalg.solve(ms, lps)[:3]).astype(int)
    assert stir[i, j, k] < np.percentile(stir, 80)

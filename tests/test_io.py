"""Discovery and loading: geometry, slice order, compressed and multi-frame data, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline import phantom
from pipeline.arrays import fortran_copy
from pipeline.config import RolesConfig
from pipeline.errors import StudyError
from pipeline.io.discovery import discover
from pipeline.io.nifti import load_nifti, resample_to, save_nifti
from pipeline.io.volumes import load_series, native_pixels
from pipeline.roles import weighting

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def _series_by_desc(study, word):
    return next(s for s in study.series.values() if word in s.series_description.lower())


@pytest.fixture(scope="module")
def small_studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    out = {}
    for ts in ("explicit", "rle", "jpeg2000", "jpegls"):
        phantom.make_study(root / ts, 5, matrix=96, n_slices=8, series=("T2",), transfer_syntax=ts, study_name="s")
        out[ts] = root / ts / "s"
    phantom.make_study(root / "enh", 5, matrix=96, n_slices=8, series=("T2",), enhanced=True, study_name="s")
    out["enhanced"] = root / "enh" / "s"
    return out


def _only_volume(folder):
    d = discover(folder)
    (st,) = d.studies.values()
    (s,) = st.series.values()
    return load_series(s), s


def test_sample_geometry_matches_the_phantom_truth():
    d = discover(SAMPLE)
    assert len(d.studies) == 4
    for st in d.studies.values():
        t2 = next(s for s in st.series.values() if s.repetition_time and s.repetition_time > 3000 and not s.inversion_time)
        vol = load_series(t2)
        truth = nib.load(Path(st.root).parent / "truth" / "labels.nii.gz")
        assert vol.shape == truth.shape
        np.testing.assert_allclose(vol.affine, truth.affine, atol=1e-3)
        assert nib.aff2axcodes(vol.affine) == ("I", "P", "R")


def test_slices_sorted_by_position_not_instance_number(tmp_path):
    src = SAMPLE / "phantom_seed0000"
    shutil.copytree(src / "DICOM", tmp_path / "DICOM")
    files = sorted((tmp_path / "DICOM").rglob("*.dcm"))
    ref, _ = _only_volume_series(tmp_path, "t2")
    # Scramble InstanceNumber and file names of the T2 series: the volume must not change.
    t2_files = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription == "t2_tse_sag"]
    rng = np.random.default_rng(0)
    numbers = rng.permutation(len(t2_files)) + 1
    for f, n in zip(t2_files, numbers, strict=True):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = int(n)
        f.unlink()
        ds.save_as(f.with_name(f"X{n:03d}.dcm"))
    vol, _ = _only_volume_series(tmp_path, "t2")
    np.testing.assert_array_equal(vol.data, ref.data)
    np.testing.assert_allclose(vol.affine, ref.affine)


def _only_volume_series(folder, word):
    d = discover(folder)
    (st,) = d.studies.values()
    s = _series_by_desc(st, word)
    return load_series(s), s


@pytest.mark.parametrize("ts", ["rle", "jpeg2000", "jpegls", "enhanced"])
def test_compressed_and_multiframe_load_like_uncompressed(small_studies, ts):
    ref, _ = _only_volume(small_studies["explicit"])
    vol, s = _only_volume(small_studies[ts])
    assert vol.shape == ref.shape
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(vol.data, ref.data, rtol=1e-5, atol=1e-3)
    if ts == "enhanced":
        assert len(s.files) == 1 and s.n_frames == ref.shape[2]


def test_enhanced_fat_suppression_read_from_its_value_not_its_presence(small_studies, tmp_path):
    # "NONE" is the standard value on a series without suppression; only FAT means fat-sat.
    (src,) = (small_studies["enhanced"] / "DICOM").rglob("*.dcm")
    kinds = {}
    for value in ("NONE", "FAT"):
        folder = tmp_path / value / "DICOM"
        folder.mkdir(parents=True)
        ds = pydicom.dcmread(src)
        ds.SpectrallySelectedSuppression = value
        ds.save_as(folder / "IM_0001.dcm")
        (st,) = discover(folder).studies.values()
        (s,) = st.series.values()
        kinds[value] = weighting(s, RolesConfig()).kind
    assert kinds == {"NONE": "T2", "FAT": "T2FS"}


def test_missing_slice_is_a_spacing_error(small_studies, tmp_path):
    shutil.copytree(small_studies["explicit"] / "DICOM", tmp_path / "DICOM")
    d = discover(tmp_path)
    (st,) = d.studies.values()
    (s,) = st.series.values()
    vol = load_series(s)
    # remove the file holding the middle slice (by position)
    middle = vol.meta["slice_files"][len(s.files) // 2]
    Path(middle).unlink()
    d = discover(tmp_path)
    (st,) = d.studies.values()
    (s,) = st.series.values()
    with pytest.raises(StudyError) as e:
        load_series(s)
    assert e.value.code == "SLICE_SPACING_INCONSISTENT" and "missing" in e.value.message


def test_missing_geometry_tag_is_named(tmp_path):
    phantom.make_study(tmp_path, 6, matrix=64, n_slices=6, series=("T2",), extra_tags={"PixelSpacing": None},
                       study_name="s")
    d = discover(tmp_path)
    (s,) = next(iter(d.studies.values())).series.values()
    with pytest.raises(StudyError) as e:
        load_series(s)
    assert e.value.code == "GEOMETRY_MISSING" and "PixelSpacing" in e.value.message


def test_discovery_skips_bad_files_with_reasons_and_counts_duplicates_once(small_studies, tmp_path):
    shutil.copytree(small_studies["explicit"] / "DICOM", tmp_path / "DICOM")
    one = sorted((tmp_path / "DICOM").rglob("*.dcm"))[0]
    shutil.copy(one, tmp_path / "copy_of_first.dcm")  # same SOPInstanceUID twice
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "truncated.dcm").write_bytes(one.read_bytes()[:200])
    d = discover(tmp_path)
    reasons = {Path(s.path).name: s.reason for s in d.skipped}
    assert reasons["empty.dcm"] == "EMPTY_FILE"
    assert reasons["notes.txt"] == "NOT_DICOM" and reasons[".DS_Store"] == "NOT_DICOM"
    assert reasons["truncated.dcm"] in ("UNREADABLE", "NOT_DICOM", "INCOMPLETE_HEADER")
    assert "DUPLICATE_INSTANCE" in reasons.values()
    (st,) = d.studies.values()
    (s,) = st.series.values()
    assert s.n_frames == 8 and load_series(s).shape[2] == 8


def test_nifti_roundtrip_reorients_to_the_working_frame(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7)).astype(np.float32)
    aff = np.array([[2.0, 0, 0, -10], [0, 0, 1.5, 4], [0, -1.0, 0, 30], [0, 0, 0, 1]])  # RAS-ish, permuted
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "x.nii.gz")
    vol = load_nifti(tmp_path / "x.nii.gz")
    assert nib.aff2axcodes(vol.affine) == ("I", "P", "R")
    # the same world point carries the same value
    ijk = np.array([1, 2, 3])
    world = aff @ np.r_[ijk, 1]
    ijk2 = np.rint(np.linalg.inv(vol.affine) @ world).astype(int)[:3]
    assert vol.data[tuple(ijk2)] == data[tuple(ijk)]
    save_nifti(vol.data, vol.affine, tmp_path / "y.nii.gz")
    back = nib.load(tmp_path / "y.nii.gz")
    np.testing.assert_allclose(back.affine, vol.affine)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _raw_image(rows, cols, allocated, stored, signed, ts=ExplicitVRLittleEndian, seed=0, photometric="MONOCHROME2"):
    """A dataset read back from disk whose pixel bytes are random, unused high bits included."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, stored, stored - 1, signed
    n = rows * cols * allocated // 8
    ds.PixelData = np.random.default_rng(seed).integers(0, 256, n + n % 2, dtype=np.uint8).tobytes()
    buf = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, little_endian=ts != ExplicitVRBigEndian,
                     implicit_vr=ts == ImplicitVRLittleEndian)
    buf.seek(0)
    return pydicom.dcmread(buf, force=True)


@pytest.mark.parametrize("allocated,stored,signed", [(16, 12, 0), (16, 12, 1), (16, 16, 0), (16, 16, 1), (8, 8, 0),
                                                     (8, 5, 1), (32, 20, 1), (32, 32, 0)])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_pixels_are_what_pydicom_decodes(allocated, stored, signed, ts):
    ds = _raw_image(7, 9, allocated, stored, signed, ts)  # odd pixel count: an 8-bit image has a padding byte
    fast = native_pixels(ds)
    want = ds.pixel_array
    assert fast is not None and fast.dtype == want.dtype and fast.shape == want.shape == (7, 9)
    np.testing.assert_array_equal(fast, want)
    if stored < allocated:  # the random unused high bits were really cleared / sign-extended
        assert fast.min() >= (-(1 << (stored - 1)) if signed else 0) and fast.max() < (1 << (stored - signed))


def test_native_pixels_leave_anything_unusual_to_pydicom():
    assert native_pixels(_raw_image(4, 4, 16, 12, 0, ExplicitVRBigEndian)) is None
    assert native_pixels(_raw_image(4, 4, 16, 12, 0, photometric="PALETTE COLOR")) is None
    short = _raw_image(4, 4, 16, 12, 0)
    short.PixelData = short.PixelData[:-2]
    assert native_pixels(short) is None
    frames = _raw_image(4, 4, 16, 12, 0)
    frames.NumberOfFrames = 1
    assert native_pixels(frames) is None
    odd = _raw_image(4, 4, 16, 17, 0)  # BitsStored > BitsAllocated: pydicom's error, not ours
    assert native_pixels(odd) is None


@pytest.mark.parametrize("shape", [(130, 70, 9), (5, 6), (3, 200, 1), (70, 2, 3, 4)])
def test_fortran_copy_is_asfortranarray(shape):
    a = np.random.default_rng(1).integers(-50, 50, shape).astype(np.int16)
    for src in (a, a[::-1], np.asfortranarray(a)):
        out = fortran_copy(src)
        assert out.flags.f_contiguous and out.dtype == src.dtype
        np.testing.assert_array_equal(out, src)


def test_saved_nifti_holds_the_array_whatever_its_memory_order(tmp_path):
    data = np.random.default_rng(2).integers(0, 9, (70, 40, 6)).astype(np.int16)
    aff = np.diag([0.5, 0.5, 4.0, 1.0])
    for name, arr in (("c", data), ("f", np.asfortranarray(data)), ("view", data[:, ::-1][:, ::-1])):
        save_nifti(arr, aff, tmp_path / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj), data)


def test_resample_to_is_identity_on_same_grid_and_follows_affines():
    from pipeline.types import Volume

    i, j, k = np.meshgrid(np.arange(20), np.arange(20), np.arange(10), indexing="ij")
    field = (2.0 * i + 3.0 * j + 5.0 * k).astype(np.float32)  # linear: trilinear resampling is exact
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    src = Volume(field, aff)
    assert resample_to(src, Volume(field, aff.copy())) is src
    shifted = aff.copy()
    shifted[:3, 3] = [1.0, 2.0, 2.0]  # target voxel (0,0,0) is source voxel (1,2,1)
    out = resample_to(src, Volume(np.zeros((10, 10, 5), np.float32), shifted))
    assert out.data[0, 0, 0] == pytest.approx(2 * 1 + 3 * 2 + 5 * 1)
    assert out.data[3, 4, 2] == pytest.approx(2 * 4 + 3 * 6 + 5 * 3)


def test_dcm2niix_agrees_on_world_geometry(tmp_path):
    """Cross-check our affine and pixel order against dcm2niix on a sample series."""
    import subprocess

    try:
        import dcm2niix  # noqa: F401 - the PyPI wheel ships the binary
        from dcm2niix import bin as dcm2niix_bin
    except ImportError:
        pytest.skip("dcm2niix (PyPI) is not installed")
    src = SAMPLE / "phantom_seed0001" / "DICOM"
    vol, s = _only_volume_series(src.parent, "t2")
    series_dir = Path(s.files[0]).parent
    subprocess.run([dcm2niix_bin, "-z", "y", "-f", "out", "-o", str(tmp_path), str(series_dir)], check=True,
                   capture_output=True)
    ref = nib.as_closest_canonical(nib.load(next(tmp_path.glob("out*.nii.gz"))))
    ours = nib.as_closest_canonical(nib.Nifti1Image(vol.data, vol.affine))
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
    np.testing.assert_allclose(np.asarray(ours.dataobj), np.asarray(ref.dataobj, dtype=np.float32), rtol=1e-4, atol=1e-3)


def test_study_error_crosses_a_process_boundary_with_its_code_message_and_details():
    # Workers (process pools, dask) send exceptions back pickled; a StudyError that cannot be rebuilt breaks the
    # pool ("A process in the process pool was terminated abruptly") instead of failing one study.
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    err = pickle.loads(pickle.dumps(StudyError("TOO_FEW_SLICES", "3 slices", details={"n": 3})))
    assert (err.code, err.message, err.details, str(err)) == ("TOO_FEW_SLICES", "3 slices", {"n": 3}, "TOO_FEW_SLICES: 3 slices")
    with ProcessPoolExecutor(1) as ex:
        with pytest.raises(StudyError) as info:
            ex.submit(_raise_study_error).result()
    assert info.value.code == "IMAGE_EMPTY" and info.value.details == {"why": "test"}


def _raise_study_error():
    raise StudyError("IMAGE_EMPTY", "all voxels are zero", details={"why": "test"})

"""Generator of hostile inputs: small phantom studies broken in one documented way each.

``build_corpus(root)`` writes one folder per case under ``root`` and returns the cases; every case
says what the pipeline must do with it (``expect``: "analysed" and/or reason codes that are acceptable;
a tuple with one entry per study the folder holds).  docs/bad_input.md is the same table in words.
The studies are small (96 px, 12 slices, T1 + T2) so one batch over the whole corpus stays fast.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRBigEndian, generate_uid

from pipeline import phantom
from pipeline.report.schema import schema_errors

MATRIX = 96
N_SLICES = 12
ANALYSED = "analysed"


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    expect: tuple[frozenset[str], ...]  # one set of acceptable outcomes per study (folder-level failures count)
    build: Callable[[Path, int], None]  # (case folder, unique seed)


# ---------------------------------------------------------------------------------------------- helpers
def strict_json(path: Path) -> dict:
    """Parse JSON refusing NaN / Infinity (they are not JSON and would break downstream readers)."""
    def bad(token):
        raise ValueError(f"{path}: non-finite number {token} in JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=bad)


def assert_one_complete_record(out: Path, study: dict) -> None:
    """The batch contract for one study entry of batch.json: exactly one record in its folder, complete -
    a schema-valid report.json when analysed, an error.json agreeing with batch.json when failed."""
    if study["key"].startswith("folder-"):
        return  # folders without any DICOM series are recorded in batch.json only
    folder = out / study["key"]
    records = sorted(n for n in ("report.json", "error.json") if (folder / n).exists())
    if study["status"] == "analysed":
        assert records == ["report.json"], (study, records)
        assert schema_errors(strict_json(folder / "report.json")) == []
    else:
        assert records == ["error.json"], (study, records)
        err = strict_json(folder / "error.json")
        assert err["error"]["code"] == study["code"] and err["error"]["message"] == study["message"]


def assert_no_temp_files(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert leftovers == []


def _study(case_dir: Path, seed: int, **kw) -> Path:
    """A small phantom study in ``case_dir/DICOM``; the truth folder is removed (it is not DICOM)."""
    kw.setdefault("series", ("T1", "T2"))
    phantom.make_study(case_dir.parent, seed, matrix=MATRIX, n_slices=N_SLICES, study_name=case_dir.name, **kw)
    shutil.rmtree(case_dir / "truth", ignore_errors=True)
    return case_dir / "DICOM"


def _series_files(dicom_dir: Path, role: str) -> list[Path]:
    """Files of the series whose description names ``role`` ('SAG T2 FSE', 't2_tse_sag', 'T2W_TSE SAG'), in slice order."""
    out = []
    for p in sorted(dicom_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if re.search(rf"(?<![a-z0-9]){role.lower()}", str(ds.get("SeriesDescription", "")).lower()):
            out.append((float(np.dot(ds.ImagePositionPatient, np.cross(ds.ImageOrientationPatient[:3],
                                                                          ds.ImageOrientationPatient[3:]))), p))
    assert out, f"no {role} series under {dicom_dir}"
    return [p for _, p in sorted(out)]


def _edit(files: list[Path], fn: Callable[[pydicom.Dataset, int], None]) -> None:
    for i, p in enumerate(files):
        ds = pydicom.dcmread(p)
        fn(ds, i)
        ds.save_as(p)


def _set_pixels(ds: pydicom.Dataset, arr: np.ndarray) -> None:
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.PixelRepresentation = 0


def _png_bytes(size: int = 8) -> bytes:
    """A valid tiny greyscale PNG (so the 'not DICOM' file is a real image, not random bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(range(size)) for _ in range(size))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _junk_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "scan.png").write_bytes(_png_bytes())
    (folder / "notes.txt").write_text("referral letter, not an image\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))


# ---------------------------------------------------------------------------------------------- builders
def b_baseline(d: Path, seed: int) -> None:
    _study(d, seed)


def b_junk_only(d: Path, seed: int) -> None:
    _junk_files(d)


def b_junk_beside_study(d: Path, seed: int) -> None:
    dicom = _study(d, seed)
    _junk_files(dicom / "SE002")


def b_truncated_only(d: Path, seed: int) -> None:
    """Every file cut to 300 bytes: the header is incomplete, nothing is usable."""
    dicom = _study(d, seed)
    for p in dicom.rglob("*.dcm"):
        p.write_bytes(p.read_bytes()[:300])


def b_truncated_slice(d: Path, seed: int) -> None:
    """One T2 slice lost the second half of its pixel data (header intact)."""
    dicom = _study(d, seed)
    p = _series_files(dicom, "T2")[N_SLICES // 2]
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - MATRIX * MATRIX])


def b_no_pixel_data(d: Path, seed: int) -> None:
    dicom = _study(d, seed)
    _edit(_series_files(dicom, "T2"), lambda ds, i: delattr(ds, "PixelData"))


def _drop(keyword: str):
    def build(d: Path, seed: int) -> None:
        dicom = _study(d, seed)
        _edit(_series_files(dicom, "T2"), lambda ds, i: delattr(ds, keyword))
    return build


def b_duplicate_instances(d: Path, seed: int) -> None:
    dicom = _study(d, seed)
    for p in _series_files(dicom, "T2")[:3]:
        shutil.copy(p, p.with_name("copy_of_" + p.name))


def b_mixed_series_one_folder(d: Path, seed: int) -> None:
    dicom = _study(d, seed)
    flat = d / "flat"
    flat.mkdir()
    for p in dicom.rglob("*.dcm"):
        p.rename(flat / f"{p.parent.name}_{p.name}")
    shutil.rmtree(dicom)


def b_two_studies_one_folder(d: Path, seed: int) -> None:
    tmp = d / "tmp"
    for k in range(2):
        phantom.make_study(tmp, seed + k * 1000, matrix=MATRIX, n_slices=N_SLICES, series=("T1", "T2"),
                           study_name=f"s{k}")
    flat = d / "DICOM"
    flat.mkdir(parents=True)
    for k in range(2):
        for p in (tmp / f"s{k}" / "DICOM").rglob("*.dcm"):
            p.rename(flat / f"s{k}_{p.parent.name}_{p.name}")
    shutil.rmtree(tmp)


def b_missing_slice(d: Path, seed: int) -> None:
    dicom = _study(d, seed)
    _series_files(dicom, "T2")[N_SLICES // 2].unlink()


def b_inconsistent_spacing(d: Path, seed: int) -> None:
    """The last three T2 slices are 2.5 mm further out: the gaps are 4,4,...,6.5,4,4."""
    dicom = _study(d, seed)
    files = _series_files(dicom, "T2")

    def shift(ds, i):
        if i >= N_SLICES - 3:
            normal = np.cross(ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:])
            ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(ds.ImagePositionPatient, float) + 2.5 * normal]
    _edit(files, shift)


def b_oblique(d: Path, seed: int) -> None:
    """Both series rotated 15 degrees in plane (about the slice normal): still sagittal, same grid."""
    dicom = _study(d, seed)
    a = np.deg2rad(15.0)

    def rotate(ds, i):
        r, c = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        r2, c2 = np.cos(a) * r + np.sin(a) * c, -np.sin(a) * r + np.cos(a) * c
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*r2, *c2)]
    _edit(sorted(dicom.rglob("*.dcm")), rotate)


def b_axial_only(d: Path, seed: int) -> None:
    _study(d, seed, orientation="axial")


def b_localiser_mixed(d: Path, seed: int) -> None:
    """Three single-slice localiser images in three orientations added as their own series."""
    dicom = _study(d, seed)
    src = _series_files(dicom, "T2")[N_SLICES // 2]
    series_uid = generate_uid()
    iops = ([0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1])
    (dicom / "LOC").mkdir()
    for k, iop in enumerate(iops):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription, ds.ImageType, ds.SeriesNumber, ds.InstanceNumber = "LOCALIZER", ["ORIGINAL", "PRIMARY", "LOCALIZER"], 99, k + 1
        ds.ImageOrientationPatient = iop
        ds.save_as(dicom / "LOC" / f"IM_{k + 1:04d}.dcm")


def b_signed_pixels(d: Path, seed: int) -> None:
    """T2 stored as signed 16-bit with a negative offset (some scanners): values must be read as signed."""
    dicom = _study(d, seed)

    def signed(ds, i):
        arr = ds.pixel_array.astype(np.int32) - 1000
        ds.PixelRepresentation = 1
        ds.PixelData = arr.astype(np.int16).tobytes()
    _edit(_series_files(dicom, "T2"), signed)


def b_rescale(d: Path, seed: int) -> None:
    _study(d, seed, rescale=True)


def b_big_endian(d: Path, seed: int) -> None:
    dicom = _study(d, seed)
    for p in sorted(dicom.rglob("*.dcm")):
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = arr.astype(">u2" if ds.PixelRepresentation == 0 else ">i2").tobytes()
        pydicom.dcmwrite(p, ds, little_endian=False, implicit_vr=False)


def _ts(name: str):
    return lambda d, seed: _study(d, seed, transfer_syntax=name)


def b_enhanced(d: Path, seed: int) -> None:
    _study(d, seed, enhanced=True)


def b_odd_text(d: Path, seed: int) -> None:
    """Non-ASCII names and a 5000-character description (beyond the VR's length limit)."""
    _study(d, seed, patient_name="Ðøñ^Ålvarez-Šćęż", extra_tags={"StudyDescription": "ЛПНП поясничный " * 300,
                                                                 "InstitutionName": "病院 Klinik Ünïcode"})


def b_knee(d: Path, seed: int) -> None:
    """Headers say KNEE; the pixels show two large rounded bones and soft tissue, no spine."""
    dicom = _study(d, seed, extra_tags={"BodyPartExamined": "KNEE", "StudyDescription": "MRI KNEE"})
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:MATRIX, 0:MATRIX].astype(np.float32) / MATRIX
    femur = ((xx - 0.5) / 0.22) ** 2 + ((yy - 0.25) / 0.3) ** 2 < 1
    tibia = ((xx - 0.5) / 0.2) ** 2 + ((yy - 0.8) / 0.22) ** 2 < 1
    soft = ((xx - 0.5) / 0.42) ** 2 < 1
    for role, (bone, tissue) in {"T1": (900, 500), "T2": (400, 300)}.items():
        def paint(ds, i, bone=bone, tissue=tissue):
            img = tissue * soft + (bone - tissue) * (femur | tibia) + rng.normal(0, 20, (MATRIX, MATRIX))
            _set_pixels(ds, np.clip(img, 0, 4000))
        _edit(_series_files(dicom, role), paint)


def b_all_zero(d: Path, seed: int) -> None:
    dicom = _study(d, seed)
    _edit(_series_files(dicom, "T2"), lambda ds, i: _set_pixels(ds, np.zeros((MATRIX, MATRIX))))


def b_zero_reference(d: Path, seed: int) -> None:
    """T1 is zero everywhere except one corner pixel: the marrow reference is 0 and ratios would be x/0."""
    dicom = _study(d, seed)

    def zero(ds, i):
        img = np.zeros((MATRIX, MATRIX))
        img[0, 0] = 100
        _set_pixels(ds, img)
    _edit(_series_files(dicom, "T1"), zero)


def b_only_t2(d: Path, seed: int) -> None:
    _study(d, seed, series=("T2",))


def _ok(*extra: str) -> frozenset[str]:
    return frozenset({ANALYSED, *extra})


def _fail(*codes: str) -> frozenset[str]:
    return frozenset(codes)


CASES: tuple[Case, ...] = (
    Case("baseline", "intact T1 + T2 study", (_ok(),), b_baseline),
    Case("junk_only", "folder of a zero-byte file, a PNG, a text file and a .DS_Store", (_fail("NO_DICOM_FILES"),), b_junk_only),
    Case("junk_beside_study", "the same junk inside a series folder of an intact study", (_ok(),), b_junk_beside_study),
    Case("truncated_only", "every file truncated to 300 bytes", (_fail("NO_DICOM_FILES"),), b_truncated_only),
    Case("truncated_slice", "one T2 slice with half of its pixel data cut off",
         (_fail("PIXEL_DATA_UNREADABLE", "SLICE_SPACING_INCONSISTENT"),), b_truncated_slice),
    Case("no_pixel_data", "T2 files without the PixelData element", (_fail("NO_SAGITTAL_T2", "PIXEL_DATA_UNREADABLE"),),
         b_no_pixel_data),
    Case("missing_position", "T2 without ImagePositionPatient", (_fail("GEOMETRY_MISSING"),), _drop("ImagePositionPatient")),
    Case("missing_spacing", "T2 without PixelSpacing", (_fail("GEOMETRY_MISSING"),), _drop("PixelSpacing")),
    Case("missing_orientation", "T2 without ImageOrientationPatient",
         (_fail("GEOMETRY_MISSING", "NO_SAGITTAL_T2"),), _drop("ImageOrientationPatient")),
    Case("duplicate_instances", "three T2 files copied under a second name", (_ok(),), b_duplicate_instances),
    Case("mixed_series_one_folder", "T1 and T2 files in one flat folder", (_ok(),), b_mixed_series_one_folder),
    Case("two_studies_one_folder", "two patients' studies in one flat folder", (_ok(), _ok()), b_two_studies_one_folder),
    Case("missing_slice", "the middle T2 slice deleted", (_fail("SLICE_SPACING_INCONSISTENT"),), b_missing_slice),
    Case("inconsistent_spacing", "one T2 gap of 6.5 mm among 4 mm gaps", (_fail("SLICE_SPACING_INCONSISTENT"),),
         b_inconsistent_spacing),
    Case("oblique", "both series rotated 15 degrees in plane", (_ok(),), b_oblique),
    Case("axial_only", "axial T1 + T2 only", (_fail("NO_SAGITTAL_SERIES"),), b_axial_only),
    Case("localiser_mixed", "a three-plane localiser series beside T1 + T2", (_ok(),), b_localiser_mixed),
    Case("signed_pixels", "T2 stored as signed int16 with negative values", (_ok(),), b_signed_pixels),
    Case("rescale", "values stored with RescaleSlope / RescaleIntercept", (_ok(),), b_rescale),
    Case("big_endian", "Explicit VR Big Endian transfer syntax (retired)", (_ok(),), b_big_endian),
    Case("jpegls", "JPEG-LS lossless compressed", (_ok(),), _ts("jpegls")),
    Case("jpeg2000", "JPEG 2000 lossless compressed", (_ok(),), _ts("jpeg2000")),
    Case("rle", "RLE lossless compressed", (_ok(),), _ts("rle")),
    Case("enhanced", "enhanced multi-frame MR (one file per series)", (_ok(),), b_enhanced),
    Case("odd_text", "non-ASCII names, a 5000-character description", (_ok(),), b_odd_text),
    Case("knee", "BodyPartExamined KNEE, pixels without a spine", (_fail("SEGMENTATION_FAILED", "NO_LUMBAR_LEVELS"),), b_knee),
    Case("all_zero", "T2 all zero", (_fail("IMAGE_EMPTY"),), b_all_zero),
    Case("zero_reference", "T1 zero except one pixel (reference marrow signal 0)",
         (_fail("IMAGE_EMPTY", "REFERENCE_MARROW_UNAVAILABLE", ANALYSED),), b_zero_reference),
    Case("only_t2", "a study with only a sagittal T2", (_fail("NO_SAGITTAL_T1", ANALYSED),), b_only_t2),
)


def build_corpus(root: Path, cases: tuple[Case, ...] = CASES, seed0: int = 500) -> list[Case]:
    """Write every case under ``root/<case.name>``; seeds differ per case so every study has its own UIDs."""
    root.mkdir(parents=True, exist_ok=True)
    for k, case in enumerate(cases):
        case.build(root / case.name, seed0 + 7 * k)  # builders create the folder (make_study refuses an existing one)
    return list(cases)

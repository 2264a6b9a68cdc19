"""Issue 30, input side, headers: geometry that is not geometry and duplicate instances (docs/bad_input.md,
rows 8 and 9). Every input is generated here (small phantom studies, pydicom edits, sparse files)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pydicom.encaps
import pytest
from hostile import (
    MATRIX,
    N_SLICES,
    edit_files,
    make_study,
    only_study,
    run_memory_limited,
)

from pipeline import phantom
from pipeline.config import LoadingConfig
from pipeline.errors import StudyError
from pipeline.io.volumes import load_series


# ---------------------------------------------------------------------------------------------- 8: geometry
def _scale_row(ds, i):
    iop = np.asarray(ds.ImageOrientationPatient, float)
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*(1.3 * iop[:3]), *iop[3:])]


def _skew(ds, i):
    iop = np.asarray(ds.ImageOrientationPatient, float)
    col = iop[3:] + 0.3 * iop[:3]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*iop[:3], *(col / np.linalg.norm(col)))]


def _spacing(value):
    return lambda ds, i: setattr(ds, "PixelSpacing", [value, value])


def _shear(ds, i):
    col = np.asarray(ds.ImageOrientationPatient[3:], float)
    ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(ds.ImagePositionPatient, float) + 3.0 * i * col]


@pytest.mark.parametrize("edit, words", [
    (_scale_row, "unit"), (_skew, "right angles"), (_spacing("-0.9"), "not positive"),
    (_spacing("0"), "not positive"), (_spacing("1e-4"), "plausible"), (_shear, "sheared"),
], ids=["non_unit_orientation", "non_orthogonal_orientation", "negative_spacing", "zero_spacing", "tiny_spacing",
        "sheared_slices"])
def test_geometry_that_is_not_geometry_is_refused(tmp_path, edit, words):
    """Item 8: analysed silently with a wrong grid, or INTERNAL_ERROR (spacing 0 / 1e-4). Now GEOMETRY_INVALID."""
    s = make_study(tmp_path, "s", 41, series=("T2",))
    edit_files(sorted(s.rglob("*.dcm")), edit)
    st, _ = only_study(tmp_path)
    with pytest.raises(StudyError) as exc:
        load_series(next(iter(st.series.values())))
    assert exc.value.code == "GEOMETRY_INVALID" and words in exc.value.message


def test_one_slice_series_with_min_slices_1(tmp_path):
    """Item 8: `min_slices: 1` on a one-slice series ended as INTERNAL_ERROR (no gap: NaN affine). Now the slice
    thickness is the slice's extent; without one the reason is GEOMETRY_MISSING."""
    phantom.make_study(tmp_path, 44, matrix=MATRIX, n_slices=1, series=("T2",), study_name="s")
    st, _ = only_study(tmp_path)
    (summary,) = st.series.values()
    cfg = LoadingConfig(min_slices=1)
    vol = load_series(summary, cfg)
    assert np.isfinite(vol.affine).all() and sorted(vol.spacing)[-1] == pytest.approx(summary.slice_thickness)
    with pytest.raises(StudyError) as exc:
        load_series(summary)  # the default min_slices
    assert exc.value.code == "TOO_FEW_SLICES"
    summary.slice_thickness = None
    with pytest.raises(StudyError) as exc:
        load_series(summary, cfg)
    assert exc.value.code == "GEOMETRY_MISSING"


# ---------------------------------------------------------------------------------------------- 9: duplicates
def test_conflicting_duplicate_instances_refuse_the_series(tmp_path):
    """Item 9: two files with one SOPInstanceUID and different pixels: the one sorting first silently won."""
    s = make_study(tmp_path, "s", 45, series=("T2",))
    files = sorted(s.rglob("*.dcm"))
    ds = pydicom.dcmread(files[5])
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()
    ds.save_as(files[5].with_name("AAA_other.dcm"))
    shutil.copy(files[7], files[7].with_name("ZZZ_exact_copy.dcm"))
    st, d = only_study(tmp_path)
    reasons = {Path(x.path).name: x.reason for x in d.skipped}
    assert reasons[files[5].name] == "DUPLICATE_INSTANCE_CONFLICT"  # AAA_other sorts first and is kept
    assert reasons["ZZZ_exact_copy.dcm"] == "DUPLICATE_INSTANCE"
    with pytest.raises(StudyError) as exc:
        load_series(next(iter(st.series.values())))
    assert exc.value.code == "DUPLICATE_INSTANCE_CONFLICT"


def _sparse_pixels(src: Path, dst: Path, size: int, last: bytes = b"\0") -> None:
    """``src`` with its pixel data element grown to ``size`` bytes: a hole on disk, then ``last``."""
    data = src.read_bytes()
    i = data.index(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    with open(dst, "wb") as fh:
        fh.write(data[:i] + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<I", size))
        fh.seek(i + 12 + size - len(last))
        fh.write(last)


def test_duplicates_of_a_huge_file_are_compared_without_loading_the_pixels(tmp_path):
    """Review of issue 30 (items 2 and 9 together): telling an exact duplicate from a conflicting one loaded both
    pixel data elements whole, in the batch process (which has no memory isolation): two copies of a 1.2 GB file
    took 2.4 GB during discovery; under a 1.5 GB address-space limit the exact copy was misreported as
    DUPLICATE_INSTANCE_CONFLICT (MemoryError taken for "differs"), without a limit the batch could be OOM-killed
    at every rerun. Now the elements are compared a chunk at a time."""
    s = make_study(tmp_path, "s", 46, series=("T2",))
    files = sorted(s.rglob("*.dcm"))
    size = 1_200_000_000
    _sparse_pixels(files[3], files[3], size)
    _sparse_pixels(files[3], files[3].with_name("ZZZ_exact_copy.dcm"), size)
    _sparse_pixels(files[6], files[6], size)
    _sparse_pixels(files[6], files[6].with_name("ZZZ_other.dcm"), size, last=b"\1")
    out = run_memory_limited(f"""
        import os
        from pipeline.io.discovery import discover
        d = discover({str(tmp_path)!r})
        print(json.dumps({{os.path.basename(s.path): s.reason for s in d.skipped}}))
    """, 1_500_000_000)
    assert out == {"ZZZ_exact_copy.dcm": "DUPLICATE_INSTANCE", "ZZZ_other.dcm": "DUPLICATE_INSTANCE_CONFLICT"}


def test_an_exact_copy_of_a_file_without_preamble_is_no_conflict(tmp_path):
    """Review of issue 30, item 9: discovery accepts files written without the 128-byte preamble, but the duplicate
    check read them without ``force`` and took "unreadable" for "different": an exact copy of such a file was
    DUPLICATE_INSTANCE_CONFLICT and its whole series refused. It is a plain DUPLICATE_INSTANCE again. Loading read
    such a file without ``force`` as well (PIXEL_DATA_UNREADABLE): it loads now."""
    import io

    s = make_study(tmp_path, "s", 47, series=("T2",))
    f = sorted(s.rglob("*.dcm"))[4]
    ds = pydicom.dcmread(f)
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    raw = buf.getvalue()
    assert raw[128:132] != b"DICM"
    f.write_bytes(raw)
    f.with_name("ZZZ_copy.dcm").write_bytes(raw)
    st, d = only_study(tmp_path)
    assert [(Path(x.path).name, x.reason) for x in d.skipped] == [("ZZZ_copy.dcm", "DUPLICATE_INSTANCE")]
    # and the series loads: reading the pixels without force failed the study PIXEL_DATA_UNREADABLE
    assert N_SLICES in load_series(next(iter(st.series.values()))).shape



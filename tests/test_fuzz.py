"""Hypothesis fuzzing of headers and pixels of a small phantom study: the batch contract always holds.

Contract per example: exactly one record for the study; analysed -> a report.json that passes the schema,
failed -> an error.json with a listed reason code other than INTERNAL_ERROR and a sentence; no temp files.
The quick profile runs in CI; ``pytest -m fuzz tests/test_fuzz.py`` runs the long one (see docs/bad_input.md).
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from corpus import assert_no_temp_files, assert_one_complete_record
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline import phantom
from pipeline.batch.run import run_batch
from pipeline.config import Config
from pipeline.errors import REASON_CODES

QUICK = settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")
OTHER_TAGS = ("RescaleSlope", "RescaleIntercept", "EchoTime", "RepetitionTime", "InversionTime", "SeriesDescription",
              "InstanceNumber", "ImageType", "ScanningSequence", "BodyPartExamined", "SeriesNumber", "PatientName")

# A header value: removed, text, a number (also non-finite or huge), or a list of the wrong length.
values = st.one_of(
    st.none(),
    st.text(max_size=80),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-(2**40), 2**40).map(str),
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=0, max_size=7).map(lambda v: [f"{x:.4g}" for x in v]),
)
header_mutation = st.tuples(st.sampled_from(GEOMETRY_TAGS + OTHER_TAGS), values,
                            st.sampled_from(["T1", "T2"]), st.one_of(st.none(), st.integers(0, 11)))
pixel_mutation = st.tuples(
    st.sampled_from(["scale", "constant", "zero_slice", "spikes", "saturate", "noise"]),
    st.floats(0.0, 50.0, allow_nan=False), st.sampled_from(["T1", "T2"]), st.integers(0, 11),
)


@pytest.fixture(scope="module")
def base_study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzzbase")
    phantom.make_study(root, 42, matrix=96, n_slices=12, series=("T1", "T2"), study_name="study",
                       shuffle_instances=False)
    shutil.rmtree(root / "study" / "truth")
    return root / "study"


def _series(study: Path, role: str) -> list[Path]:
    """Files of a series in file order (phantom writes one series per SE folder, T1 first)."""
    folders = sorted((study / "DICOM").iterdir())
    return sorted(folders[0 if role == "T1" else 1].glob("*.dcm"))


def _mutate_header(ds: pydicom.Dataset, keyword: str, value) -> None:
    if value is None:
        if keyword in ds:
            delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)


def _mutate_pixels(ds: pydicom.Dataset, kind: str, amount: float, rng: np.random.Generator) -> None:
    arr = ds.pixel_array.astype(np.float64)
    if kind == "scale":
        arr = arr * amount
    elif kind == "constant":
        arr[:] = amount
    elif kind == "zero_slice":
        arr[:] = 0
    elif kind == "spikes":
        idx = rng.integers(0, arr.size, size=max(1, int(amount)))
        arr.flat[idx] = 65535
    elif kind == "saturate":
        arr[:] = 65535
    elif kind == "noise":
        arr = arr + rng.normal(0.0, amount * 100.0, arr.shape)
    ds.PixelData = np.clip(arr, 0, 65535).astype(np.uint16).tobytes()
    ds.PixelRepresentation = 0


def _check_contract(inp: Path, out: Path) -> dict:
    result = run_batch(inp, out, Config(), jobs=1, progress=False)
    batch = json.loads(result.batch_json.read_text())
    assert result.exit_code in (0, 3), batch
    assert len(batch["studies"]) == 1, batch["studies"]
    (s,) = batch["studies"]
    assert s["code"] != "INTERNAL_ERROR", s
    if s["status"] != "analysed":
        assert s["code"] in REASON_CODES and len(s["message"]) > 20, s
    assert_one_complete_record(out, s)
    assert_no_temp_files(out)
    return s


def _run_example(base: Path, tmp_root: Path, headers, pixels) -> dict:
    work = tmp_root / uuid.uuid4().hex[:10]
    study = work / "in" / "study"
    shutil.copytree(base, study)
    rng = np.random.default_rng(len(headers) + 7 * len(pixels))
    edits: dict[Path, list] = {}
    for keyword, value, role, index in headers:
        files = _series(study, role)
        for p in files if index is None else [files[index]]:
            edits.setdefault(p, []).append(("h", keyword, value))
    for kind, amount, role, index in pixels:
        edits.setdefault(_series(study, role)[index], []).append(("p", kind, amount))
    for p, todo in edits.items():
        ds = pydicom.dcmread(p)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for op in todo:
                    if op[0] == "h":
                        _mutate_header(ds, op[1], op[2])
                    else:
                        _mutate_pixels(ds, op[1], op[2], rng)
                ds.save_as(p)
        except Exception:  # noqa: BLE001 - pydicom refused to write this value: not a file a scanner can produce
            shutil.rmtree(work)
            assume(False)
    try:
        return _check_contract(work / "in", work / "out")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@QUICK
@given(headers=st.lists(header_mutation, min_size=1, max_size=3), pixels=st.lists(pixel_mutation, max_size=2))
def test_fuzz_quick(base_study, tmp_path_factory, headers, pixels):
    _run_example(base_study, tmp_path_factory.getbasetemp(), headers, pixels)


@pytest.mark.fuzz
@LONG
@given(headers=st.lists(header_mutation, max_size=4), pixels=st.lists(pixel_mutation, max_size=3))
def test_fuzz_long(base_study, tmp_path_factory, headers, pixels):
    _run_example(base_study, tmp_path_factory.getbasetemp(), headers, pixels)

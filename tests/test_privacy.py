"""No direct identifiers in any output by default; keyed pseudonyms are stable; inputs are never modified."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import phantom
from pipeline.cli import main

PHI = {"PatientName": "Müller^Zoë Ångström", "PatientID": "PID-77889911", "PatientBirthDate": "19580317",
       "AccessionNumber": "ACC-55443322", "InstitutionName": "St. Elsewhere Spine Clinic",
       "ReferringPhysicianName": "Dr^Referrer^Quincy"}


@pytest.fixture(scope="module")
def phi_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    phantom.make_study(root, 21, matrix=128, n_slices=12, study_name="study", patient_name=PHI["PatientName"],
                       patient_id=PHI["PatientID"], extra_tags={k: v for k, v in PHI.items()
                                                                if k not in ("PatientName", "PatientID")})
    return root / "study" / "DICOM"


def _all_bytes(out: Path) -> list[tuple[Path, bytes]]:
    files = []
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".gz"):
                data = gzip.decompress(data)
            files.append((p, data))
    return files


def _tree_hash(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _needles():
    out = []
    for v in PHI.values():
        out += [v.encode("utf-8"), v.encode("latin-1", "ignore")]
        out += [part.encode("utf-8") for part in v.split("^") if len(part) > 4]
    return out


def test_default_outputs_carry_no_direct_identifiers_and_inputs_are_untouched(phi_study, tmp_path):
    before = _tree_hash(phi_study)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(phi_study), "-o", str(out), "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    files = _all_bytes(out)
    assert any(p.name == "report.json" for p, _ in files) and any(p.name == "batch.log" for p, _ in files)
    for p, data in files:
        for needle in _needles():
            assert needle not in data, f"{needle!r} found in {p}"
    assert _tree_hash(phi_study) == before


def test_pseudonyms_are_keyed_and_stable_and_originals_only_on_request(phi_study, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"p{i}"
        res = CliRunner().invoke(main, ["run", str(phi_study), "-o", str(out), "--no-progress", "--pseudonymise", "k1"])
        assert res.exit_code == 0
        (rep,) = [json.loads(p.read_text()) for p in out.glob("*/report.json")]
        runs.append(rep)
        for p, data in _all_bytes(out):
            for needle in _needles() + [b"k1\""]:
                assert needle not in data, f"{needle!r} found in {p}"
    assert runs[0]["study"]["patient_id"] == runs[1]["study"]["patient_id"] is not None
    assert runs[0]["study"]["key"] == runs[1]["study"]["key"]
    assert runs[0]["study"]["identifiers"] == "pseudonymised"
    other = tmp_path / "p_other"
    CliRunner().invoke(main, ["run", str(phi_study), "-o", str(other), "--no-progress", "--pseudonymise", "k2"])
    (rep2,) = [json.loads(p.read_text()) for p in other.glob("*/report.json")]
    assert rep2["study"]["patient_id"] != runs[0]["study"]["patient_id"]
    kept = tmp_path / "kept"
    CliRunner().invoke(main, ["run", str(phi_study), "-o", str(kept), "--no-progress", "--keep-identifiers"])
    (rep3,) = [json.loads(p.read_text()) for p in kept.glob("*/report.json")]
    assert rep3["study"]["patient_id"] == PHI["PatientID"] and rep3["study"]["identifiers"] == "original"
    res = CliRunner().invoke(main, ["run", str(phi_study), "-o", str(tmp_path / "x"), "--pseudonymise", "k",
                                    "--keep-identifiers"])
    assert res.exit_code == 2

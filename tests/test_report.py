"""Report pieces: schema validity, atomic writes, identifiers, summary text."""

from __future__ import annotations

import json

import pytest

from pipeline.io.atomic import write_json_atomic
from pipeline.report.identity import Identity, keyed_hash, study_key
from pipeline.report.schema import load_schema, schema_errors
from pipeline.types import StudyFiles


def test_schemas_are_valid_draft_2020_12():
    import jsonschema

    for name in ("report.schema.json", "error.schema.json"):
        schema = load_schema(name)
        assert schema["$schema"].endswith("2020-12/schema")
        jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_rejects_missing_disclaimer_and_bad_modic_type():
    errs = schema_errors({"report_type": "modicscan.study_report"})
    assert any("disclaimer" in e for e in errs)
    from pipeline.report.schema import load_schema as ls

    endplate_enum = ls("report.schema.json")["$defs"]["endplate"]["properties"]["modic_type"]["enum"]
    assert set(endplate_enum) == {"0", "I", "II", "III", "I/II", "II/III"}


def test_atomic_write_leaves_no_temp_and_rejects_nan(tmp_path):
    p = tmp_path / "sub" / "r.json"
    write_json_atomic(p, {"a": 1.5, "b": float("nan"), "c": [float("inf")]})
    data = json.loads(p.read_text())
    assert data == {"a": 1.5, "b": None, "c": [None]}
    assert [q.name for q in p.parent.iterdir()] == ["r.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "r.json"
    write_json_atomic(p, {"v": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(p, {"v": Unserialisable()})
    assert json.loads(p.read_text()) == {"v": 1}
    assert sorted(q.name for q in tmp_path.iterdir()) == ["r.json"]


def test_study_key_is_hashed_and_stable():
    k1, k2 = study_key("1.2.3"), study_key("1.2.3")
    assert k1 == k2 and len(k1) == 16 and "1.2.3" not in k1
    assert study_key("1.2.3", "secret") != k1
    assert study_key("1.2.3", "secret") == study_key("1.2.3", "secret")
    assert study_key("1.2.3", "secret") != study_key("1.2.3", "other")


def test_identity_modes():
    st = StudyFiles(study_uid="1.2.840.1", series={}, patient_id="PID123", patient_name="Doe^Jane",
                    patient_birth_date="19600101", study_date="20200202")
    removed = Identity().study_block(st, "h", 3, "folder")
    assert removed["patient_id"] is None and removed["patient_name"] is None and removed["source_folder"] is None
    assert removed["study_uid"] == "1.2.840.1" and removed["identifiers"] == "removed"
    pseudo = Identity("k").study_block(st, "h", 3, "folder")
    assert pseudo["patient_id"] == keyed_hash("patient:PID123", "k")
    assert "PID123" not in json.dumps(pseudo) and "1.2.840.1" not in json.dumps(pseudo)
    assert pseudo["study_uid"].startswith("2.25.")
    kept = Identity(keep_identifiers=True).study_block(st, "h", 3, "folder")
    assert kept["patient_id"] == "PID123" and kept["patient_name"] == "Doe^Jane"
    with pytest.raises(ValueError):
        Identity("k", keep_identifiers=True)


def test_keyed_hash_is_hmac_sha256():
    import hashlib
    import hmac

    assert keyed_hash("x", "k", 64) == hmac.new(b"k", b"x", hashlib.sha256).hexdigest()
    assert len(keyed_hash("x", "k")) == 16


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    import os

    from pipeline.io.atomic import remove_stale_temp_files

    dead = tmp_path / ".report.json.999999.x1y2.tmp"  # pid 999999: almost surely not a running process
    dead_nii = tmp_path / ".vertebrae.nii.gz.999998.tmp.nii.gz"
    alive = tmp_path / f".report.json.{os.getpid()}.x1y2.tmp"
    keep = tmp_path / "report.json"
    for p in (dead, dead_nii, alive, keep):
        p.write_text("x")
    assert remove_stale_temp_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, keep.name])

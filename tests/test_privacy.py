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


# ---------------------------------------------------------------------------------------------- issue 30
FREE_TEXT_MARK = "DESCMARK42"  # a description word that identifies nothing, to see where descriptions go
FILE_MARK = "secret7731"  # in a file name: no error message may repeat it
WARD = "ward7b"  # an input folder name: only pseudonymisation hides it


@pytest.fixture(scope="module")
def leaky_input(tmp_path_factory):
    """One good study whose series descriptions and folder carry the patient's name, ID and birth date, and one
    whose T2 has a file with broken pixel data named with FILE_MARK (its error message names a file)."""
    import pydicom

    root = tmp_path_factory.mktemp("leaky")
    who = dict(patient_name=PHI["PatientName"], patient_id=PHI["PatientID"],
               extra_tags={"PatientBirthDate": PHI["PatientBirthDate"]})
    folder = f"{WARD}/Müller_{PHI['PatientID']}"
    phantom.make_study(root / WARD, 22, matrix=96, n_slices=12, study_name=folder.split("/")[1], **who)
    phantom.make_study(root / WARD, 23, matrix=96, n_slices=12, study_name="broken", series=("T1", "T2"), **who)
    for f in sorted((root / folder / "DICOM").rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = f"{ds.SeriesDescription} {FREE_TEXT_MARK} Müller^Zoë {PHI['PatientID']} 17.03.1958"
        ds.save_as(f)
    t2 = sorted((root / WARD / "broken" / "DICOM" / "SE003").glob("*.dcm"))
    ds = pydicom.dcmread(t2[3])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(t2[3].with_name(f"IM_{FILE_MARK}.dcm"))
    t2[3].unlink()
    return root


def _run_leaky(inp: Path, out: Path, *extra: str) -> dict[str, bytes]:
    res = CliRunner().invoke(main, ["run", str(inp), "-o", str(out), "--no-progress", *extra])
    assert res.exit_code == 3, res.output  # one study analysed, one failed
    assert {json.loads(p.read_text())["error"]["code"] for p in out.glob("*/error.json")} == {"PIXEL_DATA_UNREADABLE"}
    assert len(list(out.glob("*/report.json"))) == 1
    return {str(p.relative_to(out)): data for p, data in _all_bytes(out)}


def test_default_mode_strips_the_patient_from_free_text_and_file_names_from_messages(leaky_input, tmp_path):
    files = _run_leaky(leaky_input, tmp_path / "out")
    for name, data in files.items():
        for needle in _needles() + [b"17.03.1958"]:
            assert needle not in data, f"{needle!r} found in {name}"
    messages = {n: d for n, d in files.items() if n.endswith(("error.json", "batch.json", "batch.log"))}
    for name, data in messages.items():
        assert FILE_MARK.encode() not in data, f"a file name in {name}"
    (report,) = [json.loads(d) for n, d in files.items() if n.endswith("report.json")]
    # the description stays, without the patient: the README says default mode writes it
    assert FREE_TEXT_MARK in report["series"]["T2"]["series_description"]
    assert "[patient name]" in report["series"]["T2"]["series_description"]


def test_pseudonymised_outputs_hold_nothing_from_input_paths_or_free_text(leaky_input, tmp_path):
    files = _run_leaky(leaky_input, tmp_path / "out", "--pseudonymise", "k1")
    for name, data in files.items():
        for needle in _needles() + [FREE_TEXT_MARK.encode(), FILE_MARK.encode(), WARD.encode(), b"broken"]:
            assert needle not in data, f"{needle!r} found in {name}"


# ---------------------------------------------------------------------------------------------- review of issue 30
LATIN1_PATIENT = "Müller^Zoë"
UID_DESC_GONE = "nodesc"


@pytest.fixture(scope="module")
def latin1_input(tmp_path_factory):
    """An INPUT folder whose own name is the patient's name in Latin-1 bytes (not UTF-8); in it the patient's study
    in a folder named after her (Latin-1) whose T2 has a broken file with a Latin-1 name, and a study whose series
    have no SeriesDescription and no T1 (its error message names the series by UID)."""
    import os

    import pydicom

    base = tmp_path_factory.mktemp("latin1")
    root = Path(os.fsdecode(os.fsencode(base) + b"/M\xfcller"))
    who = dict(patient_name=LATIN1_PATIENT, patient_id=PHI["PatientID"],
               extra_tags={"PatientBirthDate": PHI["PatientBirthDate"]})
    name = os.fsdecode(b"M\xfcller_Zo\xeb")
    phantom.make_study(root, 24, matrix=96, n_slices=12, study_name=name, series=("T1", "T2"), **who)
    t2 = sorted((root / name / "DICOM" / "SE003").glob("*.dcm"))
    ds = pydicom.dcmread(t2[3])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(t2[3].with_name(os.fsdecode(b"IM_\xe9" + FILE_MARK.encode() + b".dcm")))
    t2[3].unlink()
    phantom.make_study(root, 25, matrix=96, n_slices=12, study_name=UID_DESC_GONE, series=("T1", "T2"))
    uids = set()
    for f in sorted((root / UID_DESC_GONE / "DICOM").rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        if ds.SeriesDescription.upper().startswith("T1") or "T1" in ds.SeriesDescription.split()[:2]:
            f.unlink()
            continue
        uids.add(str(ds.SeriesInstanceUID))
        del ds.SeriesDescription
        ds.save_as(f)
    for folder in (name, UID_DESC_GONE):
        shutil_rmtree(root / folder / "truth")
    return root, uids


def shutil_rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _run_latin1(root: Path, out: Path, *extra: str) -> tuple[dict, dict[str, bytes]]:
    res = CliRunner().invoke(main, ["run", str(root), "-o", str(out), "--no-progress", "--overlays", "none", *extra])
    # was: exit 1 and no batch.json (the INPUT folder's own Latin-1 name could not be written or hashed)
    assert res.exit_code == 3, res.output
    batch = json.loads((out / "batch.json").read_text(encoding="utf-8"))
    assert sorted(s["code"] for s in batch["studies"]) == ["NO_SAGITTAL_T1", "PIXEL_DATA_UNREADABLE"]
    return batch, {str(p.relative_to(out)): data for p, data in _all_bytes(out)}


def test_latin1_input_folder_file_and_patient_names_never_kill_the_batch_nor_leak(latin1_input, tmp_path):
    """Review of issue 30: the two halves met in Latin-1 names. The INPUT folder's own non-UTF-8 name killed the run
    (exit 1, no batch.json); a Latin-1 file name in an error message was shown with escapes (``IM_\\xe9...``) while
    the redactor looked for the raw name, so it stayed; a patient's name in a Latin-1 folder name (``M\\xfcller``)
    stayed in batch.json and batch.log in default mode."""
    root, _ = latin1_input
    batch, files = _run_latin1(root, tmp_path / "out")
    assert batch["input"].endswith("/[patient name]")
    for name, data in files.items():
        for needle in (FILE_MARK.encode(), b"M\\\\xfcller", b"M\\xfcller", b"Zo\\\\xeb", b"Zo\\xeb", b"\\udc"):
            assert needle not in data, f"{needle!r} found in {name}"
    assert "[file #" in next(s["message"] for s in batch["studies"] if s["code"] == "PIXEL_DATA_UNREADABLE")


def test_pseudonymised_messages_hold_no_series_uid_and_no_latin1_names(latin1_input, tmp_path):
    """Review of issue 30: a series without a description is named by its SeriesInstanceUID in the roles error
    ("sagittal series seen: '1.2.826...': T2"); with --pseudonymise the raw UID reached error.json, batch.json and
    batch.log although the README promises keyed hashes for series UIDs."""
    root, uids = latin1_input
    batch, files = _run_latin1(root, tmp_path / "out", "--pseudonymise", "k1")
    assert uids
    for name, data in files.items():
        for needle in [u.encode() for u in uids] + [FILE_MARK.encode(), b"xfc", b"xeb", b"\\udc", b"nodesc"]:
            assert needle not in data, f"{needle!r} found in {name}"
    assert "'[series " in next(s["message"] for s in batch["studies"] if s["code"] == "NO_SAGITTAL_T1")


def test_pseudonymised_failed_folder_key_is_keyed(tmp_path):
    """Review of issue 30: a top-level folder without a usable study is a failed entry keyed ``folder-`` + a plain
    SHA-256 of its name; with --pseudonymise that let anyone confirm a guessed folder name (a patient's) by hashing
    it. Its key is now a keyed hash in that mode (stable with the same key)."""
    import hashlib

    from pipeline.batch.run import run_batch
    from pipeline.config import config_from_dict

    inp = tmp_path / "in" / "Mueller_Hans"
    inp.mkdir(parents=True)
    (inp / "IM_0001.dcm").write_bytes(b"")  # looked like DICOM: a failed folder, not a skipped one
    plain = "folder-" + hashlib.sha256(b"Mueller_Hans").hexdigest()[:10]
    keys = []
    for i, key in enumerate(("k1", "k1", "k2")):
        cfg = config_from_dict({"report": {"pseudonymise_key": key}})
        result = run_batch(tmp_path / "in", tmp_path / f"out{i}", cfg, progress=False)
        batch = json.loads(result.batch_json.read_text(encoding="utf-8"))
        (entry,) = batch["studies"]
        assert entry["code"] == "NO_DICOM_FILES" and result.exit_code == 3
        keys.append(entry["key"])
    assert keys[0] == keys[1] != keys[2] and plain not in keys and all(k.startswith("folder-") for k in keys)
    default = run_batch(tmp_path / "in", tmp_path / "out_default", config_from_dict({}), progress=False)
    assert [o.key for o in default.outcomes] == [plain]


def test_no_studies_message_names_no_folder_when_pseudonymising(tmp_path):
    """Issue 30 leftover: "no DICOM studies found under INPUT" printed INPUT (e.g. /data/Mueller_Hans) also with
    --pseudonymise; the message now says "the input folder" then, and still names it in default mode."""
    empty = tmp_path / "Mueller_Hans"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    res = CliRunner().invoke(main, ["run", str(empty), "-o", str(tmp_path / "out"), "--no-progress",
                                    "--pseudonymise", "k3y"], catch_exceptions=False)
    assert res.exit_code == 4 and "no DICOM studies found under the input folder" in res.output
    assert "Mueller" not in res.output
    plain = CliRunner().invoke(main, ["run", str(empty), "-o", str(tmp_path / "out2"), "--no-progress"],
                               catch_exceptions=False)
    assert plain.exit_code == 4 and "Mueller_Hans" in plain.output

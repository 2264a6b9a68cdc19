"""Issue 30, input side: hostile names, folder layouts and headers found by a new user and a broken-study corpus.

Every input is generated here (small phantom studies, pydicom edits, links, sparse files); each test reproduces
one case that killed the batch, merged patients, lost a study silently or analysed a non-geometry, and checks
the documented outcome (docs/bad_input.md).
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pydicom.encaps
import pytest
from corpus import strict_json
from hostile import (
    MATRIX,
    N_SLICES,
    REPO,
    edit_files,
    make_study,
    only_study,
    run_batch_json,
    run_memory_limited,
    series_files,
)

from pipeline.batch.study import input_hash
from pipeline.config import LoadingConfig
from pipeline.errors import REASON_CODES, StudyError
from pipeline.io import walk
from pipeline.io.discovery import discover, is_image_sop_class
from pipeline.io.volumes import check_pixel_budget, load_series, series_pixels
from pipeline.roles import assign_roles
from pipeline.segmentation.grid import WORK_MM


# ---------------------------------------------------------------------------------------------- 1: names
def test_latin1_folder_and_file_names_do_not_kill_the_batch(tmp_path):
    """Item 1: `M\\xfcller/` and `\\xe9t\\xe9.dcm` (Latin-1 bytes, not UTF-8) used to raise UnicodeEncodeError in
    input_hash: exit 1, no batch.json. Now the study is processed and its folder shown with escapes."""
    inp = tmp_path / "in"
    s = make_study(inp, "tmp", 11, series=("T2",))  # fails fast (NO_SAGITTAL_T1): the run still writes every record
    latin = os.fsdecode(os.fsencode(inp) + b"/M\xfcller")
    os.rename(s, latin)
    first = sorted(Path(latin).rglob("*.dcm"))[0]
    os.rename(first, first.with_name(os.fsdecode(b"\xe9t\xe9.dcm")))
    (Path(latin) / os.fsdecode(b"notiz\xe9.txt")).write_text("not an image")
    code, batch = run_batch_json(inp, tmp_path / "out")
    assert batch["finished"] is True and code == 3
    (study,) = batch["studies"]
    assert study["code"] == "NO_SAGITTAL_T1" and study["source_folder"] == "M\\xfcller/DICOM"
    assert {"path": "M\\xfcller/notiz\\xe9.txt", "reason": "NOT_DICOM"} in batch["skipped_files"]
    st, _ = only_study(inp)
    assert len(input_hash(st)) == 16 and sum(len(s.files) for s in st.series.values()) == N_SLICES


def test_input_folder_itself_named_in_latin1_and_after_the_patient(tmp_path):
    """Review of issue 30, item 1 again: when INPUT itself (not a folder below it) has a name that is not UTF-8,
    batch.json could not be written (UnicodeEncodeError: exit 1, no batch.json) and with --pseudonymise the name
    could not even be hashed. Also, batch.log named INPUT before discovery knew the patient: a patient's own folder
    given as INPUT kept her name in the log."""
    from click.testing import CliRunner

    from pipeline.cli import main

    inp = Path(os.fsdecode(os.fsencode(tmp_path) + b"/Mueller_Hans_\xfc"))
    make_study(inp, "s", 60, series=("T2",), patient_name="Mueller^Hans", patient_id="PID-60")
    for extra, shown_input in (((), str(tmp_path) + "/[patient name]_[patient name]_\\xfc"),
                               (("--pseudonymise", "k1"), None)):
        out = tmp_path / f"out{len(extra)}"
        res = CliRunner().invoke(main, ["run", str(inp), "-o", str(out), "--no-progress", *extra])
        assert res.exit_code == 3, res.output  # the study has no T1
        batch = strict_json(out / "batch.json")
        assert batch["finished"] and [s["code"] for s in batch["studies"]] == ["NO_SAGITTAL_T1"]
        if shown_input:
            assert batch["input"] == shown_input
        else:
            assert batch["input"].startswith("path-")
        log_text = (out / "batch.log").read_text(encoding="utf-8")
        assert "Mueller" not in log_text and "Hans" not in log_text
        assert f"input {batch['input']}" in log_text


# ---------------------------------------------------------------------------------------------- 2: sizes
def _sparse_copy(src: Path, dst: Path, size: int) -> None:
    """``src`` with a private OB element of ``size`` bytes (a hole on disk: nothing is written)."""
    ds = pydicom.dcmread(src)
    ds.add_new(0x00290010, "LO", "HUGE PRIVATE")
    ds.add_new(0x00291010, "OB", b"\0\0\0\0")
    ds.save_as(dst)
    data = dst.read_bytes()
    small = struct.pack("<HH", 0x0029, 0x1010) + b"OB\0\0" + struct.pack("<I", 4) + b"\0\0\0\0"
    i = data.index(small)
    head = data[:i] + struct.pack("<HH", 0x0029, 0x1010) + b"OB\0\0" + struct.pack("<I", size)
    with open(dst, "wb") as fh:
        fh.write(head)
        fh.seek(len(head) + size)
        fh.write(data[i + len(small):])


def test_a_sparse_file_with_a_huge_private_element_is_read_without_its_element(tmp_path):
    """Item 2: a 3.9 GB (sparse) private element took 4.4 GB during discovery; under a 1.5 GB address-space limit
    the file was lost as UNREADABLE. Now discovery and loading never read the element."""
    s = make_study(tmp_path, "s", 12, series=("T2",))
    files = sorted(s.rglob("*.dcm"))
    huge = files[0]
    _sparse_copy(huge, huge, 3_900_000_000)
    assert huge.stat().st_size > 3_900_000_000
    out = run_memory_limited(f"""
        from pipeline.io.discovery import discover
        from pipeline.io.volumes import load_series
        d = discover({str(tmp_path)!r})
        (st,) = d.studies.values()
        (series,) = st.series.values()
        vol = load_series(series)
        print(json.dumps({{"files": len(series.files), "skipped": [s.reason for s in d.skipped],
                           "shape": list(vol.shape)}}))
    """, 1_500_000_000)
    assert out["files"] == N_SLICES and out["skipped"] == []
    assert sorted(out["shape"]) == sorted([MATRIX, MATRIX, N_SLICES])


def _declare_huge(ds, i):
    """A T2 slice that declares 65535 x 65535 pixels in a few kB of RLE (one fake segment)."""
    ds.Rows = ds.Columns = 65535
    ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    header = struct.pack("<16L", 1, 64, *([0] * 14))
    frame = header + bytes([0x81, 0]) * 64  # runs of zeros; far too short for the declared size
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    ds["PixelData"].VR = "OB"


def test_a_file_declaring_65535_squared_pixels_is_refused_before_decoding(tmp_path):
    """Item 2: decoding the file needed ~9 GB and killed the batch under a memory limit. Now the study fails with
    IMAGE_TOO_LARGE from the headers (the run stays far below a 2.5 GB address-space limit)."""
    inp = tmp_path / "in"
    s = make_study(inp, "s", 13)
    t2 = series_files(s, "t2")
    for p in t2[1:]:
        p.unlink()
    edit_files(t2[:1], _declare_huge)
    out = run_memory_limited(f"""
        from pipeline.batch.run import run_batch
        from pipeline.config import Config
        r = run_batch({str(inp)!r}, {str(tmp_path / 'out')!r}, Config(), jobs=1, progress=False)
        b = json.load(open(r.batch_json))
        print(json.dumps({{"exit": r.exit_code, "codes": [s["code"] for s in b["studies"]],
                           "finished": b["finished"]}}))
    """, 2_500_000_000)
    assert out == {"exit": 3, "codes": ["IMAGE_TOO_LARGE"], "finished": True}


def test_pixel_budget_counts_the_working_grid_of_a_coarse_pixel_spacing(tmp_path):
    """Item 2: PixelSpacing 100 mm made the 1.5 mm working grid of a 96-pixel image 6400 x 6400 per slice."""
    s = make_study(tmp_path, "s", 14, series=("T2",))
    edit_files(sorted(s.rglob("*.dcm")), lambda ds, i: setattr(ds, "PixelSpacing", [100, 100]))
    st, _ = only_study(tmp_path)
    (summary,) = st.series.values()
    assert series_pixels(summary) == MATRIX * MATRIX * N_SLICES
    assert series_pixels(summary, WORK_MM) == int(np.ceil(MATRIX * 100 / WORK_MM)) ** 2 * N_SLICES
    with pytest.raises(StudyError) as exc:
        check_pixel_budget([summary], LoadingConfig().max_pixels_per_study, WORK_MM)
    assert exc.value.code == "IMAGE_TOO_LARGE"
    with pytest.raises(StudyError) as exc:  # with the default plausible-spacing range it is no geometry at all
        load_series(summary)
    assert exc.value.code == "GEOMETRY_INVALID"


# ---------------------------------------------------------------------------------------------- 3: patients
def _shared_uid_studies(root: Path, same_patient: bool) -> None:
    """Patient A (T1 + T2) and patient B (STIR, another folder) under A's StudyInstanceUID."""
    a = make_study(root, "patA", 31)
    b = make_study(root, "patB", 32, series=("STIR",))
    head = pydicom.dcmread(next(a.rglob("*.dcm")), stop_before_pixels=True)

    def same_study(ds, i):
        ds.StudyInstanceUID = head.StudyInstanceUID
        if same_patient:  # anonymised alike: only the frame of reference tells them apart
            ds.PatientID = head.PatientID
    edit_files(sorted(b.rglob("*.dcm")), same_study)


def test_two_patients_under_one_study_uid_are_not_merged(tmp_path):
    """Item 3: B's STIR showed up in A's report. Now the study is refused with PATIENT_CONFLICT."""
    _shared_uid_studies(tmp_path, same_patient=False)
    st, _ = only_study(tmp_path)
    assert len(st.series) == 3
    with pytest.raises(StudyError) as exc:
        assign_roles(st)
    assert exc.value.code == "PATIENT_CONFLICT"


def test_both_patients_identifiers_are_stripped_when_two_share_a_study_uid(tmp_path):
    """Item 4 x item 3: the PATIENT_CONFLICT study names files of both patients; default mode strips both patients'
    name, ID and birth date from its free text, not only the first patient's."""
    from pipeline.report.identity import Identity

    _shared_uid_studies(tmp_path, same_patient=False)
    st, _ = only_study(tmp_path)
    heads = {}
    for folder in ("patA", "patB"):
        ds = pydicom.dcmread(next((tmp_path / folder).rglob("*.dcm")), stop_before_pixels=True)
        heads[folder] = (str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate))
    assert heads["patA"][:2] != heads["patB"][:2]
    message = " / ".join(" ".join(h) for h in heads.values())
    red = Identity().redactor(st).text(message)
    for name, pid, birth in heads.values():
        assert pid not in red and birth not in red, red
        assert not any(part in red for part in name.split("^") if len(part) >= 3), red
    assert red.count("[patient id]") == 2


def test_one_patient_id_but_two_frames_of_reference_are_not_aligned(tmp_path):
    """Item 3: same PatientID (e.g. anonymised), different FrameOfReferenceUID: FRAME_OF_REFERENCE_CONFLICT."""
    _shared_uid_studies(tmp_path, same_patient=True)
    st, _ = only_study(tmp_path)
    with pytest.raises(StudyError) as exc:
        assign_roles(st)
    assert exc.value.code == "FRAME_OF_REFERENCE_CONFLICT" and "STIR" in exc.value.message


def test_one_series_uid_shared_by_two_patients_is_split(tmp_path):
    a = make_study(tmp_path, "patA", 33, series=("T2",))
    b = make_study(tmp_path, "patB", 34, series=("T2",))
    head = pydicom.dcmread(next(a.rglob("*.dcm")), stop_before_pixels=True)

    def same_uids(ds, i):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = head.StudyInstanceUID, head.SeriesInstanceUID
    edit_files(sorted(b.rglob("*.dcm")), same_uids)
    st, _ = only_study(tmp_path)
    assert sorted(len(s.files) for s in st.series.values()) == [N_SLICES, N_SLICES]


# ---------------------------------------------------------------------------------------------- 5: lost studies
def test_linked_study_is_found_and_a_link_loop_ends(tmp_path):
    """Item 5: a study reached through a directory symlink was neither analysed nor listed."""
    elsewhere = make_study(tmp_path / "elsewhere", "linked", 51, series=("T2",))
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(elsewhere, inp / "linked")
    os.symlink(inp, elsewhere / "loop")  # back up to the input root: a cycle
    os.symlink(tmp_path / "nowhere", inp / "dangling")
    st, d = only_study(inp)
    assert sum(len(s.files) for s in st.series.values()) == N_SLICES
    reasons = {os.path.relpath(s.path, inp): s.reason for s in d.skipped}
    assert reasons == {"linked/loop": walk.FOLDER_SEEN_BEFORE, "dangling": walk.BROKEN_LINK}


def test_unreadable_folder_is_a_failed_record_not_silence(tmp_path, monkeypatch):
    """Item 5: an unreadable folder vanished (exit 0). It is now listed and recorded as FOLDER_UNREADABLE.
    (The OS refusal is simulated: the tests may run as root, who can read any folder.)"""
    inp = tmp_path / "in"
    make_study(inp, "readable", 52, series=("T2",))
    locked = make_study(inp, "locked", 53, series=("T2",))
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    code, batch = run_batch_json(inp, tmp_path / "out")
    assert {"path": "locked", "reason": walk.UNREADABLE_FOLDER} in batch["skipped_files"]
    by_folder = {s["source_folder"]: s["code"] for s in batch["studies"]}
    assert by_folder == {"readable/DICOM": "NO_SAGITTAL_T1", "locked": "FOLDER_UNREADABLE"}
    assert code == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its mode; the simulated case above covers it")
def test_folder_without_read_permission_is_listed(tmp_path):
    inp = tmp_path / "in"
    locked = make_study(inp, "locked", 54, series=("T2",))
    os.chmod(locked, 0)
    try:
        d = discover(inp)
    finally:
        os.chmod(locked, 0o755)
    assert [(os.path.relpath(s.path, inp), s.reason) for s in d.skipped] == [("locked", walk.UNREADABLE_FOLDER)]


def test_path_past_the_os_limit_is_listed(tmp_path):
    """Item 5: a folder deeper than PATH_MAX was skipped without a word."""
    inp = tmp_path / "in"
    inp.mkdir()
    fd = os.open(inp, os.O_DIRECTORY)
    depth = 0
    try:
        while len(str(inp)) + depth * 201 < 4200:  # nested through directory fds: no full path is ever needed
            name = f"{depth:02d}" + "x" * 198
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, depth = child, depth + 1
        with open(os.open("IM_0001.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(b"\0" * 256)
    finally:
        os.close(fd)
    d = discover(inp)
    assert [s.reason for s in d.skipped] == [walk.PATH_TOO_LONG]
    assert len(d.skipped[0].path) > os.pathconf("/", "PC_PATH_MAX") - 200


# ---------------------------------------------------------------------------------------------- 10 + 11: layouts
def test_out_is_the_input_folder_itself(tmp_path):
    """Review of issue 30, item 10: with `-o INPUT` (OUT is INPUT, not inside it) the second run listed our own lock,
    reserve, batch.json, batch.log and cohort tables as NOT_DICOM skipped files and a study's output folder as a
    `skipped_folders` entry ("no DICOM image here"). They are our outputs: listed as MODICSCAN_OUTPUT, never read,
    no skipped folder."""
    s = make_study(tmp_path, "study", 62, series=("T2",))
    for run in range(2):
        code, batch = run_batch_json(s, s)
        assert code == 3 and [(x["status"], x["code"]) for x in batch["studies"]] == [
            ("failed" if run == 0 else "skipped", "NO_SAGITTAL_T1")]
        assert batch["skipped_folders"] == []
        assert {x["reason"] for x in batch["skipped_files"]} == {walk.MODICSCAN_OUTPUT}
    listed = {x["path"] for x in batch["skipped_files"]}
    assert {".modicscan.lock", "batch.json", "cohort.csv", batch["studies"][0]["key"]} <= listed


def test_a_folder_a_run_wrote_into_as_its_own_input_is_still_input_to_a_run_over_its_parent(tmp_path):
    """Leftover of issue 30: after `modicscan run STUDY -o STUDY`, a run over STUDY's parent skipped STUDY whole as
    an earlier run's output folder (its batch.json), with the study's images in it. The record now says the run
    wrote into its input; a later walk enters the folder and leaves out only our own files and study folders."""
    s = make_study(tmp_path / "all", "study", 63, series=("T2",))
    code, first = run_batch_json(s, s)
    assert first["output_is_input"] is True and code == 3
    st, d = only_study(tmp_path / "all")
    assert st.series and all(x.modality == "MR" for x in st.series.values())
    ours = {os.path.relpath(x.path, s): x.reason for x in d.skipped if x.path.startswith(str(s))}
    assert ours["batch.json"] == ours[first["studies"][0]["key"]] == walk.MODICSCAN_OUTPUT
    # the same folder as the input root of a later run that writes elsewhere: our files there are ours, not input
    st, d = only_study(s)
    assert st.series
    ours = {os.path.relpath(x.path, s): x.reason for x in d.skipped}
    assert ours["batch.json"] == ours[first["studies"][0]["key"]] == walk.MODICSCAN_OUTPUT
    # an ordinary output folder (OUT beside the input) is still skipped whole
    code, other = run_batch_json(s, tmp_path / "all" / "results")
    assert other["output_is_input"] is False
    _, d = only_study(tmp_path / "all")
    assert {"results": walk.MODICSCAN_OUTPUT}.items() <= {os.path.relpath(x.path, tmp_path / "all"): x.reason
                                                         for x in d.skipped}.items()


def test_out_inside_the_study_folder_with_truth_and_notes(tmp_path):
    """Items 10 and 11 as a new user meets them: `modicscan run STUDY -o STUDY/out --dicom-out` on a phantom study
    (its truth/ folder kept) with a notes/ folder. Old: exit 3 with a failed `truth` folder, the second run read
    out/ (a fake NO_DICOM_FILES study) and seg.dcm (so the study's input changed and resume never happened)."""
    s = make_study(tmp_path, "study", 61, keep_truth=True)
    (s / "notes").mkdir()
    (s / "notes" / "referral.txt").write_text("referral letter\n")
    opts = {"dicom_out": True, "write_masks": True}
    code, first = run_batch_json(s, s / "out", options=opts)
    assert code == 0, first["studies"]
    assert [x["status"] for x in first["studies"]] == ["analysed"]
    assert sorted(f["path"] for f in first["skipped_folders"]) == ["notes", "truth"]
    assert {f["reason"] for f in first["skipped_folders"]} == {"NO_DICOM_IMAGES"}
    assert list(s.joinpath("out").rglob("seg.dcm"))
    code, second = run_batch_json(s, s / "out", options=opts)
    assert code == 0
    assert [(x["status"], x["message"]) for x in second["studies"]] == [("skipped", "analysed in an earlier run")]
    assert {"path": "out", "reason": walk.MODICSCAN_OUTPUT} in second["skipped_files"]
    # An earlier run's output folder elsewhere under the input is left out too, and so is a stray seg.dcm.
    shutil.copytree(s / "out", s / "old_results")
    stray = next((s / "out").rglob("seg.dcm"))
    shutil.copy(stray, s / "DICOM" / "seg_copy.dcm")
    st, d = only_study(s, exclude=[s / "out"])
    reasons = {os.path.relpath(x.path, s): x.reason for x in d.skipped}
    assert reasons["old_results"] == reasons["out"] == reasons["DICOM/seg_copy.dcm"] == walk.MODICSCAN_OUTPUT
    assert all(x.modality == "MR" for x in st.series.values())


def test_segmentation_storage_is_no_image_class():
    """The old prefix test let '...1.1.6' (ultrasound) admit '...1.1.66.4' (Segmentation Storage)."""
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.4") and is_image_sop_class("1.2.840.10008.5.1.4.1.1.4.1")
    assert not is_image_sop_class("1.2.840.10008.5.1.4.1.1.66.4")
    assert not is_image_sop_class("1.2.840.10008.5.1.4.1.1.88.34")


def test_junk_only_folder_is_still_a_failed_study(tmp_path):
    """Item 11 keeps the old contract where files looked like DICOM: an empty .dcm makes a failed folder."""
    inp = tmp_path / "in"
    (inp / "junk").mkdir(parents=True)
    (inp / "junk" / "empty.dcm").write_bytes(b"")
    (inp / "notes").mkdir()
    (inp / "notes" / "a.txt").write_text("text")
    code, batch = run_batch_json(inp, tmp_path / "out")
    assert [(x["source_folder"], x["code"]) for x in batch["studies"]] == [("junk", "NO_DICOM_FILES")]
    assert [f["path"] for f in batch["skipped_folders"]] == ["notes"]
    assert code == 3


# ---------------------------------------------------------------------------------------------- 15 + 16: roles
def test_a_ct_series_is_no_role_candidate(tmp_path):
    """Item 15: a CT series tagged like a sagittal T2 was analysed."""
    s = make_study(tmp_path, "s", 46)
    edit_files(series_files(s, "t2"), lambda ds, i: setattr(ds, "Modality", "CT"))
    st, _ = only_study(tmp_path)
    with pytest.raises(StudyError) as exc:
        assign_roles(st)
    assert exc.value.code == "NO_SAGITTAL_T2" and "Modality CT, not MR" in exc.value.message
    edit_files(sorted(s.rglob("*.dcm")), lambda ds, i: setattr(ds, "Modality", "CT"))
    st, _ = only_study(tmp_path)
    with pytest.raises(StudyError) as exc:
        assign_roles(st)
    assert exc.value.code == "NO_MR_SERIES"


def test_missing_sagittal_t1_message_lists_only_sagittal_series_as_sagittal(tmp_path):
    """Item 16: the message said 'sagittal series seen:' and listed the axial ones."""
    ax = make_study(tmp_path, "ax", 47, orientation="axial")
    sag = make_study(tmp_path, "sag", 48, series=("STIR",))
    head = pydicom.dcmread(next(ax.rglob("*.dcm")), stop_before_pixels=True)

    def join(ds, i):
        ds.StudyInstanceUID, ds.PatientID, ds.FrameOfReferenceUID = (head.StudyInstanceUID, head.PatientID,
                                                                     head.FrameOfReferenceUID)
    edit_files(sorted(sag.rglob("*.dcm")), join)
    st, _ = only_study(tmp_path)
    with pytest.raises(StudyError) as exc:
        assign_roles(st)
    assert exc.value.code == "NO_SAGITTAL_T1"
    sagittal_part, other_part = exc.value.message.split("sagittal series seen:")[1].split("other series:")
    assert "STIR" in sagittal_part and "axial" not in sagittal_part
    assert other_part.count("axial") == 2


def test_new_reason_codes_are_documented():
    doc = (REPO / "docs" / "bad_input.md").read_text(encoding="utf-8")
    for code in ("GEOMETRY_INVALID", "IMAGE_TOO_LARGE", "DUPLICATE_INSTANCE_CONFLICT", "PATIENT_CONFLICT",
                 "FRAME_OF_REFERENCE_CONFLICT", "NO_MR_SERIES", "FOLDER_UNREADABLE"):
        assert code in REASON_CODES and code in doc
    for reason in (walk.UNREADABLE_FOLDER, walk.PATH_TOO_LONG, walk.FOLDER_SEEN_BEFORE, walk.BROKEN_LINK,
                   walk.MODICSCAN_OUTPUT, "NO_DICOM_IMAGES", "DUPLICATE_INSTANCE_CONFLICT"):
        assert reason in doc

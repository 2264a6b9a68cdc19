"""The batch survives its own environment (issue 30): worker supervision at --jobs 1, a full disk, two runs on
one output folder, a read-only output folder, the umask. Every input is generated or copied here."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.batch.executors import get_executor
from pipeline.batch.out_dir import RESERVE_NAME, OutputFolder
from pipeline.batch.run import EXIT_DISK_FULL, EXIT_PARTIAL, EXIT_USAGE, run_batch
from pipeline.cli import main
from pipeline.config import Config

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


def _copy_studies(root: Path, names: dict[str, int]) -> Path:
    """Sample studies (by seed) copied under ``root/<name>/DICOM``: the run must never touch the committed ones."""
    for name, seed in names.items():
        shutil.copytree(SAMPLE / f"phantom_seed000{seed}" / "DICOM", root / name / "DICOM")
    return root


def _run_in_subprocess(script: str, timeout: float, **env) -> subprocess.CompletedProcess:
    """A batch in its own process: when a study kills the batch (the old --jobs 1), the test sees it, not pytest."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env})


def _folders_complete_or_absent(out: Path) -> None:
    for folder in (p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        records = [n for n in ("report.json", "error.json") if (folder / n).exists()]
        assert len(records) == 1, (folder.name, sorted(p.name for p in folder.iterdir()))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


# ---------------------------------------------------------------------------------------------- --jobs 1
RUN_WITH_HOOKS = """
    import json
    from pipeline.batch.run import run_batch
    from pipeline.config import config_from_dict
    cfg = config_from_dict({"batch": {"study_timeout_s": %s}})
    res = run_batch("%s", "%s", cfg, jobs=1, progress=False,
                    options={"_test_crash": {"b": "exit", "c": "sleep"}, "overlays": "none"})
    print(json.dumps({"exit": res.exit_code, "outcomes": {o.source_folder.split("/")[0]: [o.status, o.code]
                                                          for o in res.outcomes}}))
"""


def _run_hooked(inp: Path, out: Path, timeout_s: float) -> dict:
    res = _run_in_subprocess(RUN_WITH_HOOKS % (timeout_s, inp, out), timeout=300, MODICSCAN_TEST_HOOKS="1")
    assert res.returncode == 0, res.stderr[-3000:]  # the batch process survived
    result = json.loads(res.stdout.strip().splitlines()[-1])
    batch = json.loads((out / "batch.json").read_text())
    assert batch["finished"] is True and batch["exit_code"] == result["exit"] == EXIT_PARTIAL
    return result["outcomes"]


def test_jobs_1_supervises_its_worker_a_killed_study_costs_only_itself(tmp_path):
    """--jobs 1 used to run studies in the batch process: a study that took the process down (OOM kill, a decoder
    crash; here: the worker exits) killed the batch with batch.json unfinished, and every rerun died the same."""
    inp = _copy_studies(tmp_path / "in", {"a": 0, "b": 1})
    out = tmp_path / "out"
    assert _run_hooked(inp, out, 600) == {"a": ["analysed", None], "b": ["failed", "WORKER_CRASHED"]}
    # the rerun retries the crashed study (it may have been the machine) and goes past it again
    assert _run_hooked(inp, out, 600) == {"a": ["skipped", None], "b": ["failed", "WORKER_CRASHED"]}
    (err,) = [json.loads(p.read_text()) for p in out.glob("*/error.json")]
    assert err["error"]["code"] == "WORKER_CRASHED"
    _folders_complete_or_absent(out)


def test_jobs_1_honours_the_study_timeout(tmp_path):
    """batch.study_timeout_s was ignored at --jobs 1: a hanging study hung the batch."""
    inp = _copy_studies(tmp_path / "in", {"c": 3})
    out = tmp_path / "out"
    start = time.monotonic()
    assert _run_hooked(inp, out, 3) == {"c": ["failed", "TIMEOUT"]}
    assert time.monotonic() - start < 120
    (err,) = [json.loads(p.read_text()) for p in out.glob("*/error.json")]
    assert err["error"]["code"] == "TIMEOUT" and "batch.study_timeout_s" in err["error"]["message"]
    _folders_complete_or_absent(out)  # the staging folder of the stopped worker is gone too


def test_a_worker_memory_limit_fails_the_greedy_study_alone(tmp_path):
    """batch.worker_memory_mb caps each worker: a study that asks for more (here 8 GiB) fails OUT_OF_MEMORY
    instead of pulling down a SLURM job or container with its memory limit."""
    inp = _copy_studies(tmp_path / "in", {"m": 0})
    out = tmp_path / "out"
    script = f"""
        import json
        from pipeline.batch.run import run_batch
        from pipeline.config import config_from_dict
        cfg = config_from_dict({{"batch": {{"worker_memory_mb": 3000}}}})
        res = run_batch("{inp}", "{out}", cfg, progress=False, options={{"_test_crash": {{"m": "allocate"}}}})
        print(json.dumps([[o.status, o.code] for o in res.outcomes]))
    """
    res = _run_in_subprocess(script, timeout=240, MODICSCAN_TEST_HOOKS="1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [["failed", "OUT_OF_MEMORY"]]
    (err,) = [json.loads(p.read_text()) for p in out.glob("*/error.json")]
    assert "batch.worker_memory_mb = 3000 MiB" in err["error"]["message"]


# ---------------------------------------------------------------------------------------------- disk full
def _fill_disk_after_first_study(monkeypatch, out: Path) -> None:
    """Model a disk with room for one study: once a report is in place, every rename into OUT fails with
    ENOSPC until the run's reserve file is deleted (then there is room for batch.json)."""
    out = out.resolve()
    real_replace, real_rename = os.replace, os.rename

    def full(dst) -> bool:
        dst = Path(dst).resolve()
        published = [p for p in out.glob("*/report.json") if not p.parent.name.startswith(".")]
        return out in dst.parents and (out / RESERVE_NAME).exists() and bool(published)

    def replace(src, dst, *a, **kw):
        if full(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **kw)

    def rename(src, dst, *a, **kw):
        if full(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)


def test_a_full_disk_stops_the_run_cleanly_and_a_rerun_resumes(tmp_path, monkeypatch):
    inp = _copy_studies(tmp_path / "in", {"a": 0, "b": 1, "c": 3})
    out = tmp_path / "out"
    _fill_disk_after_first_study(monkeypatch, out)
    inline = get_executor("inline")  # the patched os functions hold in this process only
    res = run_batch(inp, out, Config(), progress=False, options={"overlays": "none"}, executor=inline)
    assert res.exit_code == EXIT_DISK_FULL and res.disk_full
    batch = json.loads((out / "batch.json").read_text())
    assert batch["finished"] is True and batch["disk_full"] is True and batch["exit_code"] == EXIT_DISK_FULL
    assert [s["status"] for s in batch["studies"]].count("analysed") == 1
    # the next write fails: batch.json (the run stops at once) or the next study (DISK_FULL, nothing kept)
    assert {s["code"] for s in batch["studies"] if s["status"] == "failed"} <= {"DISK_FULL"}
    _folders_complete_or_absent(out)
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1  # the study that did not fit left nothing
    assert not (out / RESERVE_NAME).exists()

    monkeypatch.undo()  # space freed: the same command resumes
    res = run_batch(inp, out, Config(), progress=False, options={"overlays": "none"}, executor=inline)
    assert res.exit_code == 0
    assert sorted(o.status for o in res.outcomes) == ["analysed", "analysed", "skipped"]
    _folders_complete_or_absent(out)


def test_a_full_disk_in_the_worker_stops_the_run_with_exit_5(tmp_path):
    """The same through the supervised worker (the test hook fills the disk inside the worker process)."""
    inp = _copy_studies(tmp_path / "in", {"d": 0})
    out = tmp_path / "out"
    script = f"""
        from pipeline.batch.run import run_batch
        from pipeline.config import Config
        res = run_batch("{inp}", "{out}", Config(), progress=False,
                        options={{"_test_crash": {{"d": "enospc"}}, "overlays": "none"}})
        print(res.exit_code)
    """
    res = _run_in_subprocess(script, timeout=240, MODICSCAN_TEST_HOOKS="1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split()[-1]) == EXIT_DISK_FULL
    batch = json.loads((out / "batch.json").read_text())
    assert batch["finished"] and batch["disk_full"] and [s["code"] for s in batch["studies"]] == ["DISK_FULL"]
    assert not [p for p in out.iterdir() if p.is_dir()]  # no half-written study folder
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------- OUT folder
def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    inp = _copy_studies(tmp_path / "in", {"a": 0})
    out = tmp_path / "out"
    with OutputFolder(out):  # a first run holds the folder
        res = CliRunner().invoke(main, ["run", str(inp), "-o", str(out), "--no-progress"])
        assert res.exit_code == EXIT_USAGE, res.output
        assert "another modicscan run" in res.output and len(res.output.strip().splitlines()) == 1
        assert not (out / "batch.log").exists() and not (out / "batch.json").exists()
    with OutputFolder(out):  # ... and is free again when that run ends
        pass


def test_shards_of_a_job_array_share_the_folder_but_each_shard_and_a_whole_run_are_exclusive(tmp_path):
    from pipeline.batch.out_dir import OutputFolderError

    out = tmp_path / "out"
    with OutputFolder(out, (0, 2)), OutputFolder(out, (1, 2)):  # the shards of one array, side by side
        with pytest.raises(OutputFolderError, match="another modicscan run"):
            OutputFolder(out, (1, 2)).acquire()  # the same shard twice
        with pytest.raises(OutputFolderError, match="another modicscan run"):
            OutputFolder(out).acquire()  # a whole run beside the shards
        res = CliRunner().invoke(main, ["run", str(tmp_path), "-o", str(out), "--shard", "0/2", "--no-progress"])
        assert res.exit_code == EXIT_USAGE and "another modicscan run" in res.output, res.output
        assert (out / f"{RESERVE_NAME}.shard-0-of-2").exists()  # the refused run left the holder's reserve alone
    with OutputFolder(out):  # all released
        pass


def test_a_shard_whose_share_is_empty_exits_0_not_no_studies(tmp_path):
    """Review of issue 30 (exit codes): a shard that got none of the studies (fewer studies than shards, or the keys
    fell elsewhere) exited 4, "no DICOM studies found under INPUT", although INPUT holds studies: a SLURM array task
    marked failed for nothing. Exit 4 now means that nothing under INPUT looked like a study, in every shard."""
    from pipeline import phantom

    inp = tmp_path / "in"
    phantom.make_study(inp, 70, matrix=96, n_slices=12, series=("T2",), study_name="s")  # fails fast: no T1
    codes = {}
    for i in range(2):
        res = CliRunner().invoke(main, ["run", str(inp), "-o", str(tmp_path / "out"), "--shard", f"{i}/2",
                                        "--no-progress"])
        batch = json.loads((tmp_path / "out" / f"batch.shard-{i}-of-2.json").read_text(encoding="utf-8"))
        codes[len(batch["studies"])] = res.exit_code
        assert "no DICOM studies found" not in res.output
    assert codes == {0: 0, 1: EXIT_PARTIAL}  # the empty shard: 0; the one with the failed study: 3
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images\n")
    res = CliRunner().invoke(main, ["run", str(empty), "-o", str(tmp_path / "out2"), "--shard", "1/2", "--no-progress"])
    assert res.exit_code == 4  # truly nothing: still 4


def test_a_read_only_output_folder_is_a_usage_error_in_one_line(tmp_path, monkeypatch):
    inp = _copy_studies(tmp_path / "in", {"a": 0})
    out = tmp_path / "ro" / "out"
    real_mkdir = os.mkdir

    def read_only_mkdir(path, *a, **kw):  # a read-only mount (root ignores file modes, so modes cannot show it)
        if Path(path).resolve().is_relative_to((tmp_path / "ro").resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    res = CliRunner().invoke(main, ["run", str(inp), "-o", str(out), "--no-progress"])
    assert res.exit_code == EXIT_USAGE, res.output
    assert res.output.strip().splitlines() == [f"modicscan: cannot write to the output folder {out.resolve()}: "
                                               "Read-only file system"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder without write permission")
def test_an_unwritable_output_folder_is_a_usage_error(tmp_path):
    inp = _copy_studies(tmp_path / "in", {"a": 0})
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        res = CliRunner().invoke(main, ["run", str(inp), "-o", str(out), "--no-progress"])
    finally:
        out.chmod(0o755)
    assert res.exit_code == EXIT_USAGE and "cannot write to the output folder" in res.output


def test_outputs_follow_the_umask(tmp_path):
    """mkstemp creates 0600: reports, batch.json, tables and PNGs were unreadable for colleagues."""
    inp = _copy_studies(tmp_path / "in", {"a": 0})
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        res = run_batch(inp, out, Config(), progress=False, options={"overlays": "all"},
                        executor=get_executor("inline"))
    finally:
        os.umask(old)
    assert res.exit_code == 0
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".modicscan.lock"]
    names = {p.name for p in files}
    assert {"report.json", "batch.json", "cohort.csv", "summary.json", "overview.png", "vertebrae.nii.gz"} <= names
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o640) for p in files}
    assert {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_dir()} == {oct(0o750)}


def test_a_worker_that_dies_before_it_gets_its_study_costs_only_that_study(tmp_path, monkeypatch):
    """Review of issue 30 (item 2, supervision at --jobs 1): a worker that died while idle (an out-of-memory kill
    after a big study: Python keeps its memory) or at its start made handing it the next study raise
    BrokenPipeError in the batch process: exit 1, batch.json unfinished, every study after it lost. Now that study
    fails WORKER_CRASHED and the batch goes on."""
    from pipeline import phantom
    from pipeline.batch import executors

    inp = tmp_path / "in"
    for i, name in enumerate(("a", "b")):
        phantom.make_study(inp, 80 + i, matrix=96, n_slices=12, series=("T2",), study_name=name)  # fail fast: no T1
    real_give, calls = executors._Worker.give, []

    def give(self, task):
        calls.append(task.source_folder)
        if len(calls) == 1:  # the first worker is dead before its study reaches it
            self.proc.kill()
            self.proc.join()
        real_give(self, task)

    monkeypatch.setattr(executors._Worker, "give", give)
    result = run_batch(inp, tmp_path / "out", Config(), jobs=1, progress=False)
    batch = json.loads(result.batch_json.read_text(encoding="utf-8"))
    codes = sorted((s["source_folder"].split("/")[0], s["code"]) for s in batch["studies"])
    first = calls[0].split("/")[0]
    other = ({"a", "b"} - {first}).pop()
    assert codes == sorted([(first, "WORKER_CRASHED"), (other, "NO_SAGITTAL_T1")])
    assert batch["finished"] and result.exit_code == EXIT_PARTIAL


def test_input_inside_the_output_folder_is_never_cleaned_up(tmp_path):
    """Review of issue 30: with INPUT inside OUT (`modicscan run proj/dicom -o proj`) the start-up clean-up of temp
    files left by killed writers searched all of OUT, input included, and deleted an input file whose name looked
    like one of ours (`.export.4000000.tmp`: a pid that does not run). Input files are never changed; our own stale
    temp files are still removed."""
    from pipeline import phantom

    proj = tmp_path / "proj"
    phantom.make_study(proj / "dicom", 82, matrix=96, n_slices=12, series=("T2",), study_name="s")
    theirs = proj / "dicom" / "s" / ".export.4000000.tmp"
    theirs.write_text("the scanner's, not ours\n")
    ours = proj / ".batch.json.4000000.x1y2.tmp"
    ours.write_text("{")
    result = run_batch(proj / "dicom", proj, Config(), jobs=1, progress=False)
    assert result.exit_code == EXIT_PARTIAL  # the study has no T1
    assert theirs.read_text() == "the scanner's, not ours\n"
    assert not ours.exists()

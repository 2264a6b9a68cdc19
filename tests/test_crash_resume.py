"""SIGKILL in the middle of a batch, then rerun: one complete record per study, no temp files, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.report.schema import schema_errors

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def _sample_input(tmp_path: Path) -> Path:
    """The four sample studies, copied (the run must never touch the committed ones)."""
    inp = tmp_path / "in"
    for name in ("phantom_seed0000", "phantom_seed0001", "phantom_seed0002", "phantom_seed0003"):
        shutil.copytree(SAMPLE / name / "DICOM", inp / name / "DICOM")
    return inp


def test_kill_mid_batch_then_resume(tmp_path):
    inp = _sample_input(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(inp), "-o", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    killed_with_done = None
    while time.time() < deadline and proc.poll() is None:
        done = list(out.glob("*/report.json"))
        if done:
            os.kill(proc.pid, signal.SIGKILL)
            killed_with_done = len(done)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_with_done is not None and killed_with_done < 4, "the batch finished before it could be killed"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    batch = json.loads((out / "batch.json").read_text())
    assert batch["counts"].get("skipped", 0) >= killed_with_done
    assert batch["counts"].get("skipped", 0) + batch["counts"].get("analysed", 0) == 4
    for folder in (p for p in out.iterdir() if p.is_dir()):
        records = [n for n in ("report.json", "error.json") if (folder / n).exists()]
        assert records == ["report.json"], (folder, records)
        assert schema_errors(json.loads((folder / "report.json").read_text())) == []
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group (the CLI and its workers)."""
    inp = _sample_input(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(inp), "-o", str(out), "--no-progress", "--jobs", "2"]
    # A batch started from a terminal has SIGINT at its default; a test runner started in the background of a
    # script (`cmd &`) ignores it, and the batch would inherit that: start the batch as a terminal would.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.glob("*/report.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "the batch finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # stops promptly, without finishing the other studies
    assert proc.returncode == 130, err.decode()[-2000:]
    batch = json.loads((out / "batch.json").read_text())
    assert batch["finished"] is True and batch["interrupted"] is True
    assert "rerun the same command to resume" in err.decode()
    finished = {p.parent.name for p in out.glob("*/report.json")}
    assert 1 <= len(finished) < 4
    # no worker outlives the interrupted run
    import psutil

    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    batch = json.loads((out / "batch.json").read_text())
    assert batch["counts"].get("skipped", 0) >= len(finished) and batch["interrupted"] is False
    for folder in (p for p in out.iterdir() if p.is_dir()):
        assert [n for n in ("report.json", "error.json") if (folder / n).exists()] == ["report.json"], folder
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]

"""Helpers shared by the hostile-input tests (test_input_hostile*.py): small phantom studies and pydicom edits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom
from corpus import strict_json

from pipeline import phantom
from pipeline.batch.run import run_batch
from pipeline.config import Config
from pipeline.io.discovery import discover

REPO = Path(__file__).resolve().parents[1]
MATRIX, N_SLICES = 96, 12


def make_study(root: Path, name: str, seed: int, *, keep_truth: bool = False, **kw) -> Path:
    kw.setdefault("series", ("T1", "T2"))
    phantom.make_study(root, seed, matrix=MATRIX, n_slices=N_SLICES, study_name=name, **kw)
    if not keep_truth:
        shutil.rmtree(root / name / "truth")
    return root / name


def series_files(folder: Path, word: str) -> list[Path]:
    """Files of the series whose description contains ``word`` (case-insensitive), in file-name order."""
    return [p for p in sorted(folder.rglob("*.dcm"))
            if word in str(pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription).lower()]


def edit_files(paths: list[Path], fn) -> None:
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        fn(ds, i)
        ds.save_as(p)


def only_study(root: Path, **kw):
    d = discover(root, **kw)
    (st,) = d.studies.values()
    return st, d


def series_named(study, word: str):
    return next(s for s in study.series.values() if word in s.series_description.lower())


def run_batch_json(inp: Path, out: Path, **kw) -> tuple[int, dict]:
    result = run_batch(inp, out, Config(), jobs=1, progress=False, **kw)
    return result.exit_code, strict_json(result.batch_json)


def run_memory_limited(code: str, limit_bytes: int) -> dict:
    """Run ``code`` (prints one JSON line) in a child process whose address space is capped."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))
    """) + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

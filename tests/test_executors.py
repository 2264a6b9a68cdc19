"""Parallel execution: crash isolation in the local pool and on Dask, identical outputs, sharding."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.batch.executors import FORKSERVER_PRELOAD, get_executor
from pipeline.batch.run import make_tasks, run_batch, select_shard
from pipeline.config import Config

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
VOLATILE = ("generated_at", "timings_s")


@pytest.fixture(scope="module")
def three_studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    for name, seed in (("a", 0), ("b", 1), ("c", 3)):
        shutil.copytree(SAMPLE / f"phantom_seed000{seed}" / "DICOM", root / name / "DICOM")
    return root


def _stable_reports(out: Path) -> dict[str, dict]:
    reps = {}
    for p in sorted(out.glob("*/report.json")):
        r = json.loads(p.read_text())
        for k in VOLATILE:
            r.pop(k, None)
        reps[p.parent.name] = r
    return reps


@pytest.mark.parametrize("executor", ["local", "dask"])
def test_a_crashing_study_costs_only_itself(three_studies, tmp_path, monkeypatch, executor):
    monkeypatch.setenv("MODICSCAN_TEST_HOOKS", "1")
    out = tmp_path / "out"
    res = run_batch(three_studies, out, Config(), jobs=2, progress=False,
                    options={"_test_crash": {"b": "segfault"}}, executor=get_executor(executor))
    assert res.exit_code == 3
    by_folder = {o.source_folder.split("/")[0]: o for o in res.outcomes}
    assert by_folder["b"].status == "failed" and by_folder["b"].code == "WORKER_CRASHED"
    # Dask may recompute a finished task whose result sat on the worker that died: it then finds its own
    # report (resume) and says "skipped". Either way the study has its complete report.
    for name in ("a", "c"):
        assert by_folder[name].status in ("analysed", "skipped") and by_folder[name].code is None
        assert (out / by_folder[name].key / "report.json").exists()
    err = json.loads((out / by_folder["b"].key / "error.json").read_text())
    assert err["error"]["code"] == "WORKER_CRASHED"
    # A rerun without the crash retries the crashed study (transient) and skips the others.
    monkeypatch.delenv("MODICSCAN_TEST_HOOKS")
    res2 = run_batch(three_studies, out, Config(), jobs=2, progress=False, executor=get_executor(executor))
    status = {o.source_folder.split("/")[0]: o.status for o in res2.outcomes}
    assert status == {"a": "skipped", "b": "analysed", "c": "skipped"} and res2.exit_code == 0


def test_dask_and_local_reports_are_identical(three_studies, tmp_path):
    local = run_batch(three_studies, tmp_path / "local", Config(), jobs=2, progress=False, executor=get_executor("local"))
    dask = run_batch(three_studies, tmp_path / "dask", Config(), jobs=2, progress=False, executor=get_executor("dask"))
    assert local.exit_code == dask.exit_code == 0
    a, b = _stable_reports(tmp_path / "local"), _stable_reports(tmp_path / "dask")
    assert len(a) == 3 and a == b


def test_shards_are_disjoint_and_complete(three_studies, tmp_path):
    from pipeline.io import discovery as io

    cfg = Config()
    tasks = make_tasks(three_studies, tmp_path, cfg, io.discover(three_studies))
    parts = [select_shard(tasks, i, 2) for i in range(2)]
    keys = [t.key for p in parts for t in p]
    assert sorted(keys) == sorted(t.key for t in tasks) and len(set(keys)) == len(keys)
    with pytest.raises(ValueError):
        select_shard(tasks, 2, 2)


def _what_a_worker_starts_with(conn, stage_modules) -> None:
    preloaded = sys.modules.get("pipeline.batch.worker_preload")  # looked up, never imported here
    from pipeline.segmentation.probability import load_model  # importing it does not load the model

    conn.send({"missing": [m for m in stage_modules if m not in sys.modules],
               "failed": getattr(preloaded, "PRELOAD_FAILED", "not preloaded"),
               "model_cached": load_model.cache_info().currsize})


def test_workers_start_with_the_stages_imported_and_the_models_loaded():
    ctx = mp.get_context("forkserver")
    from pipeline.batch.worker_preload import STAGE_MODULES

    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # what iter_local sets (the server is started once per process)
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_what_a_worker_starts_with, args=(there, STAGE_MODULES))
    proc.start()
    got = here.recv()
    proc.join(timeout=30)
    assert got == {"missing": [], "failed": [], "model_cached": 1}


def test_preload_never_raises_and_names_what_it_could_not_load(monkeypatch):
    from pipeline.batch import worker_preload
    from pipeline.report import schema

    def broken():
        raise OSError("model file unreadable")

    monkeypatch.setattr(schema, "load_validators", broken)
    monkeypatch.setattr(worker_preload, "STAGE_MODULES", ("pipeline.measure", "pipeline.no_such_stage"))
    assert worker_preload.preload() == ["pipeline.no_such_stage", "report schema"]

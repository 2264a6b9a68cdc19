"""Speed and memory benchmark: ``python -m pipeline.bench`` (or ``modicscan bench``).

For each size (slices x matrix, scaled from a base) it generates phantom studies, measures how long pydicom
alone needs to read their pixel data, runs the pipeline on them in a separate process, and reports per-stage
median / p90 time per study, studies per minute, the peak RSS of any pipeline process, and the ratio
pipeline / pydicom-load (absolute times vary between machines; the ratio travels). It can also compare
1 vs N worker processes and record the memory profile over a long batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

STAGES = ("discover", "roles", "load", "resample", "segment", "measure", "classify", "write")


def _pydicom_load_s(study_dir: Path) -> float:
    import pydicom

    files = sorted(p for p in study_dir.rglob("*.dcm"))
    t = time.perf_counter()
    for f in files:
        _ = pydicom.dcmread(f).pixel_array
    return time.perf_counter() - t


class _RssSampler(threading.Thread):
    """Peak RSS of a process and its descendants (each process on its own), sampled every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self.stop_flag = False

    def run(self) -> None:
        import psutil

        while not self.stop_flag:
            try:
                procs = [self.root] + self.root.children(recursive=True)
                for p in procs:
                    try:
                        self.peak = max(self.peak, p.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            time.sleep(0.02)


def _run_pipeline(inp: Path, out: Path, jobs: int, config: str | None = None) -> tuple[float, int, int]:
    """Run ``modicscan run`` in a subprocess: (wall seconds, peak RSS bytes of any one process, exit code)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(inp), "-o", str(out), "--jobs", str(jobs),
           "--force", "--no-progress", "--overlays", "none"] + (["--config", str(config)] if config else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sampler = _RssSampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    sampler.stop_flag = True
    sampler.join()
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"pipeline run failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, sampler.peak, proc.returncode


def _stats(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p90": None}
    return {"median": round(float(np.median(values)), 4), "p90": round(float(np.percentile(values, 90)), 4)}


def bench_size(n_studies: int, slices: int, matrix: int, workdir: Path, jobs_list: list[int],
               config: str | None = None) -> dict:
    from pipeline import phantom

    inp = workdir / f"in_{slices}x{matrix}"
    for seed in range(n_studies):
        phantom.make_study(inp, seed, n_slices=slices, matrix=matrix)
    studies = sorted(p for p in inp.iterdir() if p.is_dir())
    pyd = [_pydicom_load_s(s / "DICOM") for s in studies]
    result: dict = {"slices": slices, "matrix": matrix, "series": 3, "n_studies": n_studies,
                    "pydicom_load_s": _stats(pyd), "runs": []}
    for jobs in jobs_list:
        out = workdir / f"out_{slices}x{matrix}_j{jobs}"
        wall, peak, code = _run_pipeline(inp, out, jobs, config)
        reports = [json.loads(p.read_text()) for p in out.glob("*/report.json")]
        batch = json.loads((out / "batch.json").read_text())
        per_stage = {st: [r["timings_s"].get(st, 0.0) for r in reports] for st in STAGES if st != "discover"}
        per_stage["discover"] = [batch["discover_s"] / max(len(studies), 1)] * len(reports)
        totals = [o["seconds"] for o in batch["studies"] if o["status"] == "analysed"]
        run = {
            "jobs": jobs, "wall_s": round(wall, 3), "analysed": len(reports), "exit_code": code,
            "studies_per_minute": round(len(reports) / wall * 60.0, 2) if wall else None,
            # Steady state of a long batch: every worker busy with one study after another, each study taking
            # what it took here (under the contention of the other workers). Start-up (interpreter, imports,
            # discovery, one model load per worker) is paid once per batch and is what wall-clock adds to this.
            "steady_studies_per_minute": round(jobs * 60.0 / float(np.mean(totals)), 2) if totals else None,
            "startup_s": round(wall - sum(totals) / jobs, 2) if totals else None,
            "peak_rss_mib": round(peak / 2**20, 1),
            "per_study_s": _stats([t + per_stage["discover"][0] for t in totals]),
            "stages_s": {st: _stats(v) for st, v in per_stage.items()},
        }
        med_total = run["per_study_s"]["median"]
        med_pyd = result["pydicom_load_s"]["median"]
        run["ratio_to_pydicom_load"] = round(med_total / med_pyd, 2) if med_total and med_pyd else None
        result["runs"].append(run)
    if len(result["runs"]) > 1 and result["runs"][0]["studies_per_minute"]:
        base = result["runs"][0]["studies_per_minute"]
        steady = result["runs"][0]["steady_studies_per_minute"]
        for r in result["runs"]:
            r["throughput_vs_first"] = round(r["studies_per_minute"] / base, 2)
            if steady and r["steady_studies_per_minute"]:
                r["steady_throughput_vs_first"] = round(r["steady_studies_per_minute"] / steady, 2)
    return result


def memory_profile(n_studies: int, workdir: Path, matrix: int = 128, slices: int = 15) -> dict:
    """RSS of one in-process batch after every study: a flat profile means nothing accumulates."""
    import psutil

    from pipeline import phantom
    from pipeline.batch.run import run_batch
    from pipeline.batch.study import process_study
    from pipeline.config import Config

    inp = workdir / "memory_in"
    for seed in range(n_studies):
        phantom.make_study(inp, 1000 + seed, n_slices=slices, matrix=matrix)
    me = psutil.Process()
    samples: list[int] = []

    def executor(tasks, jobs):
        for t in tasks:
            oc = process_study(t)
            samples.append(me.memory_info().rss)
            yield oc

    run_batch(inp, workdir / "memory_out", Config(), jobs=1, progress=False, executor=executor)
    mib = [s / 2**20 for s in samples]
    tenth = max(1, len(mib) // 10)
    return {"n_studies": len(mib), "rss_mib_first": round(mib[0], 1), "rss_mib_last": round(mib[-1], 1),
            "rss_mib_max": round(max(mib), 1),
            "rss_mib_by_decile": [round(float(np.median(mib[i:i + tenth])), 1) for i in range(0, len(mib), tenth)],
            "growth_mib_after_first_decile": round(mib[-1] - float(np.median(mib[:tenth])), 1)}


def format_table(res: dict) -> str:
    lines = []
    for size in res["sizes"]:
        lines.append(f"\n== {size['n_studies']} studies of 3 series x {size['slices']} slices x "
                     f"{size['matrix']}x{size['matrix']}   pydicom load median {size['pydicom_load_s']['median']} s")
        for run in size["runs"]:
            lines.append(f"  jobs={run['jobs']}: {run['studies_per_minute']} studies/min, per study median "
                         f"{run['per_study_s']['median']} s / p90 {run['per_study_s']['p90']} s, ratio to pydicom load "
                         f"{run['ratio_to_pydicom_load']}, peak RSS {run['peak_rss_mib']} MiB"
                         + (f", throughput x{run['throughput_vs_first']}" if "throughput_vs_first" in run else ""))
            lines.append(f"    steady state {run['steady_studies_per_minute']} studies/min"
                         + (f" (x{run['steady_throughput_vs_first']})" if "steady_throughput_vs_first" in run else "")
                         + f", start-up {run['startup_s']} s per batch")
            lines.append("    stage       median s   p90 s")
            for st, v in run["stages_s"].items():
                lines.append(f"    {st:<10} {v['median']!s:>9} {v['p90']!s:>7}")
    if "memory" in res:
        m = res["memory"]
        lines.append(f"\n== memory over {m['n_studies']} studies (one process): first {m['rss_mib_first']} MiB, "
                     f"last {m['rss_mib_last']} MiB, max {m['rss_mib_max']} MiB; by decile {m['rss_mib_by_decile']}")
    return "\n".join(lines)


def run_bench(studies: int = 4, slices: int = 15, matrix: int = 128, scales=(1, 2, 4), jobs=(1, 2),
              memory_studies: int = 0, json_out: str | None = None, workdir: str | None = None,
              config: str | None = None) -> dict:
    tmp = tempfile.TemporaryDirectory(prefix="modicscan-bench-") if workdir is None else None
    wd = Path(workdir or tmp.name)
    wd.mkdir(parents=True, exist_ok=True)
    try:
        res: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "config": config,
                     "sizes": []}
        for s in scales:
            js = list(jobs) if s == scales[0] else [1]
            res["sizes"].append(bench_size(studies, slices * s, matrix * s, wd, js, config))
        if memory_studies:
            res["memory"] = memory_profile(memory_studies, wd)
        if json_out:
            Path(json_out).write_text(json.dumps(res, indent=1))
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=4, help="phantom studies per size (default 4)")
    ap.add_argument("--slices", type=int, default=15, help="slices per series at scale 1 (default 15)")
    ap.add_argument("--matrix", type=int, default=128, help="in-plane matrix at scale 1 (default 128)")
    ap.add_argument("--scales", default="1,2,4", help="multiply slices and matrix by these (default 1,2,4)")
    ap.add_argument("--jobs", default="1,2", help="worker counts compared at the first scale (default 1,2)")
    ap.add_argument("--memory-studies", type=int, default=0, help="also record RSS over a batch of this many studies")
    ap.add_argument("--json-out", default=None, help="write the results as JSON here")
    ap.add_argument("--workdir", default=None, help="keep generated studies and outputs here")
    ap.add_argument("--config", default=None, help="YAML config for the runs (e.g. segmentation: body_model: onepass)")
    a = ap.parse_args(argv)
    if a.config and not Path(a.config).is_file():
        ap.error(f"--config {a.config}: no such file")
    res = run_bench(a.studies, a.slices, a.matrix, tuple(int(x) for x in a.scales.split(",")),
                    tuple(int(x) for x in a.jobs.split(",")), a.memory_studies, a.json_out, a.workdir, a.config)
    print(format_table(res))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

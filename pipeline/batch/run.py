"""Stage 7: the batch around the per-study function (:func:`pipeline.batch.study.process_study`).

``run_batch`` discovers studies, skips those already done for the same input and config (resume), hands the
rest to an executor one study at a time, keeps ``out/batch.json`` up to date and returns the exit code's facts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline import __version__
from pipeline.batch.folders import folder_verdicts
from pipeline.batch.study import StudyOutcome, StudyTask, already_done, input_hash, study_files
from pipeline.config import Config
from pipeline.io.atomic import write_json_atomic
from pipeline.io.walk import shown
from pipeline.report.identity import study_key
from pipeline.report.json_report import software_info

log = logging.getLogger("modicscan")


EXIT_OK = 0


EXIT_INTERNAL = 1


EXIT_USAGE = 2


EXIT_PARTIAL = 3


EXIT_NO_STUDIES = 4


# ---------------------------------------------------------------------------------------------- batch
@dataclass
class BatchResult:
    outcomes: list[StudyOutcome]
    exit_code: int
    batch_json: Path


def make_tasks(input_root: Path, out_root: Path, cfg: Config, discovery, *, force: bool = False,
               options: dict | None = None) -> list[StudyTask]:
    tasks = []
    for uid in sorted(discovery.studies):
        st = discovery.studies[uid]
        files = study_files(st)
        folder = shown(os.path.relpath(st.root or os.path.dirname(files[0]), input_root)) if files else ""
        tasks.append(StudyTask(
            study=st, out_root=str(out_root), config=cfg, key=study_key(uid, cfg.report.pseudonymise_key),
            input_hash=input_hash(st), n_files=len(files), source_folder=folder, force=force,
            options=dict(options or {}),
        ))
    return tasks


def select_shard(tasks: list[StudyTask], index: int, count: int) -> list[StudyTask]:
    """Shard ``index`` (0-based) of ``count``: chosen by the study key, so it does not depend on the other studies."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < N")
    return [t for t in tasks if int(t.key[:8], 16) % count == index]


def _public_path(path: str, cfg: Config) -> str:
    """Folder names may carry patient names: hashed when pseudonymising."""
    from pipeline.report.identity import keyed_hash

    if cfg.report.pseudonymise_key and path:
        return "path-" + keyed_hash("path:" + path, cfg.report.pseudonymise_key, 12)
    return path


def run_batch(
    input_root: str | Path,
    out_root: str | Path,
    cfg: Config,
    *,
    jobs: int = 1,
    force: bool = False,
    progress: bool = True,
    options: dict | None = None,
    executor: Callable[[list[StudyTask], int], Iterable[StudyOutcome]] | None = None,
    shard: tuple[int, int] | None = None,
) -> BatchResult:
    """Analyse every study under ``input_root``; outputs under ``out_root``. See README for the layout."""
    from pipeline.io.discovery import discover
    from pipeline.report.cohort import write_cohort

    input_root = Path(input_root).resolve()
    out_root = Path(out_root).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    from pipeline.io.atomic import remove_stale_temp_files

    stale = remove_stale_temp_files(out_root)
    if stale:
        log.info("removed %d temp file(s) left by an interrupted earlier run", stale)
    started = time.time()
    t0 = time.perf_counter()
    # OUT inside INPUT: our own outputs are never read back as input.
    discovery = discover(input_root, cfg.loading, exclude=[out_root])
    discover_s = time.perf_counter() - t0
    log.info("discovered %d studies in %d files (%d skipped) in %.2f s", len(discovery.studies),
             discovery.n_files_seen, len(discovery.skipped), discover_s)
    tasks = make_tasks(input_root, out_root, cfg, discovery, force=force, options=options)
    if shard is not None:
        tasks = select_shard(tasks, *shard)
        log.info("shard %d/%d: %d studies", shard[0], shard[1], len(tasks))
    cfg_hash = cfg.hash()

    outcomes: list[StudyOutcome] = []
    skipped_folders: list[dict] = []
    for v in (folder_verdicts(input_root, discovery.skipped, discovery.studies) if shard is None or shard[0] == 0 else []):
        if v.status == "skipped":  # e.g. truth/ or notes/ beside a study: listed, not a failed study
            skipped_folders.append({"path": v.folder, "reason": v.code, "message": v.message, "n_files": v.n_files})
            log.info("skipped folder %s: %s", _public_path(v.folder, cfg), v.message)
        else:
            outcomes.append(StudyOutcome(key=v.key, status="failed", code=v.code, message=v.message,
                                         source_folder=v.folder, n_files=v.n_files))

    batch_path = out_root / ("batch.json" if shard is None else f"batch.shard-{shard[0]}-of-{shard[1]}.json")
    run = _BatchRecord(batch_path, input_root, out_root, cfg, discovery, started, discover_s, skipped_folders)
    todo: list[StudyTask] = []
    for t in tasks:
        done = already_done(t, cfg_hash)
        if done is not None:
            outcomes.append(done)
        else:
            todo.append(t)
    if todo or outcomes:
        run.write(outcomes, finished=False)

    if executor is None:
        from pipeline.batch.executors import iter_local as executor
    runner = executor
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="study", desc="modicscan", leave=True)
    interrupted = False
    try:
        for oc in runner(todo, jobs):
            outcomes.append(oc)
            run.write(outcomes, finished=False)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{oc.status} {oc.key}")
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: %d of %d studies finished; rerun the same command to resume", len(outcomes), len(tasks))
    finally:
        if bar is not None:
            bar.close()

    try:
        write_cohort(out_root)
    except Exception:  # noqa: BLE001 - the per-study records are the results; the table can be rebuilt
        log.exception("could not write the cohort table; rebuild with `modicscan summarize %s`", out_root)

    n_failed = sum(o.status == "failed" or (o.status == "skipped" and bool(o.code)) for o in outcomes)
    if not tasks and not outcomes:
        code = EXIT_NO_STUDIES
    elif interrupted:
        code = 130
    elif n_failed:
        code = EXIT_PARTIAL
    else:
        code = EXIT_OK
    run.write(outcomes, finished=True, exit_code=code, interrupted=interrupted)
    return BatchResult(outcomes, code, batch_path)


class _BatchRecord:
    """out/batch.json: what ran, what failed and why, versions, config hash. Rewritten atomically."""

    def __init__(self, path: Path, input_root: Path, out_root: Path, cfg: Config, discovery, started: float,
                 discover_s: float, skipped_folders: list[dict] | None = None):
        self.path, self.input_root, self.out_root, self.cfg = path, input_root, out_root, cfg
        self.discovery, self.started, self.discover_s = discovery, started, discover_s
        self.skipped_folders = skipped_folders or []

    def write(self, outcomes: list[StudyOutcome], *, finished: bool, exit_code: int | None = None,
              interrupted: bool = False) -> None:
        import datetime as dt

        cfg = self.cfg
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        studies = []
        for o in sorted(outcomes, key=lambda o: o.key):
            d = o.to_dict()
            d["source_folder"] = _public_path(d["source_folder"], cfg)
            studies.append(d)
        rec = {
            "schema_version": "1.0.0",
            "report_type": "modicscan.batch",
            "modicscan_version": __version__,
            "software": software_info(),
            "started_at": dt.datetime.fromtimestamp(self.started, dt.UTC).isoformat(timespec="seconds"),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds") if finished else None,
            "finished": finished,
            "interrupted": interrupted,
            "exit_code": exit_code,
            "input": str(self.input_root) if not cfg.report.pseudonymise_key else _public_path(str(self.input_root), cfg),
            "config_hash": cfg.hash(),
            "config": cfg.to_dict_public(),
            "files_seen": self.discovery.n_files_seen,
            "discover_s": round(self.discover_s, 4),
            "skipped_files": [
                {"path": _public_path(shown(os.path.relpath(s.path, self.input_root)), cfg), "reason": s.reason}
                for s in self.discovery.skipped
            ],
            "skipped_folders": [{**f, "path": _public_path(f["path"], cfg)} for f in self.skipped_folders],
            "counts": counts,
            "studies": studies,
        }
        write_json_atomic(self.path, rec)

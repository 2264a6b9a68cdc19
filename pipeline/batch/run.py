"""Stage 7: the batch around the per-study function.

``run_batch`` takes the output folder (one run at a time), discovers studies, skips those already done for the
same input and config (resume), hands the rest to an executor one study at a time, and keeps
``out/batch.json`` up to date. A full output disk stops the run with batch.json finished (exit code 5).
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
from pipeline.batch.out_dir import OutputFolder
from pipeline.batch.study import StudyOutcome, StudyTask, already_done, input_hash, study_files
from pipeline.config import Config
from pipeline.io.atomic import is_disk_full, write_json_atomic
from pipeline.io.walk import shown
from pipeline.report.identity import Identity, Redactor, public_path, study_key
from pipeline.report.json_report import software_info

log = logging.getLogger("modicscan")


# Exit codes (README "Exit codes"): 3 also when every study failed; 4 only when nothing looked like a study.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_NO_STUDIES = 4
EXIT_DISK_FULL = 5
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------------- batch
@dataclass
class BatchResult:
    outcomes: list[StudyOutcome]
    exit_code: int
    batch_json: Path
    disk_full: bool = False


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
            options=dict(options or {}), input_root=str(input_root),
        ))
    return tasks


def select_shard(tasks: list[StudyTask], index: int, count: int) -> list[StudyTask]:
    """Shard ``index`` (0-based) of ``count``: chosen by the study key, so it does not depend on the other studies."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < N")
    return [t for t in tasks if int(t.key[:8], 16) % count == index]


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
    output: OutputFolder | None = None,
) -> BatchResult:
    """Analyse every study under ``input_root``; outputs under ``out_root``. See README for the layout.

    ``output``: the output folder, already held by the caller (the CLI takes it before it opens batch.log);
    otherwise taken here. Raises ``OutputFolderError`` when another run holds it or it cannot be written.
    """
    if output is None:
        with OutputFolder(Path(out_root).resolve(), shard) as held:
            return run_batch(input_root, out_root, cfg, jobs=jobs, force=force, progress=progress, options=options,
                             executor=executor, shard=shard, output=held)
    from pipeline.io.atomic import remove_stale_temp_files
    from pipeline.io.discovery import discover
    from pipeline.report.cohort import write_cohort

    input_root = Path(input_root).resolve()
    out_root = Path(out_root).resolve()
    stale = remove_stale_temp_files(out_root, keep=(input_root,))  # INPUT may lie inside OUT: never touched
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

    batch_path = out_root / ("batch.json" if shard is None else f"batch.shard-{shard[0]}-of-{shard[1]}.json")
    run = _BatchRecord(batch_path, input_root, out_root, cfg, discovery, started, discover_s)
    log.info("input %s", run.public_input)  # after discovery: the patients' identifiers are known now
    outcomes: list[StudyOutcome] = []
    key = cfg.report.pseudonymise_key
    verdicts = folder_verdicts(input_root, discovery.skipped, discovery.studies)
    # exit 4 only when nothing under INPUT looked like a study, not when this shard's share is empty
    nothing_found = not discovery.studies and not any(v.status == "failed" for v in verdicts)
    for v in (verdicts if shard is None or shard[0] == 0 else []):
        shown_folder = public_path(run.patients.text(v.folder), key)
        if v.status == "skipped":  # e.g. truth/ or notes/ beside a study: listed, not a failed study
            run.skipped_folders.append({"path": v.folder, "reason": v.code, "message": v.message, "n_files": v.n_files})
            log.info("skipped folder %s: %s", shown_folder, v.message)
        else:
            outcomes.append(StudyOutcome(key=v.key_for(key), status="failed", code=v.code, message=v.message,
                                         source_folder=shown_folder, n_files=v.n_files))

    todo: list[StudyTask] = []
    for t in tasks:
        done = already_done(t, cfg_hash)
        if done is not None:
            outcomes.append(done)
        else:
            todo.append(t)
    disk_full = False
    if todo or outcomes:
        disk_full = not run.write_unless_disk_full(outcomes, finished=False)

    if executor is None:
        from pipeline.batch.executors import iter_local as executor
    bar = None
    if progress and todo and not disk_full:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="study", desc="modicscan", leave=True)
    interrupted = False
    running = executor(todo if not disk_full else [], jobs)
    try:
        for oc in running:
            outcomes.append(oc)
            if oc.code == "DISK_FULL":  # every later study would fail the same way: stop, keep what is complete
                disk_full = True
                break
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{oc.status} {oc.key}")
            if not run.write_unless_disk_full(outcomes, finished=False):
                disk_full = True
                break
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: %d of %d studies finished; rerun the same command to resume", len(outcomes), len(tasks))
    finally:
        close = getattr(running, "close", None)
        if close is not None:
            close()  # stops the workers of an executor left early (disk full)
        if bar is not None:
            bar.close()

    if not disk_full:
        try:
            write_cohort(out_root)
        except Exception as exc:  # noqa: BLE001 - the per-study records are the results; the table can be rebuilt
            disk_full = is_disk_full(exc)
            if not disk_full:
                log.exception("could not write the cohort table; rebuild with `modicscan summarize %s`", out_root)
    if disk_full:
        output.release_reserve()  # the space batch.json and the log need now
        complete = sum(o.code != "DISK_FULL" for o in outcomes)
        log.error("the output disk is full: %d studies have their complete record, the others were not started or "
                  "not kept; free some space and rerun the same command to resume", complete)

    n_failed = sum(o.status == "failed" or (o.status == "skipped" and bool(o.code)) for o in outcomes)
    if disk_full:
        code = EXIT_DISK_FULL
    elif nothing_found:
        code = EXIT_NO_STUDIES
    elif interrupted:
        code = EXIT_INTERRUPTED
    elif n_failed:
        code = EXIT_PARTIAL
    else:
        code = EXIT_OK
    if not run.write_unless_disk_full(outcomes, finished=True, exit_code=code, interrupted=interrupted,
                                      disk_full=disk_full):
        log.error("batch.json could not be finished (disk full); its previous version is intact and a rerun "
                  "resumes")
    return BatchResult(outcomes, code, batch_path, disk_full)


def _same_folder(a: Path, b: Path) -> bool:
    """One folder under two paths (as the walk decides it: device and inode, so also through a bind mount)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _BatchRecord:
    """out/batch.json: what ran, what failed and why, versions, config hash. Rewritten atomically."""

    def __init__(self, path: Path, input_root: Path, out_root: Path, cfg: Config, discovery, started: float,
                 discover_s: float):
        self.path, self.input_root, self.out_root, self.cfg = path, input_root, out_root, cfg
        self.discovery, self.started, self.discover_s = discovery, started, discover_s
        self.skipped_folders: list[dict] = []  # input folders without DICOM (truth/, notes/): listed, not failed
        self._patients: Redactor | None = None

    @property
    def patients(self) -> Redactor:
        """Strips every patient's name, ID and birth date from paths of skipped files and failed folders."""
        if self._patients is None:
            identity = Identity(self.cfg.report.pseudonymise_key, self.cfg.report.keep_identifiers)
            self._patients = identity.patients_redactor(self.discovery.studies.values())
        return self._patients

    @property
    def public_input(self) -> str:
        """The INPUT folder as batch.json and batch.log show it: printable (a Latin-1 name as escapes), without any
        patient's identifiers, hashed when pseudonymising."""
        return public_path(self.patients.text(shown(self.input_root)), self.cfg.report.pseudonymise_key)

    def write_unless_disk_full(self, outcomes: list[StudyOutcome], **kw) -> bool:
        """:meth:`write`; False (the earlier batch.json stays, whole) when the disk is full."""
        try:
            self.write(outcomes, **kw)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            return False
        return True

    def write(self, outcomes: list[StudyOutcome], *, finished: bool, exit_code: int | None = None,
              interrupted: bool = False, disk_full: bool = False) -> None:
        import datetime as dt

        cfg = self.cfg
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        key = cfg.report.pseudonymise_key
        studies = [o.to_dict() for o in sorted(outcomes, key=lambda o: o.key)]  # folders already public
        rec = {
            "schema_version": "1.0.0",
            "report_type": "modicscan.batch",
            # within walk.is_modicscan_output's 4 KiB head: a later run over a folder holding this one enters it
            "output_is_input": _same_folder(self.out_root, self.input_root),
            "modicscan_version": __version__,
            "software": software_info(),
            "started_at": dt.datetime.fromtimestamp(self.started, dt.UTC).isoformat(timespec="seconds"),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds") if finished else None,
            "finished": finished,
            "interrupted": interrupted,
            "disk_full": disk_full,
            "exit_code": exit_code,
            "input": self.public_input,
            "config_hash": cfg.hash(),
            "config": cfg.to_dict_public(),
            "files_seen": self.discovery.n_files_seen,
            "discover_s": round(self.discover_s, 4),
            "skipped_files": [
                {"path": public_path(self.patients.text(shown(os.path.relpath(s.path, self.input_root))), key),
                 "reason": s.reason}
                for s in self.discovery.skipped
            ],
            "skipped_folders": [{**f, "path": public_path(self.patients.text(f["path"]), key)}
                                for f in self.skipped_folders],
            "counts": counts,
            "studies": studies,
        }
        write_json_atomic(self.path, rec)

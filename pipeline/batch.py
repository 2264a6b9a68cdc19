"""Stage 7: the per-study function and the batch around it.

``process_study`` runs one study end to end and never raises for bad input: it writes exactly one of
``out/<key>/report.json`` (analysed) or ``out/<key>/error.json`` (failed, with a reason code).
``run_batch`` discovers studies, skips those already done for the same input and config (resume),
hands the rest to an executor one study at a time, and keeps ``out/batch.json`` up to date.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config
from .errors import StudyError
from .report import (
    Identity,
    build_error_record,
    build_report,
    software_info,
    study_key,
    validate_report,
    write_json_atomic,
)
from .types import StudyFiles, Volume

log = logging.getLogger("modicscan")

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_NO_STUDIES = 4
MIN_UNNAMED_COLUMN = 3  # unnamed bodies fewer than this are no spinal column (study fails with NO_LUMBAR_LEVELS)

# Failures worth retrying on a rerun even without --force: they depend on the machine, not the input.
TRANSIENT_CODES = {"INTERNAL_ERROR", "WORKER_CRASHED", "TIMEOUT"}

BODY_MODELS = {"unet": "2.5-D U-Net (shipped model, ONNX Runtime)",
               "classifier": "gradient-boosted pixel classifier (shipped model)"}


def segmentation_method(body_model: str) -> str:
    """The report's one-line description of how the bodies were segmented."""
    return (f"modicscan.segment: {BODY_MODELS[body_model]} on T2, T1 and STIR, watershed split at the discs, body "
            "edges re-decided at the input resolution, levels counted up from the sacrum")


@dataclass
class StudyTask:
    """Everything a worker needs for one study (picklable, so it can cross process / cluster boundaries)."""

    study: StudyFiles
    out_root: str
    config: Config
    key: str
    input_hash: str
    n_files: int
    source_folder: str
    force: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.out_root) / self.key


@dataclass
class StudyOutcome:
    key: str
    status: str  # analysed | failed | skipped
    code: str | None = None
    message: str | None = None
    seconds: float = 0.0
    source_folder: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    n_files: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- helpers
def study_files(study: StudyFiles) -> list[str]:
    return sorted({f for s in study.series.values() for f in s.files})


def input_hash(study: StudyFiles) -> str:
    """Fingerprint of a study's files (relative path, size, mtime): a rerun on unchanged input can skip it."""
    root = Path(study.root) if study.root else None
    h = hashlib.sha256()
    for f in study_files(study):
        p = Path(f)
        try:
            st = p.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        rel = os.path.relpath(p, root) if root else p.name
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def already_done(task: StudyTask, config_hash: str) -> StudyOutcome | None:
    """The outcome recorded by an earlier run for the same input and config, if any (resume)."""
    if task.force:
        return None
    for name, status in (("report.json", "analysed"), ("error.json", "failed")):
        rec = _read_json(task.out_dir / name)
        if not rec:
            continue
        same = rec.get("study", {}).get("input_hash") == task.input_hash and rec.get("config", {}).get("hash") == config_hash
        if not same:
            continue
        if status == "failed":
            code = rec.get("error", {}).get("code")
            if code in TRANSIENT_CODES:
                return None
            return StudyOutcome(task.key, "skipped", code, "failed in an earlier run: " + rec["error"].get("message", ""),
                                source_folder=task.source_folder, n_files=task.n_files)
        return StudyOutcome(task.key, "skipped", None, "analysed in an earlier run", source_folder=task.source_folder,
                            n_files=task.n_files)
    return None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _identity(cfg: Config) -> Identity:
    return Identity(cfg.report.pseudonymise_key, cfg.report.keep_identifiers)


def write_failure(task: StudyTask, code: str, message: str, details: dict | None = None,
                  warnings: list[str] | None = None) -> None:
    """Record a failed study: error.json replaces any stale report so exactly one record remains."""
    cfg = task.config
    rec = build_error_record(
        study=task.study, identity=_identity(cfg), config_hash=cfg.hash(), config_values=cfg.to_dict_public(),
        input_hash=task.input_hash, n_files=task.n_files, source_folder=task.source_folder,
        code=code, message=message, details=details, warnings=warnings,
    )
    write_json_atomic(task.out_dir / "error.json", rec)
    _remove(task.out_dir / "report.json")


# ---------------------------------------------------------------------------------------------- one study
def analyse_study(task: StudyTask) -> tuple[dict, dict[str, Any]]:
    """Run stages 2-6 on one study. Returns (report, artefacts). Raises StudyError for bad input."""
    from . import classify, io, measure, segment, series

    cfg = task.config
    timings: dict[str, float] = {}
    warnings: list[str] = []
    qc_flags: list[str] = []

    t = time.perf_counter()
    roles = series.assign_roles(task.study, cfg.roles)
    warnings += roles.warnings
    timings["roles"] = time.perf_counter() - t

    t = time.perf_counter()
    volumes: dict[str, Volume] = {}
    for role, choice in roles.roles.items():
        volumes[role] = io.load_series(task.study.series[choice.series_uid], cfg.loading)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    reference = volumes["T2"]
    resampled: dict[str, bool] = {}
    for role in ("T1", "STIR"):
        if role in volumes:
            before = volumes[role]
            volumes[role] = io.resample_to(before, reference)
            resampled[role] = volumes[role] is not before
            if resampled[role]:
                warnings.append(f"{role} series was resampled onto the T2 grid through the affines")
    timings["resample"] = time.perf_counter() - t

    t = time.perf_counter()
    masks_dir = task.options.get("masks_dir")
    if masks_dir:
        from .outputs import segmentation_from_masks

        seg = segmentation_from_masks(Path(masks_dir), task, reference)
        seg_method = "external label image (--masks)"
    else:
        extra = [volumes[r].data for r in ("T1", "STIR") if r in volumes]
        seg = segment.segment_vertebrae(reference.data, reference.spacing, cfg.segmentation, extra_images=extra)
        seg_method = segmentation_method(cfg.segmentation.body_model)
    if not seg.bodies:
        raise StudyError("SEGMENTATION_FAILED", "no vertebral body was found in the sagittal T2 series")
    # No lumbar level named: surely so, or fewer than three bodies (any lumbar sagittal shows a column of them; one
    # or two body-like blobs are another body part, e.g. the femur of a knee study)
    if not any(b.level in ("L1", "L2", "L3", "L4", "L5") for b in seg.bodies) and (
            seg.labelling_confidence >= 0.5 or len(seg.bodies) < MIN_UNNAMED_COLUMN):
        raise StudyError("NO_LUMBAR_LEVELS", "the segmented bodies were not labelled as lumbar levels")
    timings["segment"] = time.perf_counter() - t

    t = time.perf_counter()
    images = {role: vol.data for role, vol in volumes.items()}
    meas = measure.measure_study(images, seg, reference.spacing, cfg.measurement)
    timings["measure"] = time.perf_counter() - t

    t = time.perf_counter()
    fluid_role = "STIR" if "STIR" in volumes else "T2"
    findings = classify.classify_study(meas, cfg.classification, fluid_role)
    warnings += list(getattr(meas, "warnings", []) or []) + list(findings.warnings)
    timings["classify"] = time.perf_counter() - t

    report = build_report(
        study=task.study, identity=_identity(cfg), config_hash=cfg.hash(), config_values=cfg.to_dict_public(),
        input_hash=task.input_hash, n_files=task.n_files, source_folder=task.source_folder,
        roles=roles, volumes=volumes, resampled=resampled, seg=seg, seg_method=seg_method, findings=findings,
        qc_flags=qc_flags, warnings=warnings, timings=timings,
    )
    artefacts = {"volumes": volumes, "segmentation": seg, "findings": findings, "measurements": meas,
                 "t2_files": list(task.study.series[roles.roles["T2"].series_uid].files)}
    return report, artefacts


def process_study(task: StudyTask) -> StudyOutcome:
    """Analyse one study and write its one record. Never raises for a bad study (per-study isolation)."""
    start = time.perf_counter()
    done = already_done(task, task.config.hash())
    if done is not None:
        return done
    _test_hooks(task)
    try:
        report, artefacts = analyse_study(task)
        t = time.perf_counter()
        validate_report(report)
        write_extra_outputs(task, report, artefacts)
        report["timings_s"]["write"] = round(time.perf_counter() - t, 4)
        write_json_atomic(task.out_dir / "report.json", report)
        _remove(task.out_dir / "error.json")
        secs = time.perf_counter() - start
        log.info("analysed study %s (%s) in %.2f s", task.key, task.source_folder, secs)
        return StudyOutcome(task.key, "analysed", seconds=secs, source_folder=task.source_folder,
                            timings=report["timings_s"], n_files=task.n_files)
    except StudyError as exc:
        write_failure(task, exc.code, exc.message, exc.details)
        log.warning("study %s (%s) failed: %s: %s", task.key, task.source_folder, exc.code, exc.message)
        return StudyOutcome(task.key, "failed", exc.code, exc.message, time.perf_counter() - start, task.source_folder,
                            n_files=task.n_files)
    except MemoryError:
        msg = "ran out of memory while processing the study"
        write_failure(task, "INTERNAL_ERROR", msg)
        return StudyOutcome(task.key, "failed", "INTERNAL_ERROR", msg, time.perf_counter() - start, task.source_folder)
    except Exception as exc:  # noqa: BLE001 - isolation: one bad study never stops the batch
        tb = traceback.format_exc()
        log.error("study %s (%s) hit an internal error:\n%s", task.key, task.source_folder, tb)
        msg = f"unexpected {type(exc).__name__}: {exc}"[:500]
        write_failure(task, "INTERNAL_ERROR", msg, {"exception": type(exc).__name__})
        return StudyOutcome(task.key, "failed", "INTERNAL_ERROR", msg, time.perf_counter() - start, task.source_folder,
                            n_files=task.n_files)


def _test_hooks(task: StudyTask) -> None:
    """Deliberate crashes for the crash-isolation tests; inert unless MODICSCAN_TEST_HOOKS=1."""
    if os.environ.get("MODICSCAN_TEST_HOOKS") != "1":
        return
    crash = task.options.get("_test_crash", {}).get(task.source_folder.split("/")[0]) if isinstance(
        task.options.get("_test_crash"), dict) else None
    if crash == "segfault":
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)
    elif crash == "exit":
        os._exit(137)
    elif crash == "sleep":
        time.sleep(3600)


def write_extra_outputs(task: StudyTask, report: dict, artefacts: dict[str, Any]) -> None:
    """Masks, pictures and DICOM objects beside the report (each written atomically)."""
    from .outputs import write_study_outputs

    write_study_outputs(task.out_dir, report, artefacts, task.options)


# ---------------------------------------------------------------------------------------------- batch
@dataclass
class BatchResult:
    outcomes: list[StudyOutcome]
    exit_code: int
    batch_json: Path


def _failed_folders(root: Path, discovery, studies: dict[str, StudyFiles]) -> list[tuple[str, list]]:
    """Top-level input folders that held files but yielded no study (e.g. only corrupt files)."""
    covered: set[str] = set()
    for st in studies.values():
        for f in study_files(st):
            rel = Path(os.path.relpath(f, root)).parts
            covered.add(rel[0] if len(rel) > 1 else "")
    groups: dict[str, list] = {}
    for sk in discovery.skipped:
        rel = Path(os.path.relpath(sk.path, root)).parts
        top = rel[0] if len(rel) > 1 else ""
        if top and top not in covered:
            groups.setdefault(top, []).append(sk)
    return sorted(groups.items())


def make_tasks(input_root: Path, out_root: Path, cfg: Config, discovery, *, force: bool = False,
               options: dict | None = None) -> list[StudyTask]:
    tasks = []
    for uid in sorted(discovery.studies):
        st = discovery.studies[uid]
        files = study_files(st)
        folder = os.path.relpath(st.root or os.path.dirname(files[0]), input_root) if files else ""
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
    from .report import keyed_hash

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
    from . import cohort, io

    input_root = Path(input_root).resolve()
    out_root = Path(out_root).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    from .report import remove_stale_temp_files

    stale = remove_stale_temp_files(out_root)
    if stale:
        log.info("removed %d temp file(s) left by an interrupted earlier run", stale)
    started = time.time()
    t0 = time.perf_counter()
    discovery = io.discover(input_root, cfg.loading)
    discover_s = time.perf_counter() - t0
    log.info("discovered %d studies in %d files (%d skipped) in %.2f s", len(discovery.studies),
             discovery.n_files_seen, len(discovery.skipped), discover_s)
    tasks = make_tasks(input_root, out_root, cfg, discovery, force=force, options=options)
    if shard is not None:
        tasks = select_shard(tasks, *shard)
        log.info("shard %d/%d: %d studies", shard[0], shard[1], len(tasks))
    cfg_hash = cfg.hash()

    outcomes: list[StudyOutcome] = []
    for folder, skipped in (_failed_folders(input_root, discovery, discovery.studies) if shard is None or shard[0] == 0 else []):
        reasons = sorted({s.reason for s in skipped})
        outcomes.append(StudyOutcome(
            key="folder-" + hashlib.sha256(folder.encode()).hexdigest()[:10], status="failed", code="NO_DICOM_FILES",
            message=f"{len(skipped)} file(s) in this folder could not be used ({', '.join(reasons)}); no DICOM image series found",
            source_folder=folder, n_files=len(skipped)))

    batch_path = out_root / ("batch.json" if shard is None else f"batch.shard-{shard[0]}-of-{shard[1]}.json")
    run = _BatchRecord(batch_path, input_root, out_root, cfg, discovery, started, discover_s)
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
        from .executors import iter_local as executor
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
        cohort.write_cohort(out_root)
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
                 discover_s: float):
        self.path, self.input_root, self.out_root, self.cfg = path, input_root, out_root, cfg
        self.discovery, self.started, self.discover_s = discovery, started, discover_s

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
                {"path": _public_path(os.path.relpath(s.path, self.input_root), cfg), "reason": s.reason}
                for s in self.discovery.skipped
            ],
            "counts": counts,
            "studies": studies,
        }
        write_json_atomic(self.path, rec)

"""One study from files to report: the stages in order (load, roles, segment, measure, classify,
report) and the per-study outcome. Never raises for bad input: a StudyError becomes error.json."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import StudyError
from pipeline.io.atomic import is_disk_full, make_staging_dir, publish_dir, write_json_atomic
from pipeline.report.identity import Identity, Redactor, public_path
from pipeline.report.json_report import build_error_record, build_report
from pipeline.report.schema import SCHEMA_VERSION, validate_report
from pipeline.types import StudyFiles, Volume

log = logging.getLogger("modicscan")

MIN_UNNAMED_COLUMN = 3  # unnamed bodies fewer than this are no spinal column (study fails with NO_LUMBAR_LEVELS)


# Failures worth retrying on a rerun even without --force: they depend on the machine, not the input.
TRANSIENT_CODES = {"INTERNAL_ERROR", "WORKER_CRASHED", "TIMEOUT", "DISK_FULL", "OUT_OF_MEMORY"}

BODY_MODELS = {"unet": "2.5-D U-Net", "onepass": "one-pass 2.5-D U-Net on whole slices",
               "classifier": "gradient-boosted pixel classifier"}


def segmentation_method(body_model: str, refine_edges: bool = True, extra_contrasts: bool = True,
                        int8: bool = False) -> str:
    """The report's one-line description of how the bodies were segmented."""
    edges = " body edges re-decided at the input resolution," if refine_edges and body_model != "onepass" else ""
    on = "T2, T1 and STIR" if extra_contrasts else "T2"
    runtime = "" if body_model == "classifier" else (", int8" if int8 else "") + ", ONNX Runtime"  # the nets only
    return (f"modicscan.segment: {BODY_MODELS[body_model]} (shipped model{runtime}) on {on}, watershed split at the discs,{edges} "
            "levels counted up from the lumbosacral junction")


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
    input_root: str = ""  # the run's INPUT folder (its name is redacted from messages when pseudonymising)

    @property
    def out_dir(self) -> Path:
        return Path(self.out_root) / self.key

    @functools.cached_property
    def redactor(self) -> Redactor:
        """Strips the study's identifying text (names, IDs, file names; more when pseudonymising) from free text."""
        return _identity(self.config).redactor(self.study, study_files(self.study), self.input_root, self.source_folder)

    @property
    def public_folder(self) -> str:
        """The input folder as batch.json and batch.log show it (hashed when pseudonymising)."""
        report = self.config.report
        if report.pseudonymise_key:
            return public_path(self.source_folder, report.pseudonymise_key)
        if report.keep_identifiers:
            return self.source_folder
        # only the patient's identifiers: cheap, and the batch process asks this of every study when it resumes
        return _identity(self.config).patients_redactor([self.study]).text(self.source_folder)


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
        # fsencode: a name that is not UTF-8 (Latin-1 "M\xfcller") is kept as its bytes, never an encode error.
        h.update(os.fsencode(rel) + f"\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def already_done(task: StudyTask, config_hash: str) -> StudyOutcome | None:
    """The outcome recorded by an earlier run for the same input, config and schema version, if any (resume). A
    record of another schema version is redone: its fields may mean something else (schema 1.2.0: edema over the
    interior), and a cohort table must not mix the two."""
    if task.force:
        return None
    for name, status in (("report.json", "analysed"), ("error.json", "failed")):
        rec = _read_json(task.out_dir / name)
        if not rec:
            continue
        same = (rec.get("study", {}).get("input_hash") == task.input_hash
                and rec.get("config", {}).get("hash") == config_hash and rec.get("schema_version") == SCHEMA_VERSION)
        if not same:
            continue
        if status == "failed":
            code = rec.get("error", {}).get("code")
            if code in TRANSIENT_CODES:
                return None
            return StudyOutcome(task.key, "skipped", code, "failed in an earlier run: " + rec["error"].get("message", ""),
                                source_folder=task.public_folder, n_files=task.n_files)
        return StudyOutcome(task.key, "skipped", None, "analysed in an earlier run", source_folder=task.public_folder,
                            n_files=task.n_files)
    return None


def publish_study(task: StudyTask, write: Callable[[Path], None]) -> None:
    """Write the study's files with ``write(folder)`` into a staging folder, then put it in place of the study's
    folder: each study folder is complete (report.json or error.json and its companions) or absent, even when
    the disk fills up or the worker is killed mid-write."""
    staging = make_staging_dir(task.out_root, task.key)
    try:
        write(staging)
        publish_dir(staging, task.out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _identity(cfg: Config) -> Identity:
    return Identity(cfg.report.pseudonymise_key, cfg.report.keep_identifiers)


def write_failure(task: StudyTask, code: str, message: str, details: dict | None = None,
                  warnings: list[str] | None = None) -> None:
    """Record a failed study: a folder holding only error.json replaces the study's folder (one record remains)."""
    cfg = task.config
    rec = build_error_record(
        study=task.study, identity=_identity(cfg), config_hash=cfg.hash(), config_values=cfg.to_dict_public(),
        input_hash=task.input_hash, n_files=task.n_files, source_folder=task.source_folder,
        code=code, message=message, details=details, warnings=warnings,
    )
    rec = task.redactor.walk(rec)
    publish_study(task, lambda folder: write_json_atomic(folder / "error.json", rec))


# ---------------------------------------------------------------------------------------------- one study
def analyse_study(task: StudyTask) -> tuple[dict, dict[str, Any]]:
    """Run stages 2-6 on one study. Returns (report, artefacts). Raises StudyError for bad input."""
    from pipeline import roles as series
    from pipeline.io.volumes import check_pixel_budget, load_series
    from pipeline.segmentation.grid import WORK_MM

    cfg = task.config
    timings: dict[str, float] = {}
    warnings: list[str] = []
    qc_flags: list[str] = []

    t = time.perf_counter()
    roles = series.assign_roles(task.study, cfg.roles)
    warnings += roles.warnings
    timings["roles"] = time.perf_counter() - t

    t = time.perf_counter()
    # From the headers, before any decoding: the chosen series must fit the study's pixel budget (a 20 kB file
    # may declare 65535 x 65535 pixels); the T1 / STIR are resampled onto the T2 grid, so that counts once more.
    chosen = [task.study.series[c.series_uid] for c in roles.roles.values()]
    t2_summary = task.study.series[roles.roles["T2"].series_uid]
    check_pixel_budget(chosen + [t2_summary] * (len(chosen) - 1), cfg.loading.max_pixels_per_study, WORK_MM)
    volumes: dict[str, Volume] = {}
    for role, choice in roles.roles.items():
        volumes[role] = load_series(task.study.series[choice.series_uid], cfg.loading)
    timings["load"] = time.perf_counter() - t

    analysis = analyse_volumes(volumes, cfg, masks=(lambda ref: segmentation_from_masks_dir(task, ref))
                               if task.options.get("masks_dir") else None)
    timings.update(analysis.timings)
    warnings += analysis.warnings
    qc_flags += analysis.qc_flags
    volumes, seg, findings = analysis.volumes, analysis.segmentation, analysis.findings

    report = build_report(
        study=task.study, identity=_identity(cfg), config_hash=cfg.hash(), config_values=cfg.to_dict_public(),
        input_hash=task.input_hash, n_files=task.n_files, source_folder=task.source_folder,
        roles=roles, volumes=volumes, resampled=analysis.resampled, seg=seg, seg_method=analysis.seg_method,
        findings=findings, single_slice=analysis.single_slice,
        qc_flags=qc_flags, warnings=warnings, timings=timings,
    )
    artefacts = {"volumes": volumes, "segmentation": seg, "findings": findings, "measurements": analysis.measurements,
                 "t2_files": list(task.study.series[roles.roles["T2"].series_uid].files)}
    return report, artefacts


@dataclass
class StudyAnalysis:
    """What the stages after loading made of one study's volumes (see :func:`analyse_volumes`)."""

    volumes: dict[str, Volume]  # by role, every one on the T2 grid
    resampled: dict[str, bool]
    segmentation: Any
    seg_method: str
    measurements: Any
    findings: Any
    single_slice: bool
    warnings: list[str] = field(default_factory=list)
    qc_flags: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    disc_patches: Any = None  # (n_discs, 2, *disc_cnn.PATCH_MM) T1 / T2 patches when the disc model read them
    body_model: str = ""  # the body model the study ran (segmentation.body_model with "auto" resolved)


def segmentation_from_masks_dir(task: StudyTask, reference: Volume):
    from pipeline.io.masks import segmentation_from_masks

    return segmentation_from_masks(Path(task.options["masks_dir"]), task, reference)


def analyse_volumes(volumes: dict[str, Volume], cfg: Config, masks=None) -> StudyAnalysis:
    """Stages 3-5 on loaded volumes by role (T1, T2, optional STIR; DICOM series or NIfTI images, 3-D or one
    sagittal slice each), on any grids: T1 and STIR are resampled onto the T2 grid through their affines.
    ``masks``: a function T2 volume -> Segmentation replacing the segmentation (``--masks``).
    Raises StudyError (SEGMENTATION_FAILED, NO_LUMBAR_LEVELS)."""
    from pipeline import classify, measure
    from pipeline.io.nifti import resample_to
    from pipeline.io.nifti_study import is_single_slice
    from pipeline.segmentation.segment import resolve_body_model, segment_vertebrae

    timings: dict[str, float] = {}
    warnings: list[str] = []
    qc_flags: list[str] = []
    t = time.perf_counter()
    volumes = dict(volumes)
    reference = volumes["T2"]
    resampled: dict[str, bool] = {}
    for role in ("T1", "STIR"):
        if role in volumes:
            before = volumes[role]
            volumes[role] = resample_to(before, reference)
            resampled[role] = volumes[role] is not before
            if resampled[role]:
                warnings.append(f"{role} series was resampled onto the T2 grid through the affines")
    single_slice = is_single_slice(volumes)
    if single_slice:
        qc_flags.append("SINGLE_SLICE")
        warnings.append("single-slice study (one sagittal slice per series): findings off that slice are not seen "
                        "and every finding's confidence is lowered")
    timings["resample"] = time.perf_counter() - t

    t = time.perf_counter()
    # one body model for the whole study: the segmentation and the disc model trained on its outlines
    seg_cfg = replace(cfg.segmentation, body_model=resolve_body_model(cfg.segmentation.body_model, reference.shape[2]))
    if masks is not None:
        seg = masks(reference)
        seg_method = "external label image (--masks)"
    else:
        extra = [volumes[r].data for r in ("T1", "STIR") if r in volumes]
        seg = segment_vertebrae(reference.data, reference.spacing, seg_cfg, extra_images=extra)
        seg_method = segmentation_method(seg_cfg.body_model, seg_cfg.refine_edges, seg_cfg.extra_contrasts,
                                         seg_cfg.int8)
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
    patches = None
    # Patches only when the disc model will read them (its test needs a T1 reference, so T1 is in ``images``).
    if classify.disc_model_runs(meas, cfg.classification, fluid_role):
        from pipeline.disc_cnn import disc_patches

        patches = disc_patches(images, seg.labels, [int(v) for v in meas.values], reference.spacing, meas.reference)
    findings = classify.classify_study(meas, cfg.classification, fluid_role, single_slice=single_slice,
                                       body_model=seg_cfg.body_model, disc_patches=patches)
    warnings += list(getattr(meas, "warnings", []) or []) + list(findings.warnings)
    timings["classify"] = time.perf_counter() - t
    return StudyAnalysis(volumes=volumes, resampled=resampled, segmentation=seg, seg_method=seg_method,
                         measurements=meas, findings=findings, single_slice=single_slice, warnings=warnings,
                         qc_flags=qc_flags, timings=timings, disc_patches=patches, body_model=seg_cfg.body_model)


def process_study(task: StudyTask) -> StudyOutcome:
    """Analyse one study and write its one record. Never raises for a bad study (per-study isolation).

    A full output disk is no fault of the study: nothing is kept for it and the outcome says DISK_FULL, on which
    the batch stops (every later study would fail the same way).
    """
    start = time.perf_counter()
    done = already_done(task, task.config.hash())
    if done is not None:
        return done
    try:
        return _analyse_and_write(task, start)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        msg = f"the output disk is full ({os.strerror(exc.errno)}); nothing was kept for this study"
        log.error("study %s (%s): %s", task.key, task.public_folder, msg)
        return StudyOutcome(task.key, "failed", "DISK_FULL", msg, time.perf_counter() - start, task.public_folder,
                            n_files=task.n_files)


def _analyse_and_write(task: StudyTask, start: float) -> StudyOutcome:
    redact = task.redactor
    try:
        _test_hooks(task)
        report, artefacts = analyse_study(task)
        t = time.perf_counter()
        report = redact.walk(report)
        validate_report(report)

        def write(folder: Path) -> None:
            write_extra_outputs(folder, task, report, artefacts)
            report["qc"]["warnings"] = [redact.text(w) for w in report["qc"]["warnings"]]  # export failures
            report["timings_s"]["write"] = round(time.perf_counter() - t, 4)
            write_json_atomic(folder / "report.json", report)

        publish_study(task, write)
        secs = time.perf_counter() - start
        log.info("analysed study %s (%s) in %.2f s", task.key, task.public_folder, secs)
        return StudyOutcome(task.key, "analysed", seconds=secs, source_folder=task.public_folder,
                            timings=report["timings_s"], n_files=task.n_files)
    except StudyError as exc:
        msg = redact.text(exc.message)
        write_failure(task, exc.code, msg, exc.details)
        log.warning("study %s (%s) failed: %s: %s", task.key, task.public_folder, exc.code, msg)
        return StudyOutcome(task.key, "failed", exc.code, msg, time.perf_counter() - start, task.public_folder,
                            n_files=task.n_files)
    except MemoryError:
        limit = task.config.batch.worker_memory_mb
        msg = "ran out of memory while processing the study" + (
            f" (worker limit batch.worker_memory_mb = {limit} MiB)" if limit else "")
        write_failure(task, "OUT_OF_MEMORY", msg)
        return StudyOutcome(task.key, "failed", "OUT_OF_MEMORY", msg, time.perf_counter() - start, task.public_folder,
                            n_files=task.n_files)
    except Exception as exc:  # noqa: BLE001 - isolation: one bad study never stops the batch
        if is_disk_full(exc):
            raise
        tb = redact.text(traceback.format_exc())
        log.error("study %s (%s) hit an internal error:\n%s", task.key, task.public_folder, tb)
        msg = redact.text(f"unexpected {type(exc).__name__}: {exc}")[:500]
        write_failure(task, "INTERNAL_ERROR", msg, {"exception": type(exc).__name__})
        return StudyOutcome(task.key, "failed", "INTERNAL_ERROR", msg, time.perf_counter() - start, task.public_folder,
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
    elif crash == "sleep":  # hangs while its files are being written
        make_staging_dir(task.out_root, task.key)
        time.sleep(3600)
    elif crash == "allocate":  # asks for 8 GiB of address space (never touched: harmless without a limit)
        import numpy as np

        np.empty(8 << 30, np.uint8)  # allocated and dropped at once
    elif crash == "enospc":  # the output disk fills up: from now on every rename into OUT fails in this process
        import errno

        real_replace, out_root = os.replace, os.path.realpath(task.out_root)

        def full_disk_replace(src, dst, **kw):
            if os.path.realpath(dst).startswith(out_root):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real_replace(src, dst, **kw)

        os.replace = full_disk_replace


def write_extra_outputs(folder: Path, task: StudyTask, report: dict, artefacts: dict[str, Any]) -> None:
    """Masks, pictures and DICOM objects beside the report, into ``folder`` (the study's staging folder)."""
    from pipeline.report.study_outputs import write_study_outputs

    write_study_outputs(folder, report, artefacts, task.options)

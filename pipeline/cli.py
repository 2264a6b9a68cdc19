"""Command line: ``modicscan run | validate | phantom | segment | evaluate-segmentation | evaluate-findings |
evaluate-edema | summarize | bench``.

Exit codes (dcm2niix style, see README): 0 all studies analysed, 1 internal error, 2 usage or config
error (also: output folder read-only or in use by another run), 3 some or all studies failed (each has its
error.json), 4 no studies found, 5 the output disk filled up (the run stopped; rerun to resume), 130
interrupted.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.batch.run import (
    EXIT_DISK_FULL,
    EXIT_INTERNAL,
    EXIT_NO_STUDIES,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
)
from pipeline.errors import ConfigError, StudyError

log = logging.getLogger("modicscan")


def setup_logging(log_file: Path | None = None, verbose: bool = False) -> None:
    """Logs go to stderr and, for a run, to ``out/batch.log``."""
    logging.raiseExceptions = False  # a full disk must not print a logging traceback for every line
    log.handlers.clear()
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    err.setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.addHandler(err)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        fh.setLevel(logging.DEBUG if verbose else logging.INFO)
        log.addHandler(fh)


def _load_config(path: str | None, overrides: dict[str, dict]) -> object:
    from pipeline.config import config_from_dict, read_config_file

    raw: dict = read_config_file(path) if path else {}
    for section, values in overrides.items():
        sec = raw.setdefault(section, {}) or {}
        if not isinstance(sec, dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        sec.update(values)
        raw[section] = sec
    return config_from_dict(raw)


def _config_or_exit(path: str | None):
    """The config of a command that takes only ``--config``; a bad one exits 2 with one line."""
    try:
        return _load_config(path, {})
    except ConfigError as exc:
        click.echo(f"modicscan: config error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modicscan")
def main() -> None:
    """modicscan: lumbar spine MRI -> per-vertebra marrow edema and Modic type (research use only)."""


@main.command()
@click.argument("input_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (one sub-folder per study, named by a hashed study key).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (see configs/default.yaml); keys not given keep their defaults.")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=None, help="Worker processes (default: config batch.jobs).")
@click.option("--force", is_flag=True, help="Re-analyse studies whose report exists for the same input and config.")
@click.option("--pseudonymise", "pseudonymise_key", default=None, metavar="KEY",
              help="Replace patient and study identifiers with keyed hashes (HMAC-SHA256 under KEY), stable across runs.")
@click.option("--keep-identifiers", is_flag=True, help="Write original patient identifiers into the reports (off by default).")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="local: process pool on this machine; dask: a dask.distributed cluster (LocalCluster if no --dask-scheduler).")
@click.option("--dask-scheduler", default=None, metavar="tcp://HOST:PORT", help="Address of a running dask scheduler (implies --executor dask).")
@click.option("--shard", default=None, metavar="i/N", help="Only shard i of N (0-based), chosen by study key: for SLURM job arrays.")
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of external vertebral label images (NIfTI) to use instead of our segmentation.")
@click.option("--overlays", type=click.Choice(["all", "flagged", "none"]), default="flagged", show_default=True,
              help="Per-level QC pictures besides overview.png: for every level, flagged levels only, or none.")
@click.option("--zone-masks", is_flag=True, help="Also write the endplate / core zone label image per study.")
@click.option("--dicom-out", is_flag=True, help="Also write a DICOM SR (TID 1500) and a DICOM SEG per study.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def run(input_dir: Path, out_dir: Path, config_path: str | None, jobs: int | None, force: bool,
        pseudonymise_key: str | None, keep_identifiers: bool, executor: str, dask_scheduler: str | None,
        shard: str | None, masks_dir: Path | None, overlays: str, zone_masks: bool, dicom_out: bool,
        no_progress: bool, verbose: bool) -> None:
    """Analyse every study found under INPUT_DIR (any depth) and write reports to OUT."""
    from pipeline.batch.out_dir import OutputFolder, OutputFolderError
    from pipeline.batch.run import run_batch
    from pipeline.io.walk import shown

    overrides: dict[str, dict] = {}
    if pseudonymise_key is not None and not pseudonymise_key.strip():
        click.echo("modicscan: --pseudonymise needs a non-empty KEY (an empty one would silently write the default "
                   "identifiers)", err=True)
        sys.exit(EXIT_USAGE)
    if pseudonymise_key is not None:
        overrides.setdefault("report", {})["pseudonymise_key"] = pseudonymise_key
    if keep_identifiers:
        overrides.setdefault("report", {})["keep_identifiers"] = True
    if jobs is not None:
        overrides.setdefault("batch", {})["jobs"] = jobs
    try:
        cfg = _load_config(config_path, overrides)
        if cfg.report.pseudonymise_key and cfg.report.keep_identifiers:
            raise ConfigError("--pseudonymise and --keep-identifiers exclude each other")
    except ConfigError as exc:
        click.echo(f"modicscan: config error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    shard_ix = None
    if shard is not None:
        try:
            i, n = (int(x) for x in shard.split("/"))
            if n < 1 or not 0 <= i < n:
                raise ValueError
            shard_ix = (i, n)
        except ValueError:
            click.echo(f"modicscan: --shard must be i/N with 0 <= i < N, got {shard!r}", err=True)
            sys.exit(EXIT_USAGE)
    from pipeline.batch.executors import get_executor

    if dask_scheduler:
        executor = "dask"
    try:
        runner = get_executor(executor, dask_scheduler)
    except (ValueError, ImportError) as exc:
        click.echo(f"modicscan: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    options = {"masks_dir": str(masks_dir) if masks_dir else None, "overlays": overlays, "zone_masks": zone_masks,
               "dicom_out": dicom_out, "write_masks": True}
    try:
        # Before batch.log is opened: a read-only folder or another run's folder gets one line and exit 2.
        output = OutputFolder(out_dir.resolve(), shard_ix).acquire()
    except OutputFolderError as exc:
        click.echo(f"modicscan: {exc}", err=True)
        sys.exit(EXIT_DISK_FULL if exc.disk_full else EXIT_USAGE)
    try:
        setup_logging(out_dir / "batch.log", verbose)
        # the input folder is logged by run_batch once discovery knows the patients (their names are removed)
        log.info("modicscan %s: run -> %s (jobs=%d, executor %s, config %s)", __version__, shown(out_dir),
                 cfg.batch.jobs, executor, cfg.hash())
        result = run_batch(input_dir, out_dir, cfg, jobs=cfg.batch.jobs, force=force, progress=not no_progress,
                           options=options, executor=runner, shard=shard_ix, output=output)
    except StudyError as exc:  # the input as a whole was refused before any study (more than loading.max_files)
        log.error("%s", exc.message)
        click.echo(f"modicscan: {exc.message}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception:  # noqa: BLE001 - the batch machinery itself failed: exit 1 with the traceback in the log
        log.exception("internal error")
        sys.exit(EXIT_INTERNAL)
    finally:
        output.release()
    counts: dict[str, int] = {}
    for o in result.outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    click.echo(
        f"modicscan: {counts.get('analysed', 0)} analysed, {counts.get('failed', 0)} failed, "
        f"{counts.get('skipped', 0)} already done; details in {result.batch_json}",
        err=True,
    )
    if result.exit_code == EXIT_NO_STUDIES:
        # The input folder's name can carry a patient's name: with --pseudonymise no path is printed.
        where = "the input folder" if pseudonymise_key else input_dir
        click.echo(f"modicscan: no DICOM studies found under {where}", err=True)
    if result.disk_full:
        click.echo(f"modicscan: the disk of {out_dir} is full: the run stopped; every study folder written is "
                   "complete, the others are absent. Free some space and rerun the same command to resume.", err=True)
    sys.exit(result.exit_code)


@main.command()
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def validate(out_dir: Path) -> None:
    """Check every report.json / error.json under OUT_DIR against the shipped JSON Schemas."""
    from pipeline.report.schema import schema_errors

    paths = sorted(list(out_dir.rglob("report.json")) + list(out_dir.rglob("error.json")))
    if not paths:
        click.echo(f"no report.json or error.json under {out_dir}", err=True)
        sys.exit(EXIT_NO_STUDIES)
    bad = 0
    for p in paths:
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
            errs = schema_errors(obj)
        except ValueError as exc:
            errs = [f"not valid JSON: {exc}"]
        if errs:
            bad += 1
            click.echo(f"INVALID {p}")
            for e in errs[:10]:
                click.echo(f"    {e}")
        else:
            click.echo(f"ok      {p}")
    click.echo(f"{len(paths) - bad} of {len(paths)} records valid", err=True)
    sys.exit(EXIT_PARTIAL if bad else EXIT_OK)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Scenario / random seed.")
@click.option("--matrix", type=click.IntRange(32, 2048), default=256, show_default=True, help="In-plane matrix size.")
@click.option("--slices", "n_slices", type=click.IntRange(3, 512), default=15, show_default=True)
@click.option("--sample-set", is_flag=True, help="Regenerate exactly the committed sample_data/ set into OUT_DIR.")
def phantom(out_dir: Path, seed: int, matrix: int, n_slices: int, sample_set: bool) -> None:
    """Write a synthetic lumbar study (DICOM T1/T2/STIR + truth) with planted findings."""
    from pipeline import phantom as ph

    if sample_set:
        ph.make_sample_data(out_dir)
        click.echo(f"sample set written to {out_dir}")
        return
    truth = ph.make_study(out_dir, seed, matrix=matrix, n_slices=n_slices)
    click.echo(json.dumps({"study": truth.get("study_name", ""), "findings": truth.get("findings", [])}, indent=1))


@main.command()
@click.argument("input_path", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Label image to write (NIfTI, .nii.gz), on the input's grid.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None)
@click.option("--png", "png_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a QC picture (mid-sagittal slice, body outlines, level names) to this PNG file.")
def segment(input_path: Path, out_path: Path, config_path: str | None, png_path: Path | None) -> None:
    """Segment and label the vertebral bodies of one series (DICOM folder or NIfTI file)."""
    from pipeline.batch.segment_file import segment_path
    from pipeline.errors import StudyError

    # Checked before minutes of segmenting: nibabel only complains about the name when it comes to write.
    if not out_path.name.lower().endswith((".nii.gz", ".nii")):
        click.echo(f"modicscan: -o {out_path} must name a NIfTI file (.nii.gz or .nii); for a picture use --png",
                   err=True)
        sys.exit(EXIT_USAGE)
    if png_path is not None and not png_path.name.lower().endswith(".png"):
        click.echo(f"modicscan: --png {png_path} must name a .png file", err=True)
        sys.exit(EXIT_USAGE)
    cfg = _config_or_exit(config_path)
    try:
        seg = segment_path(input_path, out_path, cfg.segmentation, png_path=png_path)
    except StudyError as exc:
        click.echo(f"modicscan: {exc.code}: {exc.message}", err=True)
        sys.exit(EXIT_PARTIAL)
    click.echo(json.dumps({
        "output": str(out_path),
        **({"png": str(png_path)} if png_path is not None else {}),
        "bodies": [{"level": b.level, "value": b.value, "volume_mm3": round(b.volume_mm3, 1)} for b in seg.bodies],
        "labelling_confidence": seg.labelling_confidence,
        "flags": seg.flags,
    }, indent=1))


@main.command("evaluate-segmentation")
@click.argument("cases_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--no-png", is_flag=True, help="Skip the per-case PNGs.")
@click.option("--limit", type=click.IntRange(1, None), default=None, help="Only the first N cases.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None)
@click.option("--first-level", "first_level", multiple=True, metavar="SOURCE=LEVEL",
              help="Also score level names: SOURCE annotates consecutive bodies from LEVEL down "
                   "(e.g. --first-level vb2=T11 --first-level vb3=L1). Repeatable.")
@click.option("--fold", type=click.IntRange(0, 2), default=None,
              help="Only the cases of this fold of the 3-fold case split (train_segmenter / train_unet --fold).")
@click.option("--source", default=None, metavar="SOURCE",
              help="Only the cases of this source (leave-one-source-out: train_segmenter / train_unet --source).")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Pixel classifier (.joblib) instead of the shipped one.")
@click.option("--unet", "unet_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="U-Net (.onnx) instead of the shipped one.")
def evaluate_segmentation_cmd(cases_csv: Path, out_dir: Path, jobs: int, no_png: bool, limit: int | None,
                              config_path: str | None, first_level: tuple[str, ...], fold: int | None,
                              source: str | None, model_path: Path | None, unet_path: Path | None) -> None:
    """Per-body Dice / HD95 of our segmentation against expert masks listed in CASES_CSV."""
    from pipeline.evaluation.cases import check_source, read_cases
    from pipeline.evaluation.segmentation import check_level, evaluate_segmentation

    first_levels = {}
    for item in first_level:
        item_source, _, level = item.partition("=")
        try:
            if not item_source:
                raise ValueError("no SOURCE before '='")
            check_level(level)
        except ValueError as exc:
            click.echo(f"modicscan: --first-level expects SOURCE=LEVEL, got {item!r}: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        first_levels[item_source] = level
    cfg = _config_or_exit(config_path)
    if source is not None:
        try:
            check_source(read_cases(Path(cases_csv)), source)
        except ValueError as exc:
            click.echo(f"modicscan: --source: {exc}", err=True)
            sys.exit(EXIT_USAGE)
    summary = evaluate_segmentation(cases_csv, out_dir, jobs=jobs, cfg=cfg.segmentation, write_png=not no_png,
                                    limit=limit, first_levels=first_levels, fold=fold, source=source,
                                    model_path=model_path, unet_path=unet_path)
    click.echo(json.dumps(summary, indent=1))


@main.command("evaluate-findings")
@click.argument("cases_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--gradings", "gradings_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Expert gradings (case,ivd,modic; ivd counted from the bottom, 1 = L5-S1): adds the truth and "
                   "summary.json.")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--no-png", is_flag=True, help="Skip the PNGs of the cases where we disagree with the reader.")
@click.option("--limit", type=click.IntRange(1, None), default=None, help="Only the first N cases.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None)
def evaluate_findings_cmd(cases_csv: Path, out_dir: Path, gradings_csv: Path | None, jobs: int, no_png: bool,
                          limit: int | None, config_path: str | None) -> None:
    """Per-disc Modic findings of the NIfTI studies in CASES_CSV (case,t1,t2[,stir]), against gradings if given."""
    from pipeline.evaluation.findings import evaluate_findings

    cfg = _config_or_exit(config_path)
    try:
        summary = evaluate_findings(cases_csv, out_dir, gradings_csv=gradings_csv, jobs=jobs, cfg=cfg,
                                    write_png=not no_png, limit=limit)
    except (ValueError, KeyError, OSError) as exc:
        click.echo(f"modicscan: evaluate-findings: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(json.dumps(summary, indent=1))


@main.command("evaluate-edema")
@click.argument("cases_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: <case>_edema.nii.gz per case, per_case.csv, summary.json.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config; its 'edema' section sets the rule (see configs/default.yaml).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def evaluate_edema_cmd(cases_csv: Path, out_dir: Path, config_path: str | None, no_progress: bool) -> None:
    """Marrow-edema rule on STIR inside a bone region against readers' masks (CASES: case,stir,t1,bone_region[,edema_*])."""
    from pipeline.evaluation.edema import CasesError, evaluate_edema

    cfg = _config_or_exit(config_path)
    try:
        summary = evaluate_edema(cases_csv, out_dir, cfg.edema, progress=not no_progress)
    except (ConfigError, CasesError) as exc:
        click.echo(f"modicscan: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(json.dumps({k: v for k, v in summary.items() if k not in ("per_case", "config")}, indent=1))
    sys.exit(EXIT_PARTIAL if summary["n_failed"] else EXIT_OK)


@main.command()
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def summarize(out_dir: Path) -> None:
    """Rebuild the cohort outputs of OUT_DIR from its reports."""
    from pipeline.report.cohort import write_cohort

    path = write_cohort(out_dir)
    click.echo(f"wrote {path}")


# No click help option: `modicscan bench --help` reaches the benchmark's own parser, which lists its options.
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Speed / memory benchmark on generated phantoms (`modicscan bench --help` lists its options)."""
    from pipeline.bench import main as bench_main

    sys.exit(bench_main(list(ctx.args)))


if __name__ == "__main__":  # pragma: no cover
    main()

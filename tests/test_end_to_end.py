"""End to end: phantom studies in, validated reports out; planted findings found at the right level."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.report.schema import schema_errors

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    res = CliRunner().invoke(main, ["run", str(SAMPLE), "-o", str(out), "--no-progress"], catch_exceptions=False)
    return res, out


def _reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/report.json"))]


def _truth() -> dict[str, dict]:
    """Study UID -> truth findings of every committed sample study."""
    out = {}
    for f in sorted(SAMPLE.glob("*/truth/findings.json")):
        t = json.loads(f.read_text())
        out[t["study_uid"]] = t
    return out


def test_sample_run_exits_zero_and_writes_valid_reports(sample_run):
    res, out = sample_run
    assert res.exit_code == 0, res.output
    reports = _reports(out)
    assert len(reports) == len(_truth()) >= 4
    for rep in reports:
        assert schema_errors(rep) == []
        assert "not a medical device" in rep["disclaimer"]
    batch = json.loads((out / "batch.json").read_text())
    assert batch["counts"] == {"analysed": len(reports)}
    assert batch["finished"] and batch["exit_code"] == 0
    assert (out / "cohort.csv").read_text().count("\n") == 1 + sum(2 * len(r["vertebrae"]) for r in reports)
    import pandas as pd

    assert len(pd.read_parquet(out / "cohort.parquet")) == sum(2 * len(r["vertebrae"]) for r in reports)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_studies"] == len(reports) and summary["studies_with_any_modic_pct"] is not None
    runner = CliRunner().invoke(main, ["validate", str(out)])
    assert runner.exit_code == 0, runner.output


def _endplate_cases():
    """Every (study, level, endplate) of the committed sample with its planted Modic type ("0" = none)."""
    cases = []
    for f in sorted(SAMPLE.glob("*/truth/findings.json")):
        t = json.loads(f.read_text())
        for lv, tv in t["vertebrae"].items():
            if lv not in ("L1", "L2", "L3", "L4", "L5", "S1"):
                continue
            for side in ("superior", "inferior"):
                if lv == "S1" and side == "inferior":
                    continue  # fused sacrum: not a free endplate
                cases.append((t["study_name"], lv, side, tv["endplates"][side]["modic"]))
    return cases


# Known misses of the current segmenter, (study, level, endplate) -> why, kept visible as strict expected
# failures (the test fails once they are fixed, so the list is updated). Empty since the 2026-11-26 model fixed
# the last one (seed 1's S1 read as I/II; the earlier seed-3 S1 leak was fixed before).
KNOWN_GAPS: dict[tuple[str, str, str], str] = {}


def test_sample_reports_equal_the_golden_reports(sample_run):
    """Refactorings leave every report on sample_data/ unchanged (tests/report_compare.py says how to regenerate the
    golden reports when a change is meant to change them)."""
    from report_compare import compare_with_golden

    _, out = sample_run
    assert compare_with_golden(out) == []


def test_report_comparison_sees_a_changed_value(tmp_path):
    from report_compare import GOLDEN, compare_with_golden

    golden = sorted(GOLDEN.glob("*.json"))
    assert len(golden) == len(list(SAMPLE.glob("phantom_seed*")))
    for path in golden:  # a run that equals the golden reports but for one endplate ratio
        report = json.loads(path.read_text())
        (tmp_path / path.stem).mkdir()
        if path == golden[0]:
            report["vertebrae"][0]["heights_mm"] = "changed"
        (tmp_path / path.stem / "report.json").write_text(json.dumps(report))
    diffs = compare_with_golden(tmp_path)
    assert len(diffs) == 1 and "heights_mm" in diffs[0] and golden[0].stem in diffs[0]


@pytest.mark.parametrize("study,level,side,expected", [
    pytest.param(*c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[c[:3]])) if c[:3] in KNOWN_GAPS else c
    for c in _endplate_cases()
], ids=lambda v: str(v))
def test_sample_run_types_every_endplate_like_the_planted_truth(sample_run, study, level, side, expected):
    _, out = sample_run
    truth = {t["study_name"]: uid for uid, t in _truth().items()}
    rep = next(r for r in _reports(out) if r["study"]["study_uid"] == truth[study])
    found = {v["level"]: v for v in rep["vertebrae"]}
    assert level in found, f"{study}: level {level} not found ({list(found)})"
    assert found[level]["endplates"][side]["modic_type"] == expected


def test_sample_run_finds_all_levels_planted_edema_and_flags(sample_run):
    _, out = sample_run
    truth = _truth()
    n_flags = 0
    for rep in _reports(out):
        t = truth[rep["study"]["study_uid"]]
        found = {v["level"]: v for v in rep["vertebrae"]}
        for lv in ("L1", "L2", "L3", "L4", "L5", "S1"):
            assert lv in found, f"{t['study_name']}: level {lv} not found ({list(found)})"
        for lv, tv in t["vertebrae"].items():
            if tv.get("whole_body_edema"):
                assert found[lv]["edema"]["present"], f"{t['study_name']} {lv}: planted edema not found"
        want = {(f["flag"], f["level"]) for f in t["pattern_flags"]}
        got = {(f["code"], lv) for f in rep["flags"] for lv in f["levels"]}
        assert want == got, f"{t['study_name']}: flags expected {want}, got {got}"
        n_flags += len(want)
    assert n_flags >= 1  # the sample plants at least one pattern (the L1 wedge fracture)


def test_rerun_resumes_and_force_recomputes(sample_run, tmp_path):
    _, out = sample_run
    res = CliRunner().invoke(main, ["run", str(SAMPLE), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0
    batch = json.loads((out / "batch.json").read_text())
    assert batch["counts"] == {"skipped": len(_truth())}


def test_a_report_of_another_schema_version_is_redone_on_resume(sample_run, tmp_path):
    """Resume keeps a study's report only when it was written under the current schema version: the fields of an
    older one may mean something else (1.2.0: edema over the body's interior)."""
    from pipeline.report.schema import SCHEMA_VERSION

    _, out = sample_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    old = sorted(copy.glob("*/report.json"))[0]
    report = json.loads(old.read_text())
    assert report["schema_version"] == SCHEMA_VERSION
    report["schema_version"] = "1.1.0"
    old.write_text(json.dumps(report))
    res = CliRunner().invoke(main, ["run", str(SAMPLE), "-o", str(copy), "--no-progress"])
    assert res.exit_code == 0, res.output
    batch = json.loads((copy / "batch.json").read_text())
    assert batch["counts"] == {"skipped": len(_truth()) - 1, "analysed": 1}
    assert json.loads(old.read_text())["schema_version"] == SCHEMA_VERSION


def _copy_study(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "DICOM", dst / "DICOM")
    return dst


def test_bad_studies_fail_alone_with_reasons_and_exit_partial(tmp_path):
    from pipeline import phantom

    batch_in = tmp_path / "in"
    _copy_study(SAMPLE / "phantom_seed0003", batch_in / "good")
    # a study without T1, and an axial-only study, from the phantom generator
    phantom.make_study(tmp_path / "gen", 11, series=("T2", "STIR"), matrix=128, study_name="no_t1")
    phantom.make_study(tmp_path / "gen", 12, orientation="axial", matrix=128, study_name="axial")
    _copy_study(tmp_path / "gen" / "no_t1", batch_in / "no_t1")
    _copy_study(tmp_path / "gen" / "axial", batch_in / "axial")
    # a folder holding only a corrupt (truncated) file and a text file
    bad = batch_in / "corrupt"
    bad.mkdir()
    some = sorted((SAMPLE / "phantom_seed0000" / "DICOM").rglob("*.dcm"))[0]
    (bad / "IM_0001.dcm").write_bytes(some.read_bytes()[:300])
    (bad / "notes.txt").write_text("not an image")

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(batch_in), "-o", str(out), "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 3, res.output
    batch = json.loads((out / "batch.json").read_text())
    by_folder = {s["source_folder"].split("/")[0]: s for s in batch["studies"]}
    assert by_folder["good"]["status"] == "analysed"
    assert by_folder["no_t1"]["code"] == "NO_SAGITTAL_T1"
    assert by_folder["axial"]["code"] == "NO_SAGITTAL_SERIES"
    assert by_folder["corrupt"]["code"] == "NO_DICOM_FILES"
    for s in batch["studies"]:
        if s["status"] == "failed":
            assert len(s["message"]) > 20
    # each failed study has exactly one record: error.json, valid; the good one has report.json only
    for s in batch["studies"]:
        folder = out / s["key"]
        if s["status"] == "analysed":
            assert (folder / "report.json").exists() and not (folder / "error.json").exists()
        elif not s["source_folder"].startswith("corrupt"):
            err = json.loads((folder / "error.json").read_text())
            assert schema_errors(err) == [] and err["error"]["code"] == s["code"]
            assert not (folder / "report.json").exists()
    assert not list(out.rglob("*.tmp"))


def test_external_masks_replace_our_segmentation_and_find_every_planted_type(tmp_path):
    """With the expert (here: phantom truth) masks plugged in via --masks, every planted type is found."""
    from pipeline.report.identity import study_key

    src = SAMPLE / "phantom_seed0002"
    t = json.loads((src / "truth" / "findings.json").read_text())
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(src / "truth" / "labels.nii.gz", masks / f"{study_key(t['study_uid'])}.nii.gz")
    inp = _copy_study(src, tmp_path / "in" / "s")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(inp.parent), "-o", str(out), "--no-progress", "--masks", str(masks),
                                    "--zone-masks"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (rep,) = _reports(out)
    assert rep["segmentation"]["method"].startswith("external")
    found = {v["level"]: v for v in rep["vertebrae"]}
    for lv, tv in t["vertebrae"].items():
        if lv in ("L1", "L2", "L3", "L4", "L5"):
            for side in ("superior", "inferior"):
                assert found[lv]["endplates"][side]["modic_type"] == tv["endplates"][side]["modic"], (lv, side)
    assert {(f["code"], tuple(f["levels"])) for f in rep["flags"]} == {("POSSIBLE_ACUTE_FRACTURE", ("L1",))}
    import nibabel as nib
    import numpy as np

    folder = out / rep["study"]["key"]
    zones = np.asarray(nib.load(folder / "zones.nii.gz").dataobj)
    labels = np.asarray(nib.load(folder / "vertebrae.nii.gz").dataobj)
    assert set(np.unique(zones[zones > 0] // 10)) <= set(np.unique(labels[labels > 0]))
    assert (labels[zones > 0] == zones[zones > 0] // 10).all()
    assert (folder / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_external_mask_is_a_clear_per_study_error(tmp_path):
    inp = _copy_study(SAMPLE / "phantom_seed0003", tmp_path / "in" / "s")
    (tmp_path / "masks").mkdir()
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(inp.parent), "-o", str(out), "--no-progress", "--masks",
                                    str(tmp_path / "masks")], catch_exceptions=False)
    assert res.exit_code == 3
    (s,) = json.loads((out / "batch.json").read_text())["studies"]
    assert s["code"] == "EXTERNAL_MASK_MISSING"

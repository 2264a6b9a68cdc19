"""The bad-input corpus (tests/corpus.py) through one batch: the documented outcome per case, never a crash.

The table of outcomes is docs/bad_input.md; tests/corpus.py holds the same expectations in code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from corpus import (
    ANALYSED,
    CASES,
    assert_no_temp_files,
    assert_one_complete_record,
    build_corpus,
    strict_json,
)

from pipeline.batch.run import run_batch
from pipeline.config import Config
from pipeline.errors import REASON_CODES


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    build_corpus(root / "in")
    result = run_batch(root / "in", root / "out", Config(), jobs=2, progress=False)
    batch = strict_json(result.batch_json)
    by_case: dict[str, list[dict]] = {}
    for s in batch["studies"]:
        by_case.setdefault(s["source_folder"].split("/")[0], []).append(s)
    return root / "out", result, batch, by_case


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_has_documented_outcome(corpus_run, case):
    out, _, _, by_case = corpus_run
    studies = by_case.get(case.name, [])
    assert len(studies) == len(case.expect), f"{case.name}: expected {len(case.expect)} record(s), got {studies}"
    got = sorted(ANALYSED if s["status"] == "analysed" else s["code"] for s in studies)
    for label, allowed in zip(got, sorted(case.expect, key=sorted), strict=True):
        assert label in allowed, f"{case.name} ({case.description}): got {label}, documented {sorted(allowed)}: {studies}"
    for s in studies:
        if s["status"] == "failed":
            # A researcher must be able to act on the message: a sentence, not a bare code or an exception repr.
            assert s["code"] in REASON_CODES and s["code"] != "INTERNAL_ERROR"
            assert len(s["message"]) > 20 and "Traceback" not in s["message"]


def test_no_internal_error_and_exit_code_partial(corpus_run):
    _, result, batch, _ = corpus_run
    codes = [s["code"] for s in batch["studies"]]
    assert "INTERNAL_ERROR" not in codes and "WORKER_CRASHED" not in codes
    assert result.exit_code == 3  # some studies failed, none crashed
    assert batch["finished"] is True and batch["exit_code"] == 3
    assert sum(batch["counts"].values()) == len(batch["studies"]) == sum(len(c.expect) for c in CASES)


def test_exactly_one_complete_record_per_study_and_no_temp_files(corpus_run):
    out, _, batch, _ = corpus_run
    for s in batch["studies"]:
        assert_one_complete_record(out, s)
    assert_no_temp_files(out)


def test_unusable_files_are_listed_with_their_reason(corpus_run):
    _, _, batch, _ = corpus_run
    reasons = {Path(s["path"]).name: s["reason"] for s in batch["skipped_files"]
               if s["path"].startswith(("junk_only", "junk_beside_study"))}
    assert reasons.get("empty.dcm") == "EMPTY_FILE"
    assert reasons.get("scan.png") == reasons.get("notes.txt") == "NOT_DICOM"
    dup = [s for s in batch["skipped_files"] if s["path"].startswith("duplicate_instances")]
    assert len(dup) == 3 and {s["reason"] for s in dup} == {"DUPLICATE_INSTANCE"}


def test_zero_reference_gives_undefined_ratios_not_nan(corpus_run):
    out, _, _, by_case = corpus_run
    (study,) = by_case["zero_reference"]
    assert study["status"] == "analysed"
    rep = strict_json(out / study["key"] / "report.json")
    assert rep["reference_marrow"]["T1"] is None
    assert any("reference" in w for w in rep["qc"]["warnings"])
    # Every number in the report is finite (None where a ratio is undefined).
    def walk(v):
        if isinstance(v, float):
            assert math.isfinite(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(rep)


def test_lower_confidence_when_the_study_is_degraded(corpus_run):
    out, _, _, by_case = corpus_run
    conf = {name: strict_json(out / by_case[name][0]["key"] / "report.json")["confidence"]["overall"]
            for name in ("baseline", "zero_reference")}
    assert conf["zero_reference"] < conf["baseline"]

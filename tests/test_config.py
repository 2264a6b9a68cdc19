"""Config: the YAML mirrors the defaults, every key is documented, bad values stop the run before any study."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_equals_builtin_defaults_and_documents_every_key():
    assert load_config(REPO / "configs" / "default.yaml") == Config()
    text = (REPO / "configs" / "default.yaml").read_text()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no doc"
            line = re.search(rf"^\s+{f.name}:.*$", text, re.M)
            assert line and "#" in line.group(0), f"{section.name}.{f.name} is not commented in default.yaml"


@pytest.mark.parametrize("yaml_text,needle", [
    ("classification:\n  t1_lowww: 0.7\n", "classification.t1_lowww"),
    ("classification:\n  t1_low: high\n", "classification.t1_low"),
    ("classification:\n  t1_low: 7.0\n", "out of range"),
    ("colour: red\n", "unknown config section 'colour'"),
    ("roles: [1, 2]\n", "roles"),
    ("batch:\n  jobs: 1.5\n", "batch.jobs"),
])
def test_bad_config_stops_before_any_study_with_one_clear_message(tmp_path, yaml_text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(REPO / "sample_data"), "-o", str(out), "--config", str(cfg)])
    assert res.exit_code == 2
    assert needle in res.output
    assert not out.exists() or not any(out.iterdir())


def test_usage_errors_exit_2_and_empty_input_exits_4(tmp_path):
    assert CliRunner().invoke(main, ["run", str(tmp_path), "-o", str(tmp_path / "o"), "--shard", "3/2"]).exit_code == 2
    assert CliRunner().invoke(main, ["run", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]).exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["run", str(empty), "-o", str(tmp_path / "o2"), "--no-progress"])
    assert res.exit_code == 4


def test_evaluate_segmentation_rejects_a_malformed_first_level(tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text("case,image,labels,source\n")
    for bad in ("vb3", "vb3=L6", "=L1"):
        res = CliRunner().invoke(main, ["evaluate-segmentation", str(cases), "-o", str(tmp_path / "o"), "--first-level", bad])
        assert res.exit_code == 2 and "SOURCE=LEVEL" in res.output, (bad, res.output)


def test_evaluate_segmentation_refuses_a_source_no_case_has_before_any_work(tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text("case,image,labels\nvb1-01,missing.nii.gz,missing_labels.nii.gz\n")
    res = CliRunner().invoke(main, ["evaluate-segmentation", str(cases), "-o", str(tmp_path / "o"), "--source", "vb9"])
    assert res.exit_code == 2 and "vb9" in res.output and "vb1" in res.output, res.output
    assert not (tmp_path / "o").exists()
    # --first-level names a source too: it must not take --source's place (it did: vb1 LOSO scored vb3's cases)
    res = CliRunner().invoke(main, ["evaluate-segmentation", str(cases), "-o", str(tmp_path / "o"), "--source", "vb9",
                                    "--first-level", "vb1=L1"])
    assert res.exit_code == 2 and "'vb9'" in res.output, res.output


def test_evaluate_segmentation_source_with_first_levels_scores_only_that_source(tmp_path, monkeypatch):
    from pipeline.evaluation import segmentation as evaluate

    cases = tmp_path / "cases.csv"
    cases.write_text("case,image,labels\nvb1-01,a.nii.gz,a_l.nii.gz\nvb3-01,b.nii.gz,b_l.nii.gz\n")
    seen = {}

    def fake_rows(rows, out_dir, **kw):
        seen["cases"], seen["first_levels"] = [r["case"] for r in rows], kw["first_levels"]
        return {"mean_body_dice": 0.0}

    monkeypatch.setattr(evaluate, "evaluate_rows", fake_rows)
    res = CliRunner().invoke(main, ["evaluate-segmentation", str(cases), "-o", str(tmp_path / "o"), "--source", "vb1",
                                    "--first-level", "vb3=L1"])
    assert res.exit_code == 0, res.output
    assert seen == {"cases": ["vb1-01"], "first_levels": {"vb3": "L1"}}

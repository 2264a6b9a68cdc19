"""`modicscan evaluate-findings` (issue 28, item 3): disc counting, metrics, outputs, bad input, real-data floor."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SHARED_DATA
from test_nifti_study import phantom_slices

from pipeline.cli import main
from pipeline.evaluation.findings import discs_from_bottom, presence_metrics, read_cases, read_gradings

SPIDER = SHARED_DATA / "modic-spider"


def test_discs_are_counted_from_s1_or_else_from_the_lowest_body():
    assert discs_from_bottom(["T12", "L1", "L2", "L3", "L4", "L5", "S1"]) == (6, "S1")
    assert discs_from_bottom(["L3", "L4", "L5", "S1", "B5"]) == (3, "S1")  # a piece below S1 does not count
    assert discs_from_bottom(["B1", "B2", "B3", "B4"]) == (3, "lowest body")


def test_presence_metrics_match_hand_counts():
    # reader: 4 positives (types 2, 2, 1, 3), 4 negatives; ours: 3 of the positives, 1 false positive
    truth = [2, 2, 1, 3, 0, 0, 0, 0]
    pred = [2, 3, 0, 2, 1, 0, 0, 0]
    m = presence_metrics(truth, pred, score=[0.9, 0.8, 0.1, 0.7, 0.6, 0.2, 0.05, 0.0])
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    # kappa: p_o = 6/8, p_e = (4*4 + 4*4) / 64 = 0.5 -> (0.75 - 0.5) / 0.5
    assert m["kappa"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    # AUC: of the 16 positive-negative pairs, the positive scores higher in 14 (0.1 < 0.6 and 0.1 < 0.2)
    assert m["auc_score"] == pytest.approx(14 / 16)


def test_bad_cases_and_gradings_files_are_rejected(tmp_path):
    bad = tmp_path / "cases.csv"
    bad.write_text("case,t2\nA,a.nii.gz\n")
    with pytest.raises(ValueError, match="t1"):
        read_cases(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("case,t1,t2\nA,a,b\nA,c,d\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_cases(dup)
    grad = tmp_path / "g.csv"
    grad.write_text("case,ivd,modic\nA,1,5\n")
    with pytest.raises(ValueError, match="0-3"):
        read_gradings(grad)
    res = CliRunner().invoke(main, ["evaluate-findings", str(bad), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "t1" in res.output
    assert not (tmp_path / "out" / "summary.json").exists()


def test_evaluate_findings_on_phantom_slices(tmp_path):
    """Two single-slice phantom studies (paths relative to the CSV), gradings from the planted truth, one
    disc graded wrong on purpose so that a disagreement PNG must appear, one case whose T2 is missing."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for seed in (1, 3):
        paths = phantom_slices(seed, data)
        rows.append(f"s{seed},data/{Path(paths['T1']).name},data/{Path(paths['T2']).name}")
    rows.append("broken,data/seed1_T1.nii.gz,data/absent.nii.gz")
    cases = tmp_path / "cases.csv"
    cases.write_text("case,t1,t2\n" + "\n".join(rows) + "\n")
    # seed 1: Modic II at L5-S1 (ivd 1), nothing above; seed 3: no finding, but we claim Modic II at ivd 3
    grades = ["case,ivd,modic"] + [f"s1,{i},{2 if i == 1 else 0}" for i in range(1, 7)] + \
             [f"s3,{i},{2 if i == 3 else 0}" for i in range(1, 7)]
    gradings = tmp_path / "gradings.csv"
    gradings.write_text("\n".join(grades) + "\n")
    out = tmp_path / "out"
    # the phantoms' planted truth checks the threshold rules' disc call (the default disc model is trained on real
    # gradings, not tuned to phantoms: tests/test_nifti_study.py)
    thresholds = tmp_path / "thresholds.yaml"
    thresholds.write_text("classification:\n  disc_model: thresholds\n")
    res = CliRunner().invoke(main, ["evaluate-findings", str(cases), "--gradings", str(gradings), "-o", str(out),
                                    "--config", str(thresholds)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with open(out / "per_disc.csv", newline="") as fh:
        per_disc = list(csv.DictReader(fh))
    assert {"case", "ivd", "level", "modic_type", "modic_score", "truth_modic"} <= set(per_disc[0])
    s1 = {int(r["ivd"]): r for r in per_disc if r["case"] == "s1"}
    assert s1[1]["level"] == "L5-S1" and s1[1]["modic_type"] == "II" and s1[1]["truth_modic"] == "2"
    assert s1[5]["level"] == "L1-L2"
    assert all(0.0 <= float(r["modic_score"]) <= 1.0 for r in per_disc if r["found"] == "True")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"]["failed"] == 1 and "NO_SAGITTAL_T2" in summary["cases"]["failures"]["broken"]
    assert summary["presence"]["n"] == 12 and summary["n_graded_discs_found"] == 12
    assert summary["cases"]["disc_count_matches_readers"] == 2
    assert (out / "s3.png").is_file()  # the reader's (planted) Modic at s3 ivd 3 is not ours
    assert set(summary["by_level"]) == {f"ivd{i}" for i in range(1, 7)}


def test_evaluate_findings_on_real_spider_slices_meets_a_floor(tmp_path):
    """Real data: 16 SPIDER patients (one mid-sagittal T1 + T2 slice each), per-disc Modic gradings."""
    if not (SPIDER / "cases.csv").is_file():
        pytest.skip(f"real data not available: {SPIDER} is absent (see README, 'Real data')")
    rows = list(csv.DictReader(open(SPIDER / "cases.csv", newline="")))[:16]
    cases = tmp_path / "cases.csv"
    with open(cases, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "t1", "t2"])
        for r in rows:
            w.writerow([r["case"], str(SPIDER / r["t1"]), str(SPIDER / r["t2"])])
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["evaluate-findings", str(cases), "--gradings", str(SPIDER / "gradings.csv"),
                                    "-o", str(out), "--jobs", "2", "--no-png"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    # floors a little under what this subset gives today (README: figures over all 92): they catch a broken
    # disc count, alignment or classification, not small changes
    assert summary["cases"]["analysed"] >= 14
    assert summary["n_graded_discs_found"] >= 0.75 * summary["n_graded_discs"]
    assert summary["presence"]["balanced_accuracy"] >= FLOOR_BA
    assert summary["presence"]["auc_score"] >= FLOOR_AUC
    assert summary["presence"]["kappa"] >= FLOOR_KAPPA


# With the shipped disc model (classification.disc_model: model) this subset gives BA 0.782, kappa 0.598, AUC 0.788
# over its 112 graded discs - in-sample: these 16 patients are among the 92 the model was trained on, so the
# floors sit well under it, near what patients the model did not see get (5-fold CV over patients, all graded
# discs: BA 0.65, kappa 0.31; README). The threshold rules gave BA 0.576, AUC 0.629 here.
FLOOR_BA = 0.68
FLOOR_AUC = 0.70
FLOOR_KAPPA = 0.35

"""The benchmark command runs end to end on tiny phantoms and reports what the issue asks for (not how fast)."""

from __future__ import annotations

import json

from pipeline.bench import format_table, main


def test_bench_reports_stages_ratio_workers_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["--studies", "2", "--slices", "8", "--matrix", "64", "--scales", "1,2", "--jobs", "1,2",
               "--memory-studies", "3", "--json-out", str(out), "--workdir", str(tmp_path / "wd")])
    assert rc == 0
    res = json.loads(out.read_text())
    first, second = res["sizes"]
    assert (first["slices"], first["matrix"], second["slices"], second["matrix"]) == (8, 64, 16, 128)
    assert [r["jobs"] for r in first["runs"]] == [1, 2] and [r["jobs"] for r in second["runs"]] == [1]
    for size in res["sizes"]:
        assert size["pydicom_load_s"]["median"] > 0
        for run in size["runs"]:
            assert run["analysed"] == 2 and run["exit_code"] == 0
            assert set(run["stages_s"]) >= {"discover", "load", "segment", "measure", "classify", "write"}
            assert run["stages_s"]["segment"]["median"] > 0
            # the ratio is the per-study median over the pydicom median, not a constant
            assert abs(run["ratio_to_pydicom_load"] - run["per_study_s"]["median"] / size["pydicom_load_s"]["median"]) < 0.05 * run["ratio_to_pydicom_load"] + 0.01
            assert run["peak_rss_mib"] > 50 and run["steady_studies_per_minute"] > 0
    assert "steady_throughput_vs_first" in first["runs"][1]
    mem = res["memory"]
    assert mem["n_studies"] == 3 and mem["rss_mib_max"] >= mem["rss_mib_first"] > 0
    table = format_table(res)
    assert "jobs=2" in table and "steady state" in table and "memory over 3 studies" in table


def test_bench_runs_the_pipeline_with_the_config_it_is_given(tmp_path):
    cfg = tmp_path / "onepass.yaml"
    cfg.write_text("segmentation:\n  body_model: onepass\n")
    out = tmp_path / "bench.json"
    rc = main(["--studies", "1", "--slices", "8", "--matrix", "64", "--scales", "1", "--jobs", "1",
               "--json-out", str(out), "--workdir", str(tmp_path / "wd"), "--config", str(cfg)])
    assert rc == 0 and json.loads(out.read_text())["config"] == str(cfg)
    (report,) = (tmp_path / "wd").glob("out_*/*/report.json")
    assert json.loads(report.read_text())["config"]["values"]["segmentation"]["body_model"] == "onepass"

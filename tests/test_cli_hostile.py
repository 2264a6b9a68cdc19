"""Hostile configs and CLI corners (issue 30): each stops with exit 2 and one short line, before any work."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.colors import to_rgb

from pipeline.cli import main
from pipeline.config import read_config_file

REPO = Path(__file__).resolve().parents[1]
SAMPLE_STUDY = REPO / "sample_data" / "phantom_seed0000" / "DICOM"


def _billion_laughs(levels: int = 9) -> str:
    """~360 bytes of YAML whose value expands into 9**9 (387 million) list items, inside a known key."""
    lines = ["batch:", "  jobs: [&a [x, x, x, x, x, x, x, x, x],"]
    prev = "a"
    for name in "bcdefghi"[: levels - 1]:
        lines.append(f"         &{name} [{', '.join(['*' + prev] * 9)}],")
        prev = name
    lines.append(f"         *{prev}]")
    return "\n".join(lines) + "\n"


HOSTILE = {
    "nan_threshold": ("classification:\n  t1_low: .nan\n", "not a finite number"),
    "inf_threshold": ("classification:\n  fluid_high: .inf\n", "classification.fluid_high"),
    "nan_timeout": ("batch:\n  study_timeout_s: .nan\n", "not a finite number"),
    "inf_timeout": ("batch:\n  study_timeout_s: .inf\n", "batch.study_timeout_s"),
    "alias_bomb": (_billion_laughs(), "anchors and aliases"),
    "one_alias": ("classification:\n  t1_low: &v 0.7\n  t2_low: *v\n", "anchors and aliases"),
    "deep_nesting": ("batch: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    "latin1": ("# Müller\nbatch:\n  jobs: 1\n".encode("latin-1"), "not UTF-8"),
    "huge": ("# " + "x" * (2 << 20) + "\n", "larger than"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_config_exits_2_with_one_short_line_quickly(tmp_path, name):
    content, needle = HOSTILE[name]
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    out = tmp_path / "out"
    # Its own process with 2 GiB of address space: an expanded bomb must fail the test, not the machine.
    limit = 2 << 30
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(SAMPLE_STUDY), "-o", str(out), "--config",
                          str(cfg)], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 300 and needle in lines[0], res.stderr[-2000:]
    assert time.monotonic() - start < 30
    assert not out.exists() or not any(out.iterdir())


def test_config_reader_refuses_aliases_before_expanding_them(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_billion_laughs())
    start = time.monotonic()
    with pytest.raises(Exception, match="anchors and aliases"):
        read_config_file(cfg)
    assert time.monotonic() - start < 1.0


def test_an_empty_pseudonymisation_key_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["run", str(SAMPLE_STUDY), "-o", str(tmp_path / "out"), "--pseudonymise="])
    assert res.exit_code == 2 and "--pseudonymise needs a non-empty KEY" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_segment_refuses_a_non_nifti_output_name_before_segmenting(tmp_path, monkeypatch):
    from pipeline.batch import segment_file

    def must_not_run(*args, **kwargs):
        raise AssertionError("segmented although the output name is unusable")

    monkeypatch.setattr(segment_file, "segment_path", must_not_run)
    res = CliRunner().invoke(main, ["segment", str(SAMPLE_STUDY / "SE003"), "-o", str(tmp_path / "seg.png")])
    assert res.exit_code == 2 and ".nii.gz" in res.output and "Traceback" not in res.output, res.output
    res = CliRunner().invoke(main, ["segment", str(SAMPLE_STUDY / "SE003"), "-o", str(tmp_path / "seg.nii.gz"),
                                    "--png", str(tmp_path / "qc.jpg")])
    assert res.exit_code == 2 and ".png" in res.output, res.output


def test_bench_help_lists_its_options():
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0
    for option in ("--studies", "--slices", "--matrix", "--jobs", "--json-out"):
        assert option in res.stdout, res.stdout


def test_evaluate_segmentation_shows_progress(tmp_path, monkeypatch, capsys):
    from pipeline.evaluation import segmentation as evaluate

    def fake_case(args):
        row = args[0]
        return {"case": row["case"], "source": row["source"], "seconds": 0.01, "bodies": [], "extra": 0, "error": None,
                "flags": [], "labelling_confidence": None, "notes": []}

    monkeypatch.setattr(evaluate, "_eval_case", fake_case)
    rows = [{"case": f"vb1-0{i}", "source": "vb1"} for i in range(3)]
    evaluate.evaluate_rows(rows, tmp_path / "o", write_png=False)
    err = capsys.readouterr().err
    assert "evaluate-segmentation" in err and "3/3" in err, err


# ---------------------------------------------------------------------------------------------- overlays
def _tiny_study():
    """Three bodies on a 3-slice grid: L1, a flagged L2 and an unnamed B1; every voxel Modic-coloured nowhere."""
    from pipeline.types import Segmentation, VertebralBody, Volume

    labels = np.zeros((60, 40, 3), np.int16)
    bodies = []
    for i, (level, value) in enumerate((("L1", 1), ("L2", 2), ("B1", 101))):
        labels[5 + 18 * i: 17 + 18 * i, 10:30, :] = value
        bodies.append(VertebralBody(level, value, (11.0 + 18 * i, 20.0, 1.0), 1000.0))
    rng = np.random.default_rng(0)
    vols = {role: Volume(data=rng.random((60, 40, 3)).astype(np.float32), affine=np.eye(4), series_uid=role,
                         meta={"series_description": "sag Müller^Zoë PID-77", "series_number": n})
            for n, role in enumerate(("T1", "T2", "STIR"), 2)}

    class Findings:
        class_map = np.zeros((60, 40, 3), np.int8)

    seg = Segmentation(labels=labels, bodies=bodies, labelling_confidence=0.4, flags=[])
    report = {"flags": [{"code": "POSSIBLE_ACUTE_FRACTURE", "levels": ["L2"], "message": "m"}]}
    return report, {"volumes": vols, "segmentation": seg, "findings": Findings()}


def test_level_names_do_not_take_modic_colours_and_panel_titles_hold_no_description():
    from pipeline.report import overlays

    report, artefacts = _tiny_study()
    panels, texts = overlays._study_panels(report, artefacts, 1)
    modic = [np.array(c) for c in overlays.MODIC_COLOURS.values()]
    by_name = {text: np.array(to_rgb(colour)) for _, _, text, colour in texts}
    assert set(by_name) == {"L1", "L2 !", "B1"}
    for name, colour in by_name.items():  # red / yellow text read as Modic I / II
        assert min(np.abs(colour - m).sum() for m in modic) > 0.5, (name, colour)
    assert not np.allclose(by_name["L2 !"], by_name["L1"])  # the flagged name stands out
    titles = [title for title, _ in panels]
    assert titles == ["T1 (series 2)", "T2 (series 3)", "STIR (series 4)"]


def test_the_legend_explains_unnamed_bodies():
    from pipeline.report import overlays

    labels = [label for _, label in overlays.legend_entries(("modic", "outline", "levels", "flags"))]
    assert any("B1" in label and "could not be named" in label for label in labels), labels


def test_more_files_than_max_files_is_one_line_exit_2_without_the_input_path(tmp_path):
    """Review of issue 30: an input with more files than loading.max_files (200000 by default: a large archive
    export) ended as an "internal error" with a traceback (exit 1), and its message named the input folder in
    batch.log and on stderr even with --pseudonymise. Now: one line, exit 2 (nothing was run), no path."""
    inp = tmp_path / "Mueller_Hans"
    inp.mkdir()
    for i in range(6):
        (inp / f"IM_{i}.dcm").write_bytes(b"")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loading:\n  max_files: 5\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(inp), "-o", str(out), "--config", str(cfg), "--pseudonymise", "k1",
                                    "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "loading.max_files" in res.output and "Traceback" not in res.output
    log_text = (out / "batch.log").read_text(encoding="utf-8")
    assert "Traceback" not in log_text and "internal error" not in log_text
    for text in (res.output, log_text):
        assert "Mueller" not in text  # the input folder (OUT, named by the user, is logged)

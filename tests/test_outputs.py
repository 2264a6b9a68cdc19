"""QC pictures: overview.png, per-level level_<LEVEL>.png for --overlays all|flagged|none, the panel renderer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.report import overlays, study_outputs
from pipeline.report.overlays import (
    MODIC_COLOURS,
    OUTLINE_COLOUR,
    OVERLAY_ALPHA,
    display_window,
    render_panel,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
# planted: seed 0 Modic I at L4 inferior / L5 superior with edema; seed 2 an L1 fracture (flag) and Modic III L3/L4.
# The tests compare the pictures with whatever report.json says, not with the planted truth (test_end_to_end does that).
STUDIES = ("phantom_seed0000", "phantom_seed0002")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A two-study phantom batch run in-process (default --overlays flagged); the artefacts are kept per study."""
    from pipeline.batch.executors import get_executor
    from pipeline.batch.run import run_batch
    from pipeline.config import config_from_dict

    root = tmp_path_factory.mktemp("outputs")
    for name in STUDIES:
        shutil.copytree(SAMPLE / name / "DICOM", root / "in" / name / "DICOM")
    captured: dict[str, tuple[dict, dict]] = {}
    real = study_outputs.write_study_outputs

    def spy(out_dir, report, artefacts, options):
        captured[report["study"]["key"]] = (report, artefacts)
        return real(out_dir, report, artefacts, options)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_outputs, "write_study_outputs", spy)
        # inline: the spy must see the studies, which a worker process would analyse out of its reach
        result = run_batch(root / "in", root / "out", config_from_dict({}), jobs=1, progress=False,
                           options={"overlays": "flagged", "write_masks": True}, executor=get_executor("inline"))
    assert result.exit_code == 0
    assert len(captured) == len(STUDIES)
    return root / "out", captured


def _report(out: Path, key: str) -> dict:
    return json.loads((out / key / "report.json").read_text())


def _expected_flagged(rep: dict) -> set[str]:
    flagged = {lv for f in rep["flags"] for lv in f["levels"]}
    return {v["level"] for v in rep["vertebrae"]
            if v["level"] in flagged or v["edema"]["present"]
            or v["endplates"]["superior"]["modic_type"] != "0" or v["endplates"]["inferior"]["modic_type"] != "0"}


def _level_pngs(folder: Path) -> set[str]:
    return {p.name[len("level_"):-len(".png")] for p in folder.glob("level_*.png")}


def _decode(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def test_overview_png_exists_decodes_and_has_a_sensible_size(batch):
    out, captured = batch
    for key in captured:
        img = _decode(out / key / "overview.png")
        h, w = img.shape[:2]
        assert img.ndim == 3 and img.shape[2] in (3, 4)
        assert 350 <= h <= 1600 and 900 <= w <= 3500, img.shape  # three panels side by side at ~native size
        rgb = img[..., :3].astype(np.float32)
        assert (rgb.max(axis=2) - rgb.min(axis=2) > 0.3).mean() > 0.001  # coloured overlays are drawn, not grey only


def test_flagged_writes_level_pngs_only_for_flagged_or_abnormal_levels(batch):
    out, captured = batch
    strict = 0
    for key in captured:
        rep = _report(out, key)
        want = _expected_flagged(rep)
        assert want, f"{key}: the planted findings give at least one abnormal level"
        strict += want != {v["level"] for v in rep["vertebrae"]}
        assert _level_pngs(out / key) == want
        for lv in want:
            img = _decode(out / key / f"level_{lv}.png")
            assert min(img.shape[:2]) >= 300
    assert strict  # at least one study has normal levels, so "flagged" differs from "all"


def test_all_writes_one_png_per_vertebra_and_none_writes_no_png(batch, tmp_path):
    _, captured = batch
    report, artefacts = next(iter(captured.values()))
    folder = tmp_path / "study"
    folder.mkdir()
    written = study_outputs.write_study_outputs(folder, report, artefacts, {"overlays": "all", "write_masks": False})
    levels = {v["level"] for v in report["vertebrae"]}
    assert _level_pngs(folder) == levels and len(levels) >= 6
    assert (folder / "overview.png").is_file() and set(written) == {"overview.png"} | {f"level_{lv}.png" for lv in levels}
    # rerun into the same folder with "none": no picture remains (stale ones removed)
    written = study_outputs.write_study_outputs(folder, report, artefacts, {"overlays": "none", "write_masks": False})
    assert written == [] and not list(folder.glob("*.png"))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    study_outputs.write_study_outputs(fresh, report, artefacts, {"overlays": "none", "write_masks": True})
    assert not list(fresh.glob("*.png")) and (fresh / "vertebrae.nii.gz").is_file()


def _study_with_class(captured, code):
    for report, art in captured.values():
        cls = art["findings"].class_map
        if (cls == code).any():
            k = int(np.argmax((cls == code).sum(axis=(0, 1))))
            return report, art, k
    return None


@pytest.mark.parametrize("code,dominant", [(1, "red"), (3, "blue"), (4, "magenta")])
def test_render_panel_colours_class_voxels_and_keeps_background_grey(batch, code, dominant):
    from scipy import ndimage

    _, captured = batch
    found = _study_with_class(captured, code)
    if found is None:
        pytest.skip(f"the segmentation of this batch gave no class-{code} voxel")
    report, art, k = found
    cls = art["findings"].class_map[:, :, k]
    lab = art["segmentation"].labels[:, :, k]
    for role, vol in art["volumes"].items():
        img = vol.data[:, :, k]
        rgb = render_panel(img, cls, lab)
        assert rgb.shape == img.shape + (3,) and rgb.dtype == np.float32
        assert rgb.min() >= 0.0 and rgb.max() <= 1.0
        outline = np.all(rgb == np.asarray(OUTLINE_COLOUR, np.float32), axis=2)
        sel = (cls == code) & ~outline
        assert sel.sum() >= 10, f"{role}: too few class-{code} pixels on slice {k}"
        r, g, b = rgb[sel, 0], rgb[sel, 1], rgb[sel, 2]
        if dominant == "red":  # Modic I: red channel dominates
            assert np.all(r - g > 0.35) and np.all(r - b > 0.35), role
        elif dominant == "blue":  # Modic III: blue channel dominates
            assert np.all(b - r > 0.3) and np.all(b - g > 0.2), role
        else:  # edema: red and blue over green
            assert np.all(r - g > 0.3) and np.all(b - g > 0.3), role
        # exactly the documented blend of the grey image and the class colour
        lo, hi = display_window(img)
        grey = np.clip((img[sel] - lo) / (hi - lo), 0, 1)
        want = (1 - OVERLAY_ALPHA) * grey[:, None] + OVERLAY_ALPHA * np.asarray(MODIC_COLOURS[code])[None, :]
        np.testing.assert_allclose(rgb[sel], want, atol=1e-5)
        # far from every body and every class voxel, the picture is plain grey
        far = ndimage.distance_transform_edt((lab == 0) & (cls == 0)) > 5
        assert far.mean() > 0.3
        assert np.array_equal(rgb[far, 0], rgb[far, 1]) and np.array_equal(rgb[far, 1], rgb[far, 2])
        # the outline lies on the bodies' inner boundary
        assert outline.any() and np.all(lab[outline] > 0)
        for v in np.unique(lab[lab > 0]):
            assert outline[lab == v].any(), f"body {v} has no outline"


def test_render_panel_marks_flagged_bodies_and_ignores_unknown_codes():
    img = np.tile(np.linspace(0, 100, 40, dtype=np.float32), (30, 1))
    lab = np.zeros((30, 40), np.int16)
    lab[5:12, 5:15], lab[18:26, 5:15] = 1, 2
    cls = np.zeros((30, 40), np.uint8)
    cls[20:24, 8:12] = 9  # not a class code: drawn as plain image
    rgb = render_panel(img, cls, lab, flagged_values=[2])
    assert np.allclose(rgb[18, 8], overlays.FLAGGED_OUTLINE_COLOUR) and np.allclose(rgb[5, 8], OUTLINE_COLOUR)
    assert rgb[22, 10, 0] == rgb[22, 10, 1] == rgb[22, 10, 2]
    assert rgb[0, 0].tolist() == [0.0, 0.0, 0.0] and rgb[0, -1].tolist() == [1.0, 1.0, 1.0]  # window 1..99.5 %


def test_png_writers_use_the_panel_renderer(batch, tmp_path, monkeypatch):
    _, captured = batch
    report, artefacts = next(iter(captured.values()))
    calls = []
    real = overlays.render_panel

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(overlays, "render_panel", spy)
    overlays.write_overview(tmp_path / "o.png", report, artefacts)
    assert len(calls) == len(artefacts["volumes"])
    overlays.write_level_png(tmp_path / "l.png", report, artefacts, report["vertebrae"][2]["level"])
    assert len(calls) == 2 * len(artefacts["volumes"])
    overlays.write_segmentation_png(tmp_path / "s.png", artefacts["volumes"]["T2"], artefacts["segmentation"], "x")
    assert len(calls) == 2 * len(artefacts["volumes"]) + 2
    assert all(p.stat().st_size > 10_000 for p in tmp_path.glob("*.png"))


def test_level_caption_names_types_edema_ratios_and_flags(batch):
    _, captured = batch
    reports = [r for r, _ in captured.values()]
    assert any(r["flags"] for r in reports)
    for rep in reports:
        for flag in rep["flags"]:
            for lv in flag["levels"]:
                text = overlays.level_caption(rep, lv)
                assert text.startswith(f"{lv}: ") and flag["code"] in text
        for v in rep["vertebrae"]:
            text = overlays.level_caption(rep, v["level"])
            assert "height ratios: anterior/posterior" in text and "signal / normal marrow (T1/T2/STIR)" in text
            assert ("edema: yes" in text) == v["edema"]["present"]
            for side in ("superior", "inferior"):
                assert f"{side} endplate: Modic {v['endplates'][side]['modic_type']}" in text
            if not any(v["level"] in f["levels"] for f in rep["flags"]):
                assert "review flags: none" in text


def test_cli_passes_overlays_option(monkeypatch, tmp_path):
    import pipeline.batch.run
    from pipeline.batch.run import BatchResult
    from pipeline.cli import main

    seen = {}

    def fake_run_batch(inp, out, cfg, **kw):
        seen.update(kw["options"])
        return BatchResult([], 0, Path(out) / "batch.json")

    monkeypatch.setattr(pipeline.batch.run, "run_batch", fake_run_batch)
    (tmp_path / "in").mkdir()
    for args, want in (([], "flagged"), (["--overlays", "all"], "all"), (["--overlays", "none"], "none")):
        res = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--no-progress", *args])
        assert res.exit_code == 0, res.output
        assert seen["overlays"] == want


def test_segment_png_on_a_real_scan(vertebral_bodies_dir, tmp_path):
    from pipeline.cli import main

    img = vertebral_bodies_dir / "vb3-01_image.nii.gz"
    png = tmp_path / "qc.png"
    res = CliRunner().invoke(main, ["segment", str(img), "-o", str(tmp_path / "labels.nii.gz"), "--png", str(png)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["png"] == str(png)
    pic = _decode(png)
    assert pic.shape[0] >= 300 and pic.shape[1] >= 600
    cyan = (pic[..., 0] < 0.2) & (pic[..., 1] > 0.8) & (pic[..., 2] > 0.8)
    assert cyan.sum() > 100  # outlines drawn

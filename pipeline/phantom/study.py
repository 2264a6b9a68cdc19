"""Synthetic lumbar spine MRI studies with known truth (DICOM files + NIfTI labels + findings JSON).

The phantom is an analytic 3-D model of the lumbar spine evaluated on the acquisition grid:

* Anatomy lives in *model millimetres* ``(s, a, x)``: ``s`` runs superior -> inferior from the top of the
  field of view, ``a`` anterior -> posterior from the anterior edge of the field of view, ``x`` is the
  lateral offset from the mid-sagittal plane, positive to the patient's Right.  An array indexed
  ``[s, a, x]`` with increasing coordinates is exactly the working frame ``("I", "P", "R")`` of
  ``pipeline.types``; sagittal slices are ``[:, :, k]`` and axial slices are ``[k, :, :]``.
* Every structure is a soft-edged solid (a signed distance in mm turned into a 0..1 occupancy), painted
  in anatomical order (torso, fat, muscle, canal, posterior elements, discs, bodies, marrow findings)
  into three images at once (T1, T2, STIR), each tissue carrying its relative signal per sequence.
* Vertebral bodies are rounded boxes in their own tilted frame (lumbar lordosis), with concave endplates,
  an anterior waist, a dark cortical rim and a kidney-shaped axial section (so lateral slices show a
  narrower body and the outermost slices none).  Discs fill the space between two endplate planes
  (so lordotic discs are wedge shaped), with a nucleus whose T2 signal drops when degenerated.
* Findings are painted into the marrow: a Modic band of ``depth_mm`` next to an endplate (following its
  concave shape), whole-body edema plus wedge collapse for a fracture, edema on both sides of a bright
  disc for infection.  Signal of a finding is a factor times the study's normal marrow on each sequence,
  so the expected contrast holds whatever the study's intensity scale.
* Acquisition effects: coil shading (posterior surface coil), mild in-plane blur (partial volume),
  Rician noise, 12-bit unsigned storage; optionally RescaleSlope / Intercept, compressed transfer
  syntaxes and the enhanced multi-frame IOD.

Everything is a pure function of the seed and the options: rerunning writes byte-identical files
(UIDs come from ``generate_uid(entropy_srcs=...)``; no clock is read).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipeline.phantom.anatomy import _build_anatomy
from pipeline.phantom.dicom_writer import (
    _apply_extra,
    _classic_dataset,
    _enhanced_dataset,
    _frames,
    _grid_affine,
    _study_header,
    _to_stored,
    _uid,
    _write_dataset,
)
from pipeline.phantom.render import _acquire, _Canvas, _full_volume_ml, _render
from pipeline.phantom.scenarios import (
    _TRANSFER_SYNTAXES,
    _VENDORS,
    FINDING_FACTORS,
    SAMPLE_SEEDS,
    SEQUENCES,
    normalise_findings,
    scenario_findings,
)


def make_study(
    out_dir: str | os.PathLike,
    seed: int,
    *,
    findings: list[dict[str, Any]] | None = None,
    n_slices: int = 15,
    matrix: int = 256,
    fov_mm: float = 280.0,
    slice_thickness_mm: float = 4.0,
    series: tuple[str, ...] | list[str] = ("T1", "T2", "STIR"),
    orientation: str = "sagittal",
    transfer_syntax: str = "explicit",
    enhanced: bool = False,
    patient_name: str | None = None,
    patient_id: str | None = None,
    extra_tags: dict[str, Any] | None = None,
    study_name: str | None = None,
    shuffle_instances: bool | None = None,
    rescale: bool | None = None,
    noise: float = 0.018,
    series_matrix: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write one synthetic study and its truth; return the truth dict (also in ``truth/findings.json``).

    Layout: ``out_dir/<study_name>/DICOM/SE<nnn>/IM_0001.dcm ...`` (one multi-frame file per series when
    ``enhanced``), ``out_dir/<study_name>/truth/labels.nii.gz`` (vertebral bodies, label values of
    ``types.level_value``, on the T2 grid in the working frame with its RAS affine; the grid of the first
    series when there is no T2) and ``truth/findings.json``.

    ``findings=None`` picks the seed's scenario (:data:`SCENARIOS`, random mix for seeds >= 4).
    ``shuffle_instances`` (default: seed-dependent) makes InstanceNumber disagree with slice position;
    ``rescale`` (default: Philips seeds) stores values with RescaleSlope / RescaleIntercept.
    ``noise`` is the Rician noise sigma relative to the T1 fat signal.
    ``series_matrix`` gives some roles their own in-plane matrix over the same FOV and slices, e.g.
    ``{"STIR": 192}`` (the truth labels stay on the T2 grid, so consumers must resample).
    """
    seed = int(seed)
    if orientation not in ("sagittal", "axial"):
        raise ValueError(f"orientation must be 'sagittal' or 'axial', got {orientation!r}")
    if transfer_syntax not in _TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(_TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    series = tuple(series)
    if not series or any(s not in SEQUENCES for s in series) or len(set(series)) != len(series):
        raise ValueError(f"series must be distinct names among {SEQUENCES}, got {series!r}")
    if not (8 <= matrix <= 1024 and 1 <= n_slices <= 256 and 50.0 <= fov_mm <= 600.0 and 0.5 <= slice_thickness_mm <= 20):
        raise ValueError("matrix 8..1024, n_slices 1..256, fov_mm 50..600 and slice_thickness_mm 0.5..20 are supported")
    series_matrix = {str(r): int(m) for r, m in (series_matrix or {}).items()}
    if any(r not in series or not 8 <= m <= 1024 for r, m in series_matrix.items()):
        raise ValueError(f"series_matrix must map roles of {series!r} to a matrix 8..1024, got {series_matrix!r}")
    planted = normalise_findings(scenario_findings(seed) if findings is None else findings)
    patient_name = patient_name or f"PHANTOM^SEED{seed}"
    patient_id = patient_id or f"PH{seed:06d}"
    study_name = study_name or f"phantom_seed{seed:04d}"
    vendor = _VENDORS[seed % len(_VENDORS)]
    if shuffle_instances is None:
        shuffle_instances = seed % 2 == 1
    if rescale is None:
        rescale = vendor["manufacturer"].startswith("Philips")

    # A key over every option that changes the content keeps UIDs unique across variants of one seed.
    opts = dict(findings=planted, n=n_slices, m=matrix, fov=fov_mm, th=slice_thickness_mm, series=series,
                o=orientation, ts=transfer_syntax, mf=enhanced, pn=patient_name, pid=patient_id, sh=shuffle_instances,
                rs=rescale, noise=noise, extra=sorted((extra_tags or {}).items(), key=lambda kv: kv[0]))
    if series_matrix:
        opts["sm"] = sorted(series_matrix.items())
    key = hashlib.sha256(json.dumps([seed, opts], sort_keys=True, default=str).encode()).hexdigest()[:24]

    rng_anat = np.random.default_rng([seed, 1])
    rng_tex = np.random.default_rng([seed, 2])
    rng_acq = np.random.default_rng([seed, 3])
    rng_hdr = np.random.default_rng([seed, 4])
    anat = _build_anatomy(rng_anat, fov_mm, planted)

    # Acquisition grids in model mm (pixel centres).  Sagittal: rows = s, columns = a, slices = x.
    # Every series shares the slice positions; a role listed in ``series_matrix`` gets its own in-plane
    # matrix over the same FOV (as when STIR is acquired at a lower resolution than T1 / T2).
    slice_pos = (np.arange(n_slices, dtype=np.float64) - (n_slices - 1) / 2) * slice_thickness_mm
    lateral_shift = float(rng_anat.uniform(-1.5, 1.5))  # the mid slice is rarely exactly mid-sagittal
    in_plane_axes = (0, 1) if orientation == "sagittal" else (1, 2)
    by = {b.name: b for b in anat.bodies}

    def grid_for(m: int):
        pxm = fov_mm / m
        in_plane = (np.arange(m, dtype=np.float64) + 0.5) * pxm
        if orientation == "sagittal":
            return in_plane, in_plane, slice_pos + lateral_shift, pxm
        # axial block through L3-S1 (the usual axial coverage of the lower discs)
        s_mid = 0.5 * (by["L3"].cs + by["L5"].cs)
        return s_mid + slice_pos, in_plane, in_plane - fov_mm / 2 + lateral_shift, pxm

    role_matrix = {role: series_matrix.get(role, matrix) for role in series}
    grids: dict[int, tuple] = {}
    canvases: dict[int, _Canvas] = {}
    images: dict[str, np.ndarray] = {}
    for m in [matrix] + sorted(set(role_matrix.values()) - {matrix}):
        roles_m = tuple(r for r in series if role_matrix[r] == m)
        if not roles_m:
            continue
        first = m == matrix  # the main grid keeps the seed's original random streams
        grids[m] = grid_for(m)
        canvases[m] = _Canvas(*grids[m][:3])
        _render(anat, canvases[m], rng_tex if first else np.random.default_rng([seed, 2, m]))
        images.update(_acquire(canvases[m], anat, rng_acq if first else np.random.default_rng([seed, 3, m]),
                               roles_m, in_plane_axes, noise))

    # Model mm -> patient LPS: L = -x + offL, P = a + offP, S = -s + offS (isocentre near L3, table offsets).
    off = np.array([float(rng_hdr.uniform(-5, 5)), -fov_mm / 2 + float(rng_hdr.uniform(-10, 10)) + 40.0,
                    fov_mm / 2 + float(rng_hdr.uniform(-20, 20))])
    grid_role = "T2" if "T2" in series else series[0]
    label_m = role_matrix[grid_role]
    cv = canvases[label_m]
    affine = _grid_affine(*grids[label_m], slice_thickness_mm, off)

    study_dir = Path(out_dir) / study_name
    if study_dir.exists():
        # only ever replace a previous phantom study, never an unrelated folder of the same name
        if not (study_dir / "truth" / "findings.json").is_file():
            raise FileExistsError(f"{study_dir} exists and is not a phantom study; choose another out_dir or study_name")
        shutil.rmtree(study_dir)
    header = _study_header(seed, vendor, patient_name, patient_id, rng_hdr, key)
    series_truth: dict[str, Any] = {}
    order_rng = np.random.default_rng([seed, 5])
    for num, role in enumerate(series, start=2):  # series 1 is conventionally the localizer
        stored_images, slope, intercept, bits = _to_stored(images[role], vendor, rescale)
        desc = (vendor["desc"] if orientation == "sagittal" else vendor["desc_axial"])[role]
        folder = f"SE{num:03d}"
        series_uid = _uid(key, "series", role)
        grid_s, grid_a, grid_x, px = grids[role_matrix[role]]
        frames = _frames(stored_images, grid_s, grid_a, grid_x, orientation, off)
        n = len(frames)
        if shuffle_instances:
            perm = order_rng.permutation(n) if seed % 4 == 3 else np.arange(n)[::-1]
        else:
            perm = np.arange(n)
        common = dict(role=role, num=num, desc=desc, series_uid=series_uid, vendor=vendor, px=px,
                      thickness=slice_thickness_mm, slope=slope, intercept=intercept, bits=bits, key=key, orientation=orientation,
                      values=images[role])
        if enhanced:
            ds = _enhanced_dataset(header, frames, perm, common)
            _apply_extra(ds, extra_tags)
            _write_dataset(ds, study_dir / "DICOM" / folder / "IM_0001.dcm", transfer_syntax)
        else:
            for inst, pos in enumerate(perm, start=1):
                ds = _classic_dataset(header, frames[int(pos)], inst, common)
                _apply_extra(ds, extra_tags)
                _write_dataset(ds, study_dir / "DICOM" / folder / f"IM_{inst:04d}.dcm", transfer_syntax)
        series_truth[role] = {"series_uid": series_uid, "series_number": num, "series_description": desc,
                              "folder": f"DICOM/{folder}", "n_frames": n, "rescale_slope": slope,
                              "rescale_intercept": intercept, "instances_shuffled": bool(shuffle_instances),
                              "matrix": role_matrix[role], "pixel_spacing_mm": round(px, 6)}

    truth = _truth(seed, study_name, header, vendor, anat, planted, cv, affine, series_truth, orientation,
                   transfer_syntax, enhanced, matrix, n_slices, fov_mm, slice_thickness_mm)
    truth_dir = study_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(cv.labels.astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = truth_dir / "labels.tmp.nii.gz"
    nib.save(img, tmp)
    os.replace(tmp, truth_dir / "labels.nii.gz")
    (truth_dir / "findings.json").write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return truth


def _truth(seed, study_name, header, vendor, anat, planted, cv: _Canvas, affine, series_truth, orientation,
           transfer_syntax, enhanced, matrix, n_slices, fov_mm, thickness) -> dict[str, Any]:
    labels = cv.labels
    counts = np.bincount(labels.ravel(), minlength=16)
    vox_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    present = [int(v) for v in np.nonzero(counts)[0] if v > 0]
    centroids = ndimage.center_of_mass(np.ones_like(labels, dtype=np.float32), labels, present) if present else []
    cen = dict(zip(present, centroids, strict=True))
    vertebrae: dict[str, Any] = {}
    flags: list[dict[str, Any]] = []
    for b in anat.bodies:
        if not b.label:
            continue
        ep = {"superior": {"modic": "0", "edema": False}, "inferior": {"modic": "0", "edema": False}}
        for band in b.bands:
            if band["type"] == "edema":
                ep[band["endplate"]]["edema"] = True
            else:
                ep[band["endplate"]]["modic"] = band["type"]
                ep[band["endplate"]]["edema"] = "I" in band["type"].split("/")
        if b.whole_edema:
            for e in ep.values():
                e["edema"] = True
        pattern = []
        if b.whole_edema and b.wedge > 0:
            pattern.append("POSSIBLE_ACUTE_FRACTURE")
        # the full volume of this body (as if the FOV were unlimited) to report how much of it is visible
        full_ml = _full_volume_ml(b)
        n = int(counts[b.label]) if b.label < len(counts) else 0
        vertebrae[b.name] = {
            "value": b.label,
            "present": n > 0,
            "voxels": n,
            "volume_ml": round(n * vox_ml, 3),
            "in_fov_fraction": round(min(1.0, n * vox_ml / full_ml), 3) if full_ml > 0 else 0.0,
            "centroid_vox": [round(float(c), 2) for c in cen[b.label]] if n else None,
            "endplates": ep,
            "whole_body_edema": b.whole_edema,
            "height_loss": b.wedge,
            "posterior_height_mm": round(b.height, 2),
            "ap_depth_mm": round(b.depth, 2),
            "tilt_deg": round(math.degrees(b.theta), 2),
            "pattern_flags": pattern,
        }
        if pattern:
            flags.append({"flag": "POSSIBLE_ACUTE_FRACTURE", "level": b.name})
    for f in planted:
        if f["kind"] == "infection":
            up, lo = f["disc"].split("-")
            for lv in (up, lo):
                if lv in vertebrae and "POSSIBLE_INFECTION" not in vertebrae[lv]["pattern_flags"]:
                    vertebrae[lv]["pattern_flags"].append("POSSIBLE_INFECTION")
            flags.append({"flag": "POSSIBLE_INFECTION", "disc": f["disc"], "levels": [up, lo]})
    discs = {}
    for d in anat.discs:
        if d.remnant or not (d.upper.label and d.lower.label):
            continue
        discs[f"{d.upper.name}-{d.lower.name}"] = {"degenerated": d.degenerated, "infected": d.infected}
    return {
        "generator": "modicscan.phantom",
        "version": 1,
        "seed": seed,
        "study_name": study_name,
        "study_uid": str(header.StudyInstanceUID),
        "patient": {"name": str(header.PatientName), "id": str(header.PatientID),
                    "birth_date": str(header.PatientBirthDate), "accession_number": str(header.AccessionNumber),
                    "study_date": str(header.StudyDate)},
        "vendor": {"manufacturer": vendor["manufacturer"], "model": vendor["model"], "field_T": vendor["field"]},
        "acquisition": {"orientation": orientation, "matrix": matrix, "n_slices": n_slices, "fov_mm": fov_mm,
                        "slice_thickness_mm": thickness, "transfer_syntax": transfer_syntax, "enhanced": enhanced},
        "series": series_truth,
        "labels": {"file": "truth/labels.nii.gz", "axcodes": list(nib.aff2axcodes(affine)), "shape": list(labels.shape),
                   "affine": [[round(float(v), 6) for v in row] for row in affine],
                   "grid_of": "T2" if "T2" in series_truth else next(iter(series_truth))},
        "findings": planted,
        "vertebrae": vertebrae,
        "discs": discs,
        "pattern_flags": flags,
        "finding_factors": {k: list(v) for k, v in FINDING_FACTORS.items()},
    }


def make_sample_data(out_dir: str | os.PathLike = "sample_data") -> list[dict[str, Any]]:
    """Regenerate the committed sample set: seeds 0-3, 256 x 256 x 15, seed 1 RLE-compressed."""
    truths = []
    for seed in SAMPLE_SEEDS:
        truths.append(make_study(out_dir, seed, transfer_syntax="rle" if seed == 1 else "explicit"))
    return truths


def cli_phantom(out: str | os.PathLike, seed: int, **opts: Any) -> dict[str, Any]:
    """Entry point for ``modicscan phantom OUT --seed N [...]``: options are make_study keyword arguments."""
    opts = {k: v for k, v in opts.items() if v is not None}
    if "series" in opts and isinstance(opts["series"], str):
        opts["series"] = tuple(s.strip() for s in opts["series"].split(",") if s.strip())
    return make_study(out, seed, **opts)


if __name__ == "__main__":  # pragma: no cover - manual regeneration helper
    import sys

    make_sample_data(sys.argv[1] if len(sys.argv) > 1 else "sample_data")

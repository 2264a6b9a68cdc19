"""A study's extra files beside report.json: label and zone masks (NIfTI), overlays (PNG) and the
DICOM SEG / SR (see docs/outputs.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.report.overlays import write_overlays

log = logging.getLogger("modicscan")


def write_study_outputs(out_dir: Path, report: dict, artefacts: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """Write the extra outputs of one analysed study; returns the file names written (relative to out_dir)."""
    from pipeline.io.nifti import save_nifti

    written = []
    seg = artefacts["segmentation"]
    ref = artefacts["volumes"]["T2"]
    if options.get("write_masks", True):
        save_nifti(seg.labels, ref.affine, out_dir / "vertebrae.nii.gz")
        written.append("vertebrae.nii.gz")
    if options.get("zone_masks"):
        save_nifti(artefacts["findings"].zone_map, ref.affine, out_dir / "zones.nii.gz")
        written.append("zones.nii.gz")
    written += write_overlays(out_dir, report, artefacts, options.get("overlays", "flagged"))
    if options.get("dicom_out"):
        from pipeline.report.dicom_export import write_dicom_outputs

        try:
            written += write_dicom_outputs(out_dir, report, artefacts, artefacts.get("t2_files") or [])
        except Exception as exc:  # noqa: BLE001 - the analysis stands without its DICOM copy; never lose the report
            log.exception("DICOM export failed for study %s", report["study"]["key"])
            report["qc"]["warnings"].append(f"DICOM SR / SEG export failed ({type(exc).__name__}: {exc}); "
                                            "report.json holds the findings")
    return written

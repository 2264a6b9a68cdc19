"""Per-study files beside report.json: label masks (and, when asked, overlays and DICOM objects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_study_outputs(out_dir: Path, report: dict, artefacts: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """Write the extra outputs of one analysed study; returns the file names written (relative to out_dir)."""
    from . import io

    written = []
    seg = artefacts["segmentation"]
    ref = artefacts["volumes"]["T2"]
    if options.get("write_masks", True):
        io.save_nifti(seg.labels, ref.affine, out_dir / "vertebrae.nii.gz")
        written.append("vertebrae.nii.gz")
    return written

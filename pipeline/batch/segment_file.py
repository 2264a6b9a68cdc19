"""``modicscan segment``: one NIfTI image or DICOM series folder in, its label image (and a QC PNG) out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import SegmentationConfig
from pipeline.errors import StudyError
from pipeline.segmentation.segment import segment_vertebrae
from pipeline.types import Segmentation


# ---------------------------------------------------------------------------------------------- entry point
def segment_path(input_path: str | Path, output_path: str | Path, cfg: SegmentationConfig | None = None,
                 png_path: str | Path | None = None) -> Segmentation:
    """Segment a NIfTI image or a DICOM series folder; write the label image on the input's grid.

    ``png_path``: also write a QC picture of the segmentation (mid-sagittal slice, outlines, level names).
    """
    from pipeline.io.discovery import discover
    from pipeline.io.nifti import load_nifti, save_nifti
    from pipeline.io.volumes import load_series

    p = Path(input_path)
    if p.is_file() and (p.name.endswith(".nii") or p.name.endswith(".nii.gz")):
        import nibabel as nib

        img = nib.load(str(p))
        vol = load_nifti(p)
        seg = segment_vertebrae(vol.data, vol.spacing, cfg, keep_below_s1=True)
        # back from the working frame to the input's own axes
        from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

        xform = ornt_transform(io_orientation(vol.affine), io_orientation(img.affine))
        labels = apply_orientation(seg.labels, xform).astype(np.int16)
        save_nifti(labels, img.affine, output_path)
        title = p.name
    else:
        d = discover(p)
        series = [s for st in d.studies.values() for s in st.series.values()
                  if s.orientation == "sagittal" and not s.is_localizer]
        if not series:
            raise StudyError("NO_SAGITTAL_SERIES", f"no sagittal DICOM series under {p}")
        series.sort(key=lambda s: -s.n_frames)
        vol = load_series(series[0])
        seg = segment_vertebrae(vol.data, vol.spacing, cfg, keep_below_s1=True)
        save_nifti(seg.labels, vol.affine, output_path)
        number = series[0].series_number  # never the description: it can hold names or IDs
        title = f"series {number}" if number is not None else "sagittal series"
    if png_path is not None:
        from pipeline.report.overlays import write_segmentation_png

        write_segmentation_png(Path(png_path), vol, seg, title=title)
    return seg

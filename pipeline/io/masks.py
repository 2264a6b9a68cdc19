"""External vertebral-body masks (``modicscan run --masks DIR``): a study's segmentation read from NIfTI
label images instead of computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import StudyError
from pipeline.types import Segmentation, VertebralBody, Volume, value_level


def segmentation_from_masks(masks_dir: Path, task, reference: Volume) -> Segmentation:
    """An external label image for the study (``--masks DIR``) instead of our segmentation.

    The file is ``DIR/<study key>.nii.gz`` or ``DIR/<StudyInstanceUID>.nii.gz`` (first found); values follow
    the documented convention (L1=1 ... S1=6, T12=7, ...; 101+ unlabelled). It is resampled (nearest
    neighbour) onto the T2 grid through the affines when the grids differ.
    """
    from pipeline.arrays import label_counts_and_centroids
    from pipeline.io.nifti import load_nifti, resample_to

    candidates = [masks_dir / f"{task.key}.nii.gz", masks_dir / f"{task.study.study_uid}.nii.gz",
                  masks_dir / f"{task.key}.nii", masks_dir / f"{task.study.study_uid}.nii"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise StudyError("EXTERNAL_MASK_MISSING", f"no label image for this study in {masks_dir} "
                         f"(looked for {task.key}.nii.gz and <StudyInstanceUID>.nii.gz)")
    vol = resample_to(load_nifti(path), reference, order=0)
    labels = np.rint(vol.data).astype(np.int16)
    values = [int(v) for v in np.unique(labels) if v > 0]
    if not values:
        raise StudyError("EXTERNAL_MASK_MISMATCH", f"{path.name} holds no labelled voxel on the T2 grid")
    try:
        names = [value_level(v) for v in values]
    except ValueError as exc:
        raise StudyError("EXTERNAL_MASK_MISMATCH", f"{path.name}: {exc} (see README, label values)") from exc
    counts, cents = label_counts_and_centroids(labels, values)
    vox = float(np.prod(reference.spacing))
    bodies = sorted((VertebralBody(n, v, tuple(float(x) for x in c), float(cnt * vox))
                     for n, v, c, cnt in zip(names, values, cents, counts, strict=True)), key=lambda b: b.centroid_vox[0])
    confident = all(1 <= v <= 6 or 7 <= v < 101 for v in values)
    return Segmentation(labels=labels, bodies=bodies, labelling_confidence=1.0 if confident else 0.3,
                        flags=[] if confident else ["COUNT_AMBIGUOUS"], notes=[f"external label image {path.name}"])

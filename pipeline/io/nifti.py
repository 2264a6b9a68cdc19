"""NIfTI in and out (atomic writes), reorientation to the working frame, resampling between grids
through their affines."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from pipeline.arrays import fortran_copy
from pipeline.errors import StudyError
from pipeline.types import WORK_AXCODES, Volume


# ---------------------------------------------------------------------------------------------- NIfTI + frames
def reorient_to_work(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute / flip ``data`` to the working frame (I, P, R); returns the array and its new affine."""
    current = io_orientation(affine)
    target = axcodes2ornt(WORK_AXCODES)
    if np.array_equal(current, target):
        return data, affine
    xform = ornt_transform(current, target)
    new = apply_orientation(data, xform)
    new_aff = affine @ inv_ornt_aff(xform, data.shape)
    return new, new_aff


def read_nifti_native(path: str | Path, *, allow_2d: bool = True) -> Volume:
    """A NIfTI image on its own voxel grid, not reoriented (float32, its affine). A single volume stored as 4-D is
    3-D; with ``allow_2d`` a plain 2-D image is one slice (a third axis of length 1: many research sets and key-image
    exports are one sagittal slice). Any other shape: StudyError ``GEOMETRY_INCONSISTENT``."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2 and allow_2d:
        data = data[..., None]
    if data.ndim != 3:
        raise StudyError("GEOMETRY_INCONSISTENT", f"{path}: expected a 3-D image, got shape {data.shape}")
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), series_uid="", meta={"source": str(path)})


def load_nifti(path: str | Path, *, allow_2d: bool = False) -> Volume:
    """A NIfTI image in the working frame (I, P, R); see :func:`read_nifti_native` for ``allow_2d``."""
    native = read_nifti_native(path, allow_2d=allow_2d)
    work, aff = reorient_to_work(native.data, native.affine)
    return Volume(data=np.ascontiguousarray(work), affine=aff, series_uid="", meta=native.meta)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write a NIfTI atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NIfTI is Fortran ordered: from a C-ordered array nibabel's writer would transpose it element by element.
    img = nib.Nifti1Image(fortran_copy(np.asarray(array)), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def same_grid(a: Volume, b: Volume, tol_mm: float = 1e-3) -> bool:
    return a.shape == b.shape and np.abs(a.affine - b.affine).max() <= tol_mm


def resample_to(vol: Volume, target: Volume, order: int = 1) -> Volume:
    """``vol`` sampled on ``target``'s grid through the affines (returns ``vol`` itself when grids match)."""
    if same_grid(vol, target):
        return vol
    from scipy import ndimage

    # target voxel -> world -> source voxel
    m = np.linalg.inv(vol.affine) @ target.affine
    out = ndimage.affine_transform(vol.data, m[:3, :3], offset=m[:3, 3], output_shape=target.shape,
                                   order=order, mode="constant", cval=0.0, prefilter=False)
    return Volume(data=out.astype(np.float32 if order > 0 else vol.data.dtype, copy=False), affine=target.affine.copy(),
                  series_uid=vol.series_uid, meta={**vol.meta, "resampled_to": target.series_uid})

"""A study given as one NIfTI image per role (T1, T2, optional STIR), e.g. a research set or a key-image
export: loading into the working frame, checks, and whether the study is single-slice.

The images may lie on different grids (matrix, spacing, field of view); the later stages align them through
their affines (:func:`pipeline.io.nifti.resample_to` onto the T2 grid), never by pixel index. A 2-D image is
accepted as one sagittal slice (shape ``(rows, cols, 1)`` or ``(rows, cols)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import StudyError
from pipeline.io.nifti import load_nifti
from pipeline.types import Volume

NIFTI_ROLES = ("T1", "T2", "STIR")
REQUIRED_ROLES = ("T1", "T2")
_MISSING_CODE = {"T1": "NO_SAGITTAL_T1", "T2": "NO_SAGITTAL_T2"}


def load_nifti_study(paths: dict[str, str | Path | None]) -> dict[str, Volume]:
    """Volumes by role from NIfTI paths (``{"T1": ..., "T2": ..., "STIR": ... or None}``).

    Raises StudyError: a required role missing (``NO_SAGITTAL_T1`` / ``NO_SAGITTAL_T2``), a file that is not a
    readable NIfTI (``PIXEL_DATA_UNREADABLE``), a 4-D or empty image or a constant one (``GEOMETRY_INCONSISTENT``).
    """
    unknown = set(paths) - set(NIFTI_ROLES)
    if unknown:
        raise StudyError("GEOMETRY_INCONSISTENT", f"unknown image role(s) {sorted(unknown)}; expected {NIFTI_ROLES}")
    volumes: dict[str, Volume] = {}
    for role in NIFTI_ROLES:
        path = paths.get(role)
        if not path:
            if role in REQUIRED_ROLES:
                raise StudyError(_MISSING_CODE[role], f"no {role} image given")
            continue
        p = Path(path)
        if not p.is_file():
            code = _MISSING_CODE.get(role, "PIXEL_DATA_UNREADABLE")
            raise StudyError(code, f"{role} image {p.name} does not exist")
        try:
            vol = load_nifti(p, allow_2d=True)  # a 2-D image is one sagittal slice
        except StudyError:
            raise
        except Exception as exc:  # nibabel raises many types for a broken file
            raise StudyError("PIXEL_DATA_UNREADABLE", f"{role} image {p.name} is not a readable NIfTI: {exc}") from exc
        if min(vol.shape) < 1 or not np.isfinite(vol.data).all() or float(vol.data.max()) <= float(vol.data.min()):
            raise StudyError("GEOMETRY_INCONSISTENT", f"{role} image {p.name} is empty, constant or not finite")
        vol.meta.update({"role": role, "n_slices": int(vol.shape[2])})
        volumes[role] = vol
    return volumes


def is_single_slice(volumes: dict[str, Volume]) -> bool:
    """True when the study has one sagittal slice per role (its T2 reference grid has one slice across)."""
    ref = volumes.get("T2")
    return ref is not None and ref.shape[2] == 1

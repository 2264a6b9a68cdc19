"""Reading DICOM header values robustly (missing, malformed, multi-valued tags) and the enhanced
multi-frame functional groups."""

from __future__ import annotations

import numpy as np

# Header elements longer than this (private blobs, a sparse 3.9 GB element) are left on disk when a file is read and
# only read if accessed: reading a header, or a file's pixels, never costs more memory than the pixels themselves.
DEFER_SIZE = "1 MB"


# ---------------------------------------------------------------------------------------------- small helpers
def floats(value, n: int | None = None) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    if not all(np.isfinite(out)):
        return None
    return out


def number(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def strings(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        value = [value]
    try:
        return tuple(str(v).strip().upper() for v in value if str(v).strip())
    except TypeError:
        return (str(value).strip().upper(),)


def text_value(ds, keyword: str) -> str:
    try:
        v = ds.get(keyword, "")
        return "" if v is None else str(v).strip()
    except Exception:  # noqa: BLE001 - a malformed value must not stop discovery
        return ""


def orientation_name(iop: tuple[float, ...] | None, min_cosine: float = 0.8) -> str:
    """sagittal / coronal / axial / oblique from the slice normal (LPS: x = L, y = P, z = S)."""
    if iop is None:
        return "unknown"
    n = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    norm = np.linalg.norm(n)
    if norm < 1e-3:
        return "unknown"
    n = np.abs(n / norm)
    axis = int(np.argmax(n))
    if n[axis] < min_cosine:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def frame_groups(ds, index: int | None = None):
    """(shared, per-frame) functional group items of an enhanced multi-frame dataset."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per = None
    if index is not None and "PerFrameFunctionalGroupsSequence" in ds:
        seq = ds.PerFrameFunctionalGroupsSequence
        per = seq[index] if index < len(seq) else None
    return shared, per


def functional_group_value(shared, per, seq_name: str, keyword: str):
    for grp in (per, shared):
        if grp is not None and seq_name in grp and len(getattr(grp, seq_name)) and keyword in getattr(grp, seq_name)[0]:
            return getattr(getattr(grp, seq_name)[0], keyword)
    return None

"""A series' pixels into a Volume in the working frame (I, P, R) with its RAS affine.

``load_series`` decodes pixel data once into a preallocated float32 stack, applies the modality rescale, sorts
slices by position along the slice normal (never by InstanceNumber or file name), checks the geometry, and
returns the volume in the working frame ``("I", "P", "R")`` with a RAS affine.

Geometry: DICOM's patient coordinates are LPS+. For a slice, pixel (row r, column c) lies at
``IPP + c * dc * F_row + r * dr * F_col`` where ``F_row = IOP[:3]`` (direction of increasing column index),
``F_col = IOP[3:]`` and (dr, dc) = PixelSpacing. Stacking ``pixel_array[r, c]`` along slices sorted by
``IPP . n`` (n = F_row x F_col) gives array axes (r, c, slice) with the LPS affine
``[F_col*dr | F_row*dc | n*ds | IPP_0]``; RAS = diag(-1, -1, 1, 1) @ LPS (nibabel's convention). LPS is
converted here only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from pipeline.config import LoadingConfig
from pipeline.errors import StudyError
from pipeline.io.nifti import reorient_to_work
from pipeline.io.tags import floats, frame_groups, functional_group_value, number
from pipeline.types import SeriesSummary, Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------- loading
def _pixels(ds, path: str) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many types
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise StudyError("PIXEL_DATA_UNREADABLE", f"pixel data of {Path(path).name} could not be decoded "
                         f"(transfer syntax {name}): {exc}") from exc
    return arr


def _rescale(ds, shared=None, per=None) -> tuple[float, float]:
    slope = number(ds.get("RescaleSlope"))
    inter = number(ds.get("RescaleIntercept"))
    if slope is None and (shared is not None or per is not None):
        slope = number(functional_group_value(shared, per, "PixelValueTransformationSequence", "RescaleSlope"))
        inter = number(functional_group_value(shared, per, "PixelValueTransformationSequence", "RescaleIntercept"))
    return (slope if slope not in (None, 0.0) else 1.0), (inter or 0.0)


def frame_geometry(ds) -> list[tuple]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of every frame of one dataset, in stored
    frame order: per-frame / shared functional groups for multi-frame images, the top-level tags otherwise.
    A missing or malformed value is ``None`` (the caller decides whether that is an error)."""
    if "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        out = []
        for fi in range(int(ds.get("NumberOfFrames", 1) or 1)):
            shared, per = frame_groups(ds, fi)
            out.append((floats(functional_group_value(shared, per, "PlanePositionSequence", "ImagePositionPatient"), 3),
                        floats(functional_group_value(shared, per, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                        floats(functional_group_value(shared, per, "PixelMeasuresSequence", "PixelSpacing"), 2)))
        return out
    return [(floats(ds.get("ImagePositionPatient"), 3), floats(ds.get("ImageOrientationPatient"), 6),
             floats(ds.get("PixelSpacing"), 2))]


def _frames(summary: SeriesSummary):
    """Yield (ipp, iop, pixel_spacing, slope, intercept, 2-D pixels, source) for every frame of the series."""
    for path in summary.files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001
            raise StudyError("PIXEL_DATA_UNREADABLE", f"{Path(path).name} could not be read: {exc}") from exc
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise StudyError("PIXEL_DATA_UNREADABLE", f"{Path(path).name} holds no pixel data")
        arr = _pixels(ds, path)
        geometry = frame_geometry(ds)
        if "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            nf = len(geometry)
            arr = arr.reshape((nf,) + arr.shape[-2:]) if arr.ndim >= 2 else arr
            for fi, (ipp, iop, ps) in enumerate(geometry):
                slope, inter = _rescale(ds, *frame_groups(ds, fi))
                yield ipp, iop, ps, slope, inter, arr[fi], path
        else:
            slope, inter = _rescale(ds)
            yield (*geometry[0], slope, inter, arr, path)


def load_series(summary: SeriesSummary, cfg: LoadingConfig | None = None) -> Volume:
    """Decode, sort and check one series; return it in the working frame with its RAS affine."""
    cfg = cfg or LoadingConfig()
    frames = list(_frames(summary))
    missing = [name for name, idx in (("ImagePositionPatient", 0), ("ImageOrientationPatient", 1), ("PixelSpacing", 2))
               if any(f[idx] is None for f in frames)]
    if missing:
        raise StudyError("GEOMETRY_MISSING", f"series '{summary.series_description}' lacks {', '.join(missing)} "
                         "in some or all slices; its geometry cannot be built")
    iop0 = np.asarray(frames[0][1])
    ps0 = np.asarray(frames[0][2])
    shape0 = frames[0][5].shape
    for f in frames[1:]:
        if f[5].shape != shape0 or np.abs(np.asarray(f[1]) - iop0).max() > 1e-3 or np.abs(np.asarray(f[2]) - ps0).max() > 1e-4:
            raise StudyError("GEOMETRY_INCONSISTENT", f"slices of series '{summary.series_description}' differ in "
                             "orientation, matrix size or pixel spacing")
    if len(shape0) != 2:
        raise StudyError("GEOMETRY_INCONSISTENT", f"unexpected pixel array shape {shape0} (colour or multi-sample data?)")
    row_cos, col_cos = iop0[:3], iop0[3:]
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 1e-3:
        raise StudyError("GEOMETRY_MISSING", "ImageOrientationPatient does not define a plane")
    normal /= np.linalg.norm(normal)
    pos = np.array([np.dot(np.asarray(f[0]), normal) for f in frames])
    order = np.argsort(pos, kind="stable")
    pos_sorted = pos[order]
    # Identical duplicates at one position (the same slice stored twice) are dropped; differing ones are an error.
    keep = [order[0]]
    for a, b in zip(order[:-1], order[1:], strict=True):
        if abs(pos[b] - pos[a]) < 1e-3:
            if not np.array_equal(frames[a][5], frames[b][5]):
                raise StudyError("SLICE_SPACING_INCONSISTENT", f"two different slices share position {pos[a]:.2f} mm "
                                 f"in series '{summary.series_description}'")
            continue
        keep.append(b)
    order = np.asarray(keep)
    pos_sorted = pos[order]
    n = order.size
    if n < cfg.min_slices:
        raise StudyError("TOO_FEW_SLICES", f"series '{summary.series_description}' has {n} slice(s); at least "
                         f"{cfg.min_slices} are needed")
    gaps = np.diff(pos_sorted)
    step = float(np.median(gaps))
    if step <= 0 or np.any(np.abs(gaps - step) > cfg.spacing_tolerance * step):
        worst = float(gaps[np.argmax(np.abs(gaps - step))])
        raise StudyError("SLICE_SPACING_INCONSISTENT", f"slice gaps of series '{summary.series_description}' vary "
                         f"(median {step:.2f} mm, found {worst:.2f} mm): a slice is missing or duplicated",
                         details={"median_gap_mm": step, "worst_gap_mm": worst})
    # Preallocate once; the rescale is applied per slice (it may differ between slices).
    data = np.empty((shape0[0], shape0[1], n), dtype=np.float32)
    for out_k, src in enumerate(order):
        _, _, _, slope, inter, px, _ = frames[src]
        np.multiply(px, np.float32(slope), out=data[:, :, out_k], casting="unsafe")
        if inter:
            data[:, :, out_k] += np.float32(inter)
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if float(data.max()) == float(data.min()):
        raise StudyError("IMAGE_EMPTY", f"series '{summary.series_description}' holds no signal (all voxels equal "
                         f"{float(data.min())})")
    dr, dc = float(ps0[0]), float(ps0[1])
    lps = np.eye(4)
    lps[:3, 0] = col_cos * dr
    lps[:3, 1] = row_cos * dc
    lps[:3, 2] = normal * step
    lps[:3, 3] = np.asarray(frames[order[0]][0])
    ras = LPS_TO_RAS @ lps
    work, affine = reorient_to_work(data, ras)
    return Volume(
        data=np.ascontiguousarray(work, dtype=np.float32), affine=affine, series_uid=summary.series_uid,
        meta={"series_description": summary.series_description, "series_number": summary.series_number,
              "n_slices": int(n), "original_shape": list(data.shape), "lps_affine_original": lps.tolist(),
              "slice_files": [frames[i][6] for i in order], "orientation": summary.orientation,
              "transfer_syntax": summary.extra.get("transfer_syntax", "")},
    )

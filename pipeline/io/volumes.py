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

Before any pixel is decoded the headers are checked: the number of pixels the series declares against the
per-study budget (``loading.max_pixels_per_study``: a 20 kB RLE file may declare 65535 x 65535 pixels), and
whether its geometry is geometry at all (unit, orthogonal orientation vectors; a plausible positive pixel
spacing; slices stacked along their normal, not sheared). Such a series fails with a reason code instead of
being analysed with a wrong grid or crashing later.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom

from pipeline.config import LoadingConfig
from pipeline.errors import StudyError
from pipeline.io.nifti import reorient_to_work
from pipeline.io.tags import DEFER_SIZE, floats, frame_groups, functional_group_value, number
from pipeline.io.walk import shown
from pipeline.types import SeriesSummary, Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# ImageOrientationPatient holds two unit vectors at right angles; scanners write them to >= 4 decimals, so a
# length or a cosine off by more than this is a wrong tag, not rounding.
ORIENTATION_TOLERANCE = 0.01
# Slices must lie on the line along their normal; an in-plane offset beyond this fraction of a pixel means
# the stack is sheared (its affine would misplace the far slices).
MAX_SHEAR_PIXELS = 0.5


# ---------------------------------------------------------------------------------------------- header checks
def series_pixels(summary: SeriesSummary, work_mm: float | None = None) -> int:
    """Pixels the series will occupy, from its headers alone: the decoded stack, or the in-plane working grid
    of ``work_mm`` pixels when that is larger (a coarse PixelSpacing makes the resampled grid huge)."""
    frames = max(int(summary.n_frames), 1)
    rows, cols = int(summary.rows or 0), int(summary.columns or 0)
    decoded = rows * cols * frames * max(int(summary.extra.get("samples_per_pixel", 1) or 1), 1)
    work = 0
    if work_mm and summary.pixel_spacing and all(v > 0 for v in summary.pixel_spacing):
        work = (math.ceil(rows * summary.pixel_spacing[0] / work_mm) * math.ceil(cols * summary.pixel_spacing[1] / work_mm)
                * frames)
    return max(decoded, work)


def check_pixel_budget(series: list[SeriesSummary], budget: int, work_mm: float | None = None) -> None:
    """Refuse (IMAGE_TOO_LARGE) before decoding when the series together declare more pixels than ``budget``."""
    sizes = [(series_pixels(s, work_mm), s) for s in series]
    total = sum(n for n, _ in sizes)
    if total <= budget:
        return
    n, big = max(sizes, key=lambda t: t[0])
    raise StudyError("IMAGE_TOO_LARGE", f"the series to analyse declare {total:.3g} pixels, more than "
                     f"loading.max_pixels_per_study = {budget:.3g}; the largest, '{big.series_description}', has "
                     f"{big.rows} x {big.columns} pixels x {big.n_frames} slice(s) ({n:.3g} pixels on the working "
                     "grid); nothing was decoded", details={"pixels": int(total), "budget": int(budget)})


def check_plane(iop: np.ndarray, spacing: np.ndarray, description: str, cfg: LoadingConfig) -> None:
    """ImageOrientationPatient and PixelSpacing describe a real pixel grid, or GEOMETRY_INVALID."""
    row_len, col_len = float(np.linalg.norm(iop[:3])), float(np.linalg.norm(iop[3:]))
    if abs(row_len - 1) > ORIENTATION_TOLERANCE or abs(col_len - 1) > ORIENTATION_TOLERANCE:
        raise StudyError("GEOMETRY_INVALID", f"ImageOrientationPatient of series '{description}' is not two unit "
                         f"vectors (lengths {row_len:.3f} and {col_len:.3f}); the orientation cannot be trusted")
    cosine = float(np.dot(iop[:3], iop[3:]))
    if abs(cosine) > ORIENTATION_TOLERANCE:
        raise StudyError("GEOMETRY_INVALID", f"ImageOrientationPatient of series '{description}' has row and column "
                         f"directions that are not at right angles (cosine {cosine:.3f})")
    if np.any(spacing <= 0):
        raise StudyError("GEOMETRY_INVALID", f"PixelSpacing of series '{description}' is {spacing[0]:g} / "
                         f"{spacing[1]:g} mm: not positive (a negative value would mirror the image)")
    if np.any(spacing < cfg.min_pixel_spacing_mm) or np.any(spacing > cfg.max_pixel_spacing_mm):
        raise StudyError("GEOMETRY_INVALID", f"PixelSpacing of series '{description}' is {spacing[0]:g} / "
                         f"{spacing[1]:g} mm, outside the plausible {cfg.min_pixel_spacing_mm:g}-"
                         f"{cfg.max_pixel_spacing_mm:g} mm (loading.min_pixel_spacing_mm / max_pixel_spacing_mm)")


def check_stack(positions: np.ndarray, normal: np.ndarray, spacing: np.ndarray, description: str) -> None:
    """Slice positions lie on one line along the slice normal (no shear), or GEOMETRY_INVALID."""
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    worst = float(np.linalg.norm(in_plane, axis=1).max()) if len(positions) else 0.0
    if not np.isfinite(worst):  # finite tags whose differences overflow (1e308 mm)
        raise StudyError("GEOMETRY_INVALID", f"slice positions of series '{description}' are not usable numbers")
    if worst > MAX_SHEAR_PIXELS * float(spacing.min()):
        raise StudyError("GEOMETRY_INVALID", f"slice positions of series '{description}' drift {worst:.2f} mm "
                         "sideways (in the image plane) instead of stacking along the slice normal: the stack is "
                         "sheared and has no single affine", details={"shear_mm": worst})


# ---------------------------------------------------------------------------------------------- loading
# Uncompressed little-endian transfer syntaxes: their pixel data is the array's bytes as they stand.
_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def native_pixels(ds) -> np.ndarray | None:
    """The pixels of an uncompressed little-endian, single-frame greyscale image read straight from its bytes:
    what ``ds.pixel_array`` returns (same dtype, unused high bits cleared or sign-extended the same way), without
    pydicom's per-file decoder set-up, which costs more than the copy of the pixels itself. ``None`` for anything
    else, or anything unusual (a missing or odd tag, a length that does not match): pydicom then decodes it, or
    says why it cannot."""
    meta = getattr(ds, "file_meta", None)
    if str(getattr(meta, "TransferSyntaxUID", "")) not in _NATIVE_LITTLE_ENDIAN:
        return None
    if "PixelData" not in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return None
    if "PerFrameFunctionalGroupsSequence" in ds or "NumberOfFrames" in ds:
        return None
    try:
        rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel)
        allocated, stored, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation)
        photometric = str(ds.PhotometricInterpretation).strip()
        raw = ds.PixelData
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    if (spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2") or allocated not in (8, 16, 32)
            or signed not in (0, 1) or not 1 <= stored <= allocated or rows < 1 or cols < 1
            or not isinstance(raw, bytes)):
        return None
    n_bytes = rows * cols * allocated // 8
    if len(raw) != n_bytes + n_bytes % 2:  # an odd length is padded to even; anything else: pydicom decides
        return None
    arr = np.frombuffer(raw, dtype=f"<{'i' if signed else 'u'}{allocated // 8}", count=rows * cols).reshape(rows, cols)
    if stored < allocated:  # as pydicom: shift the unused high bits out and back (clears, or sign-extends)
        shift = allocated - stored
        arr = np.right_shift(np.left_shift(arr, shift), shift)
    return arr


def _pixels(ds, path: str) -> np.ndarray:
    arr = native_pixels(ds)
    if arr is not None:
        return arr
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many types
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise StudyError("PIXEL_DATA_UNREADABLE", f"pixel data of {shown(Path(path).name)} could not be decoded "
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
            # force: discovery accepted files written without the 128-byte preamble (they parse as a dataset)
            ds = pydicom.dcmread(path, defer_size=DEFER_SIZE, force=True)
        except Exception as exc:  # noqa: BLE001
            raise StudyError("PIXEL_DATA_UNREADABLE", f"{shown(Path(path).name)} could not be read: {exc}") from exc
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise StudyError("PIXEL_DATA_UNREADABLE", f"{shown(Path(path).name)} holds no pixel data")
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
    n_conflicts = int(summary.extra.get("conflicting_duplicates", 0) or 0)
    if n_conflicts:
        raise StudyError("DUPLICATE_INSTANCE_CONFLICT", f"series '{summary.series_description}' holds {n_conflicts} "
                         "SOPInstanceUID(s) stored twice with different pixel data; which copy is right cannot be "
                         "told, so the series is not used (the copies are listed in batch.json, skipped_files)")
    check_pixel_budget([summary], cfg.max_pixels_per_study)
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
    check_plane(iop0, ps0, summary.series_description, cfg)
    ipp = np.array([f[0] for f in frames], dtype=float)
    check_stack(ipp, normal, ps0, summary.series_description)
    pos = ipp @ normal
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
    if n == 1:
        # One slice has no gap to measure: its thickness is its extent along the normal.
        step = number(summary.slice_thickness) or 0.0
        if step <= 0:
            raise StudyError("GEOMETRY_MISSING", f"series '{summary.series_description}' has one slice and no "
                             "positive SliceThickness; the slice's extent along its normal is unknown")
        gaps = np.array([step])
    else:
        gaps = np.diff(pos_sorted)
        step = float(np.median(gaps))
    if step <= 0 or np.any(np.abs(gaps - step) > cfg.spacing_tolerance * step):
        worst = float(gaps[np.argmax(np.abs(gaps - step))])
        raise StudyError("SLICE_SPACING_INCONSISTENT", f"slice gaps of series '{summary.series_description}' vary "
                         f"(median {step:.2f} mm, found {worst:.2f} mm): a slice is missing or duplicated",
                         details={"median_gap_mm": step, "worst_gap_mm": worst})
    # Preallocate once, slice-major so each slice is written contiguously (writing data[:, :, k] directly strides
    # through the whole stack per slice); the one transposing copy is the contiguous copy at the end. The rescale
    # is applied per slice (it may differ between slices).
    stack = np.empty((n, shape0[0], shape0[1]), dtype=np.float32)
    for out_k, src in enumerate(order):
        _, _, _, slope, inter, px, _ = frames[src]
        np.multiply(px, np.float32(slope), out=stack[out_k], casting="unsafe")
        if inter:
            stack[out_k] += np.float32(inter)
    lo, hi = float(stack.min()), float(stack.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN propagates into min / max, so this is isfinite().all()
        stack = np.nan_to_num(stack, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(stack.min()), float(stack.max())
    if hi == lo:
        raise StudyError("IMAGE_EMPTY", f"series '{summary.series_description}' holds no signal (all voxels equal "
                         f"{lo})")
    data = stack.transpose(1, 2, 0)
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

"""Stage 1: find DICOM studies on disk, read headers once, build volumes with their real geometry.

* ``discover`` reads headers only (``stop_before_pixels``), skips what is not a usable DICOM image (with
  a reason), and groups files by StudyInstanceUID, then series (SeriesInstanceUID + orientation + matrix,
  so a series UID reused for a different stack is not mixed).
* ``load_series`` decodes pixel data once into a preallocated float32 stack, applies the modality rescale,
  sorts slices by position along the slice normal (never by InstanceNumber or file name), checks the
  geometry, and returns the volume in the working frame ``("I", "P", "R")`` with a RAS affine.
* Geometry: DICOM's patient coordinates are LPS+. For a slice, pixel (row r, column c) lies at
  ``IPP + c * dc * F_row + r * dr * F_col`` where ``F_row = IOP[:3]`` (direction of increasing column index),
  ``F_col = IOP[3:]`` and (dr, dc) = PixelSpacing. Stacking ``pixel_array[r, c]`` along slices sorted by
  ``IPP . n`` (n = F_row x F_col) gives array axes (r, c, slice) with the LPS affine
  ``[F_col*dr | F_row*dc | n*ds | IPP_0]``; RAS = diag(-1, -1, 1, 1) @ LPS (nibabel's convention).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.errors import InvalidDicomError

from .config import LoadingConfig
from .errors import StudyError
from .types import WORK_AXCODES, Discovery, SeriesSummary, SkippedFile, StudyFiles, Volume

log = logging.getLogger("modicscan")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SKIP_NAMES = {".DS_Store", "DICOMDIR", "Thumbs.db"}
# Non-image storage classes that can carry a PixelData-less header: SR, presentation states, KOS, ...
_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.2",
                       "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.12",
                       "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130")
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


# ---------------------------------------------------------------------------------------------- small helpers
def _floats(value, n: int | None = None) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    if not all(np.isfinite(out)):
        return None
    return out


def _num(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _strs(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        value = [value]
    try:
        return tuple(str(v).strip().upper() for v in value if str(v).strip())
    except TypeError:
        return (str(value).strip().upper(),)


def _text(ds, keyword: str) -> str:
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


def _frame_groups(ds, index: int | None = None):
    """(shared, per-frame) functional group items of an enhanced multi-frame dataset."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per = None
    if index is not None and "PerFrameFunctionalGroupsSequence" in ds:
        seq = ds.PerFrameFunctionalGroupsSequence
        per = seq[index] if index < len(seq) else None
    return shared, per


def _fg_get(shared, per, seq_name: str, keyword: str):
    for grp in (per, shared):
        if grp is not None and seq_name in grp and len(getattr(grp, seq_name)) and keyword in getattr(grp, seq_name)[0]:
            return getattr(getattr(grp, seq_name)[0], keyword)
    return None


# ---------------------------------------------------------------------------------------------- discovery
def _summary_fields(ds) -> dict:
    """Header facts for role selection, for classic and enhanced MR alike."""
    enhanced = str(ds.get("SOPClassUID", "")) == ENHANCED_MR or "PerFrameFunctionalGroupsSequence" in ds
    if enhanced:
        shared, per0 = _frame_groups(ds, 0)
        iop = _floats(_fg_get(shared, per0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ps = _floats(_fg_get(shared, per0, "PixelMeasuresSequence", "PixelSpacing"), 2)
        thick = _num(_fg_get(shared, per0, "PixelMeasuresSequence", "SliceThickness"))
        tr = _num(_fg_get(shared, per0, "MRTimingAndRelatedParametersSequence", "RepetitionTime")) or _num(ds.get("RepetitionTime"))
        te = _num(_fg_get(shared, per0, "MREchoSequence", "EffectiveEchoTime")) or _num(ds.get("EchoTime"))
        ti = None
        inv = _fg_get(shared, per0, "MRModifierSequence", "InversionTimes")
        if inv is not None:
            vals = _floats(inv if not isinstance(inv, str | float | int) else [inv])
            ti = vals[0] if vals else None
        ti = ti or _num(ds.get("InversionTime"))
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        ss = _strs(ds.get("ScanningSequence")) or _enhanced_sequence(ds)
        sv = _strs(ds.get("SequenceVariant"))
        so = _strs(ds.get("ScanOptions"))
        # SpectrallySelectedSuppression (0018,9025) is present with "NONE" on non-suppressed series; only
        # FAT / FAT_AND_WATER mean fat saturation (WATER / SILICON_GEL suppress something else).
        suppression = set(_strs(ds.get("SpectrallySelectedSuppression"))) | set(
            _strs(_fg_get(shared, per0, "MRModifierSequence", "SpectrallySelectedSuppression")))
        if suppression & {"FAT", "FAT_AND_WATER"}:
            so = tuple(sorted(set(so) | {"FS"}))
    else:
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
        ps = _floats(ds.get("PixelSpacing"), 2)
        thick = _num(ds.get("SliceThickness"))
        tr, te, ti = _num(ds.get("RepetitionTime")), _num(ds.get("EchoTime")), _num(ds.get("InversionTime"))
        n_frames = 1
        ss, sv, so = _strs(ds.get("ScanningSequence")), _strs(ds.get("SequenceVariant")), _strs(ds.get("ScanOptions"))
    series_number = ds.get("SeriesNumber")
    try:
        series_number = int(series_number) if series_number not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    return {
        "enhanced": enhanced, "iop": iop, "pixel_spacing": ps, "slice_thickness": thick,
        "tr": tr, "te": te, "ti": ti, "n_frames": n_frames, "ss": ss, "sv": sv, "so": so,
        "series_number": series_number,
    }


def _enhanced_sequence(ds) -> tuple[str, ...]:
    """Enhanced MR has no ScanningSequence; derive SE / GR / IR from its own attributes."""
    out = []
    echo = _text(ds, "EchoPulseSequence").upper()
    if echo in ("SPIN", "BOTH"):
        out.append("SE")
    if echo in ("GRADIENT", "BOTH"):
        out.append("GR")
    if _text(ds, "InversionRecovery").upper() == "YES":
        out.append("IR")
    return tuple(out)


def _classify_file(path: Path):
    """Header of a usable DICOM image, or (None, reason)."""
    if path.name in _SKIP_NAMES:
        return None, "DICOMDIR" if path.name == "DICOMDIR" else "NOT_DICOM"
    try:
        if path.stat().st_size == 0:
            return None, "EMPTY_FILE"
    except OSError:
        return None, "UNREADABLE"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        # Files written without the 128-byte preamble: accept only if they parse as a dataset with UIDs.
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "SOPClassUID" not in ds or "StudyInstanceUID" not in ds:
                return None, "NOT_DICOM"
        except Exception:  # noqa: BLE001
            return None, "NOT_DICOM"
    except Exception:  # noqa: BLE001 - truncated / corrupt header
        return None, "UNREADABLE"
    try:
        sop = str(ds.get("SOPClassUID", ""))
        if sop == "1.2.840.10008.1.3.10":
            return None, "DICOMDIR"
        if "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            return None, "INCOMPLETE_HEADER"  # truncated, or no Study/Series UID
        # With stop_before_pixels the PixelData element itself is absent; Rows/Columns tell an image.
        if "Rows" not in ds or "Columns" not in ds or (sop and not sop.startswith(_IMAGE_SOP_PREFIXES)):
            return None, "NO_PIXEL_DATA"
        return ds, None
    except Exception:  # noqa: BLE001
        return None, "UNREADABLE"


def _walk(root: Path, max_files: int):
    seen_dirs: set[tuple[int, int]] = set()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_symlink() and not p.exists():
                continue
            count += 1
            if count > max_files:
                raise StudyError("NO_DICOM_FILES", f"more than {max_files} files under {root}; raise loading.max_files")
            yield p


def discover(root: str | Path, cfg: LoadingConfig | None = None) -> Discovery:
    """Walk ``root`` (any depth), read headers only, group into studies and series."""
    cfg = cfg or LoadingConfig()
    root = Path(root)
    if root.is_file():
        files = [root]
    else:
        files = list(_walk(root, cfg.max_files))
    skipped: list[SkippedFile] = []
    studies: dict[str, StudyFiles] = {}
    series_files: dict[tuple, list[tuple[str, object]]] = {}
    seen_sop: set[tuple[str, str]] = set()
    for path in files:
        ds, reason = _classify_file(path)
        if ds is None:
            skipped.append(SkippedFile(str(path), reason))
            continue
        study_uid = str(ds.StudyInstanceUID)
        sop = str(ds.get("SOPInstanceUID", path))
        if (study_uid, sop) in seen_sop:
            skipped.append(SkippedFile(str(path), "DUPLICATE_INSTANCE"))
            continue
        seen_sop.add((study_uid, sop))
        f = _summary_fields(ds)
        iop_key = tuple(np.round(f["iop"], 2)) if f["iop"] else None
        key = (study_uid, str(ds.SeriesInstanceUID), iop_key, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        series_files.setdefault(key, []).append((str(path), ds, f))
        if study_uid not in studies:
            studies[study_uid] = StudyFiles(
                study_uid=study_uid, series={},
                patient_id=_text(ds, "PatientID"), patient_name=_text(ds, "PatientName"),
                patient_birth_date=_text(ds, "PatientBirthDate"), accession_number=_text(ds, "AccessionNumber"),
                study_date=_text(ds, "StudyDate"), study_description=_text(ds, "StudyDescription"),
            )
    # One SeriesSummary per (series UID, orientation, matrix); a split series gets a suffixed key.
    per_uid: dict[tuple[str, str], int] = {}
    for key, items in series_files.items():
        study_uid, series_uid = key[0], key[1]
        n_same = per_uid.get((study_uid, series_uid), 0)
        per_uid[(study_uid, series_uid)] = n_same + 1
        skey = series_uid if n_same == 0 else f"{series_uid}#{n_same + 1}"
        path0, ds0, f0 = items[0]
        image_type = _strs(ds0.get("ImageType"))
        n_frames = sum(f["n_frames"] for _, _, f in items)
        orient = orientation_name(f0["iop"])
        # Localisers: flagged in ImageType, or a handful of slices in several orientations.
        iops = {tuple(np.round(f["iop"], 1)) for _, _, f in items if f["iop"]}
        is_loc = "LOCALIZER" in image_type or "SCOUT" in _text(ds0, "SeriesDescription").upper() or (len(iops) > 1 and n_frames <= 5)
        summary = SeriesSummary(
            series_uid=skey, study_uid=study_uid, files=[p for p, _, _ in items], n_frames=n_frames,
            modality=_text(ds0, "Modality"), series_description=_text(ds0, "SeriesDescription"),
            series_number=f0["series_number"], orientation=orient, image_orientation=f0["iop"],
            repetition_time=f0["tr"], echo_time=f0["te"], inversion_time=f0["ti"],
            scanning_sequence=f0["ss"], sequence_variant=f0["sv"], scan_options=f0["so"],
            contrast_agent=_text(ds0, "ContrastBolusAgent"), image_type=image_type,
            rows=int(ds0.get("Rows", 0) or 0), columns=int(ds0.get("Columns", 0) or 0),
            pixel_spacing=f0["pixel_spacing"], slice_thickness=f0["slice_thickness"], is_localizer=bool(is_loc),
            extra={"enhanced": f0["enhanced"], "transfer_syntax": str(getattr(ds0.file_meta, "TransferSyntaxUID", "")),
                   "manufacturer": _text(ds0, "Manufacturer"), "body_part": _text(ds0, "BodyPartExamined"),
                   "series_uid_original": series_uid},
        )
        studies[study_uid].series[skey] = summary
    for st in studies.values():
        paths = [p for s in st.series.values() for p in s.files]
        st.root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
        # The common folder of a study's series folders is the study folder (one level up from a lone series).
        if len(st.series) == 1 and st.root and len({os.path.dirname(p) for p in paths}) == 1 and Path(st.root) != root:
            parent = str(Path(st.root).parent)
            if parent != str(root) and Path(parent).is_relative_to(root):
                st.root = parent
    return Discovery(studies=studies, skipped=skipped, n_files_seen=len(files))


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
    slope = _num(ds.get("RescaleSlope"))
    inter = _num(ds.get("RescaleIntercept"))
    if slope is None and (shared is not None or per is not None):
        slope = _num(_fg_get(shared, per, "PixelValueTransformationSequence", "RescaleSlope"))
        inter = _num(_fg_get(shared, per, "PixelValueTransformationSequence", "RescaleIntercept"))
    return (slope if slope not in (None, 0.0) else 1.0), (inter or 0.0)


def frame_geometry(ds) -> list[tuple]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of every frame of one dataset, in stored
    frame order: per-frame / shared functional groups for multi-frame images, the top-level tags otherwise.
    A missing or malformed value is ``None`` (the caller decides whether that is an error)."""
    if "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        out = []
        for fi in range(int(ds.get("NumberOfFrames", 1) or 1)):
            shared, per = _frame_groups(ds, fi)
            out.append((_floats(_fg_get(shared, per, "PlanePositionSequence", "ImagePositionPatient"), 3),
                        _floats(_fg_get(shared, per, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                        _floats(_fg_get(shared, per, "PixelMeasuresSequence", "PixelSpacing"), 2)))
        return out
    return [(_floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6),
             _floats(ds.get("PixelSpacing"), 2))]


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
                slope, inter = _rescale(ds, *_frame_groups(ds, fi))
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


def load_nifti(path: str | Path) -> Volume:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise StudyError("GEOMETRY_INCONSISTENT", f"{path}: expected a 3-D image, got shape {data.shape}")
    work, aff = reorient_to_work(data, img.affine)
    return Volume(data=np.ascontiguousarray(work), affine=aff, series_uid="", meta={"source": str(path)})


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write a NIfTI atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
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

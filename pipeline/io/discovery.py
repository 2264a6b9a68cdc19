"""Stage 1: find DICOM studies on disk, reading headers once.

``discover`` reads headers only (``stop_before_pixels``), skips what is not a usable DICOM image (with a
reason), and groups files by StudyInstanceUID, then series (SeriesInstanceUID + orientation + matrix, so a
series UID reused for a different stack is not mixed). Pixels are decoded later, by :mod:`pipeline.io.volumes`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.config import LoadingConfig
from pipeline.errors import StudyError
from pipeline.io.tags import (
    floats,
    frame_groups,
    functional_group_value,
    number,
    orientation_name,
    strings,
    text_value,
)
from pipeline.types import Discovery, SeriesSummary, SkippedFile, StudyFiles

_SKIP_NAMES = {".DS_Store", "DICOMDIR", "Thumbs.db"}


# Non-image storage classes that can carry a PixelData-less header: SR, presentation states, KOS, ...
_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.2",
                       "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.12",
                       "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130")


ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


# ---------------------------------------------------------------------------------------------- discovery
def _summary_fields(ds) -> dict:
    """Header facts for role selection, for classic and enhanced MR alike."""
    enhanced = str(ds.get("SOPClassUID", "")) == ENHANCED_MR or "PerFrameFunctionalGroupsSequence" in ds
    if enhanced:
        shared, per0 = frame_groups(ds, 0)
        iop = floats(functional_group_value(shared, per0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ps = floats(functional_group_value(shared, per0, "PixelMeasuresSequence", "PixelSpacing"), 2)
        thick = number(functional_group_value(shared, per0, "PixelMeasuresSequence", "SliceThickness"))
        tr = number(functional_group_value(shared, per0, "MRTimingAndRelatedParametersSequence", "RepetitionTime")) or number(ds.get("RepetitionTime"))
        te = number(functional_group_value(shared, per0, "MREchoSequence", "EffectiveEchoTime")) or number(ds.get("EchoTime"))
        ti = None
        inv = functional_group_value(shared, per0, "MRModifierSequence", "InversionTimes")
        if inv is not None:
            vals = floats(inv if not isinstance(inv, str | float | int) else [inv])
            ti = vals[0] if vals else None
        ti = ti or number(ds.get("InversionTime"))
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        ss = strings(ds.get("ScanningSequence")) or _enhanced_sequence(ds)
        sv = strings(ds.get("SequenceVariant"))
        so = strings(ds.get("ScanOptions"))
        # SpectrallySelectedSuppression (0018,9025) is present with "NONE" on non-suppressed series; only
        # FAT / FAT_AND_WATER mean fat saturation (WATER / SILICON_GEL suppress something else).
        suppression = set(strings(ds.get("SpectrallySelectedSuppression"))) | set(
            strings(functional_group_value(shared, per0, "MRModifierSequence", "SpectrallySelectedSuppression")))
        if suppression & {"FAT", "FAT_AND_WATER"}:
            so = tuple(sorted(set(so) | {"FS"}))
    else:
        iop = floats(ds.get("ImageOrientationPatient"), 6)
        ps = floats(ds.get("PixelSpacing"), 2)
        thick = number(ds.get("SliceThickness"))
        tr, te, ti = number(ds.get("RepetitionTime")), number(ds.get("EchoTime")), number(ds.get("InversionTime"))
        n_frames = 1
        ss, sv, so = strings(ds.get("ScanningSequence")), strings(ds.get("SequenceVariant")), strings(ds.get("ScanOptions"))
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
    echo = text_value(ds, "EchoPulseSequence").upper()
    if echo in ("SPIN", "BOTH"):
        out.append("SE")
    if echo in ("GRADIENT", "BOTH"):
        out.append("GR")
    if text_value(ds, "InversionRecovery").upper() == "YES":
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
                patient_id=text_value(ds, "PatientID"), patient_name=text_value(ds, "PatientName"),
                patient_birth_date=text_value(ds, "PatientBirthDate"), accession_number=text_value(ds, "AccessionNumber"),
                study_date=text_value(ds, "StudyDate"), study_description=text_value(ds, "StudyDescription"),
            )
    # One SeriesSummary per (series UID, orientation, matrix); a split series gets a suffixed key.
    per_uid: dict[tuple[str, str], int] = {}
    for key, items in series_files.items():
        study_uid, series_uid = key[0], key[1]
        n_same = per_uid.get((study_uid, series_uid), 0)
        per_uid[(study_uid, series_uid)] = n_same + 1
        skey = series_uid if n_same == 0 else f"{series_uid}#{n_same + 1}"
        path0, ds0, f0 = items[0]
        image_type = strings(ds0.get("ImageType"))
        n_frames = sum(f["n_frames"] for _, _, f in items)
        orient = orientation_name(f0["iop"])
        # Localisers: flagged in ImageType, or a handful of slices in several orientations.
        iops = {tuple(np.round(f["iop"], 1)) for _, _, f in items if f["iop"]}
        is_loc = "LOCALIZER" in image_type or "SCOUT" in text_value(ds0, "SeriesDescription").upper() or (len(iops) > 1 and n_frames <= 5)
        summary = SeriesSummary(
            series_uid=skey, study_uid=study_uid, files=[p for p, _, _ in items], n_frames=n_frames,
            modality=text_value(ds0, "Modality"), series_description=text_value(ds0, "SeriesDescription"),
            series_number=f0["series_number"], orientation=orient, image_orientation=f0["iop"],
            repetition_time=f0["tr"], echo_time=f0["te"], inversion_time=f0["ti"],
            scanning_sequence=f0["ss"], sequence_variant=f0["sv"], scan_options=f0["so"],
            contrast_agent=text_value(ds0, "ContrastBolusAgent"), image_type=image_type,
            rows=int(ds0.get("Rows", 0) or 0), columns=int(ds0.get("Columns", 0) or 0),
            pixel_spacing=f0["pixel_spacing"], slice_thickness=f0["slice_thickness"], is_localizer=bool(is_loc),
            extra={"enhanced": f0["enhanced"], "transfer_syntax": str(getattr(ds0.file_meta, "TransferSyntaxUID", "")),
                   "manufacturer": text_value(ds0, "Manufacturer"), "body_part": text_value(ds0, "BodyPartExamined"),
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

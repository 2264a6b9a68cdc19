"""Stage 1: find DICOM studies on disk, reading headers once.

``discover`` reads headers only (``stop_before_pixels``; an element longer than ``DEFER_SIZE`` is never read, so
a sparse file declaring gigabytes costs nothing), skips what is not a usable DICOM image (with a reason), and
groups files by StudyInstanceUID, then series (SeriesInstanceUID + PatientID + orientation + matrix, so a series
UID reused for a different stack or patient is not mixed). Which files exist is :mod:`pipeline.io.walk`'s business
(links, unreadable folders, our own outputs). Two files with one SOPInstanceUID: an exact copy is skipped
(``DUPLICATE_INSTANCE``); with different pixel data the copy is skipped as ``DUPLICATE_INSTANCE_CONFLICT`` and its
series is marked, so loading it fails (which of the two is right cannot be told). Pixels are decoded later, by
:mod:`pipeline.io.volumes`.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.config import LoadingConfig
from pipeline.io.tags import (
    DEFER_SIZE,
    floats,
    frame_groups,
    functional_group_value,
    number,
    orientation_name,
    strings,
    text_value,
)
from pipeline.io.walk import MODICSCAN_OUTPUT, PATH_TOO_LONG, walk_inputs
from pipeline.types import Discovery, SeriesSummary, SkippedFile, StudyFiles

_SKIP_NAMES = {".DS_Store", "DICOMDIR", "Thumbs.db"}


# Image storage classes (each UID itself or a UID below it: "...1.1.4" is MR, "...1.1.4.1" enhanced MR). Matched
# on whole components: a bare prefix test let "...1.1.6" (ultrasound) admit "...1.1.66.4" (Segmentation).
# Everything else (SR, SEG, presentation states, KOS, ...) is no image to analyse, even with Rows / Columns.
_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.2",
                       "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.12",
                       "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130")
# What modicscan writes into the DICOM objects it creates (--dicom-out): never read back as input.
OWN_MANUFACTURER = "modicscan"


def is_image_sop_class(sop: str) -> bool:
    return any(sop == p or sop.startswith(p + ".") for p in _IMAGE_SOP_PREFIXES)


ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


# ---------------------------------------------------------------------------------------------- discovery
def _orientation_fields(ds) -> dict:
    """What every file of a series is grouped and counted by: enhanced or not, orientation, number of frames."""
    enhanced = str(ds.get("SOPClassUID", "")) == ENHANCED_MR or "PerFrameFunctionalGroupsSequence" in ds
    if enhanced:
        shared, per0 = frame_groups(ds, 0)
        iop = floats(functional_group_value(shared, per0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    else:
        iop, n_frames = floats(ds.get("ImageOrientationPatient"), 6), 1
    return {"enhanced": enhanced, "iop": iop, "n_frames": n_frames}


def _summary_fields(ds) -> dict:
    """Header facts for role selection, for classic and enhanced MR alike (read from a series' first file only:
    the other files' values were never used, and converting them was a fifth of discovery's time)."""
    f = _orientation_fields(ds)
    enhanced, iop, n_frames = f["enhanced"], f["iop"], f["n_frames"]
    if enhanced:
        shared, per0 = frame_groups(ds, 0)
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
        ps = floats(ds.get("PixelSpacing"), 2)
        thick = number(ds.get("SliceThickness"))
        tr, te, ti = number(ds.get("RepetitionTime")), number(ds.get("EchoTime")), number(ds.get("InversionTime"))
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
    except OSError as exc:
        return None, PATH_TOO_LONG if exc.errno == errno.ENAMETOOLONG else "UNREADABLE"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
    except InvalidDicomError:
        # Files written without the 128-byte preamble: accept only if they parse as a dataset with UIDs.
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE, force=True)
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
        if text_value(ds, "Manufacturer") == OWN_MANUFACTURER:
            return None, MODICSCAN_OUTPUT  # our own SEG / SR (--dicom-out) found under the input
        if "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            return None, "INCOMPLETE_HEADER"  # truncated, or no Study/Series UID
        # With stop_before_pixels the PixelData element itself is absent; Rows/Columns tell an image.
        if "Rows" not in ds or "Columns" not in ds or (sop and not is_image_sop_class(sop)):
            return None, "NO_PIXEL_DATA"
        return ds, None
    except Exception:  # noqa: BLE001
        return None, "UNREADABLE"


_COMPARE_CHUNK = 1 << 20


def _pixel_offset(fh) -> int | None:
    """Where the pixel data element starts in the open file ``fh`` (its header read, its value never loaded):
    ``None`` when the file has no pixel data or cannot be parsed."""
    try:
        # force: a file without the 128-byte preamble was accepted by discovery too (its copy is no conflict)
        ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=DEFER_SIZE, force=True)
    except Exception:  # noqa: BLE001 - unreadable: cannot be shown to be the same
        return None
    del ds
    pos = fh.tell()  # stop_before_pixels leaves the file at the pixel data element's tag
    tag = fh.read(4)
    pixel_tags = {(0x7FE0, e) for e in (0x0008, 0x0009, 0x0010)}
    if len(tag) != 4 or not ({struct.unpack("<HH", tag), struct.unpack(">HH", tag)} & pixel_tags):
        return None  # no pixel data element (either byte order)
    return pos


def _same_pixels(path_a: str, path_b: str) -> bool:
    """True when two files hold the same pixel data element, compared a chunk at a time from the element's start
    to the end of the file: a multi-gigabyte (or sparse, hostile) pixel element is never loaded whole into the
    batch process, which has no memory isolation (the studies' workers have)."""
    try:
        with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
            a, b = _pixel_offset(fa), _pixel_offset(fb)
            if a is None or b is None:
                return False
            if os.fstat(fa.fileno()).st_size - a != os.fstat(fb.fileno()).st_size - b:
                return False
            fa.seek(a)
            fb.seek(b)
            while True:
                ca, cb = fa.read(_COMPARE_CHUNK), fb.read(_COMPARE_CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
    except OSError:
        return False


def discover(root: str | Path, cfg: LoadingConfig | None = None, *, exclude=()) -> Discovery:
    """Walk ``root`` (any depth), read headers only, group into studies and series. Folders in ``exclude``
    (the run's output folder) are not entered."""
    cfg = cfg or LoadingConfig()
    root = Path(root)
    skipped: list[SkippedFile] = []
    if root.is_file():
        files = [root]
    else:
        files, skipped = walk_inputs(root, cfg.max_files, exclude)
    studies: dict[str, StudyFiles] = {}
    series_files: dict[tuple, list[tuple[str, object]]] = {}
    first_of_sop: dict[tuple[str, str], tuple[str, tuple]] = {}
    conflicts: dict[tuple, int] = {}
    for path in files:
        ds, reason = _classify_file(path)
        if ds is None:
            skipped.append(SkippedFile(str(path), reason))
            continue
        study_uid = str(ds.StudyInstanceUID)
        f = _orientation_fields(ds)
        iop_key = tuple(np.round(f["iop"], 2)) if f["iop"] else None
        key = (study_uid, str(ds.SeriesInstanceUID), text_value(ds, "PatientID"), iop_key,
               int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        sop = str(ds.get("SOPInstanceUID", path))
        if (study_uid, sop) in first_of_sop:
            first_path, first_key = first_of_sop[(study_uid, sop)]
            if _same_pixels(first_path, str(path)):
                skipped.append(SkippedFile(str(path), "DUPLICATE_INSTANCE"))
            else:
                skipped.append(SkippedFile(str(path), "DUPLICATE_INSTANCE_CONFLICT"))
                for k in {first_key, key}:
                    conflicts[k] = conflicts.get(k, 0) + 1
            continue
        first_of_sop[(study_uid, sop)] = (str(path), key)
        series_files.setdefault(key, []).append((str(path), ds, f))
        if study_uid not in studies:
            studies[study_uid] = StudyFiles(
                study_uid=study_uid, series={},
                patient_id=text_value(ds, "PatientID"), patient_name=text_value(ds, "PatientName"),
                patient_birth_date=text_value(ds, "PatientBirthDate"), accession_number=text_value(ds, "AccessionNumber"),
                study_date=text_value(ds, "StudyDate"), study_description=text_value(ds, "StudyDescription"),
            )
    # One SeriesSummary per (series UID, patient, orientation, matrix); a split series gets a suffixed key.
    per_uid: dict[tuple[str, str], int] = {}
    for key, items in series_files.items():
        study_uid, series_uid = key[0], key[1]
        n_same = per_uid.get((study_uid, series_uid), 0)
        per_uid[(study_uid, series_uid)] = n_same + 1
        skey = series_uid if n_same == 0 else f"{series_uid}#{n_same + 1}"
        path0, ds0, _ = items[0]
        f0 = _summary_fields(ds0)
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
                   "series_uid_original": series_uid, "patient_id": key[2],
                   # every patient's identifiers, not only the study's first one: a redactor must strip them all
                   # (two patients under one StudyInstanceUID: PATIENT_CONFLICT names both patients' files)
                   "patient_name": text_value(ds0, "PatientName"),
                   "patient_birth_date": text_value(ds0, "PatientBirthDate"),
                   "accession_number": text_value(ds0, "AccessionNumber"),
                   "sop_class_uid": str(ds0.get("SOPClassUID", "")),
                   "frame_of_reference_uid": text_value(ds0, "FrameOfReferenceUID"),
                   "samples_per_pixel": int(number(ds0.get("SamplesPerPixel")) or 1),
                   "conflicting_duplicates": conflicts.get(key, 0)},
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

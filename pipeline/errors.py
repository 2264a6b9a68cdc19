"""Per-study failures carry a stable reason code and a sentence a researcher can act on."""

from __future__ import annotations

# Every code a study can fail with.  The README lists them; tests check that each raised code is here.
REASON_CODES: dict[str, str] = {
    "NO_DICOM_FILES": "no readable DICOM image files were found for the study",
    "NO_SAGITTAL_T1": "no sagittal T1-weighted series was identified",
    "NO_SAGITTAL_T2": "no sagittal T2-weighted series was identified",
    "NO_SAGITTAL_SERIES": "the study holds no sagittal series (axial- or coronal-only)",
    "SLICE_SPACING_INCONSISTENT": "slice positions are not evenly spaced (missing or duplicated slice)",
    "GEOMETRY_MISSING": "a required geometry tag (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) is absent",
    "GEOMETRY_INCONSISTENT": "slices of one series disagree in orientation, size or pixel spacing",
    "GEOMETRY_INVALID": "the geometry tags describe no real grid (orientation vectors not unit or not orthogonal, "
                        "pixel spacing not positive or implausible, slices sheared off their normal)",
    "IMAGE_TOO_LARGE": "the series declare more pixels than loading.max_pixels_per_study (checked before decoding)",
    "DUPLICATE_INSTANCE_CONFLICT": "two files share a SOPInstanceUID but hold different pixel data",
    "PATIENT_CONFLICT": "series of different patients (PatientID) share one StudyInstanceUID; they are not mixed",
    "FRAME_OF_REFERENCE_CONFLICT": "the T1 / T2 / STIR series lie in different frames of reference and cannot be "
                                   "aligned",
    "NO_MR_SERIES": "the study holds no MR series (Modality is not MR)",
    "FOLDER_UNREADABLE": "an input folder could not be listed (permission denied or path too long)",
    "PIXEL_DATA_UNREADABLE": "pixel data could not be decoded",
    "TOO_FEW_SLICES": "the series has too few slices to analyse",
    "IMAGE_EMPTY": "the image holds no signal (all voxels equal)",
    "SEGMENTATION_FAILED": "no vertebral bodies could be segmented",
    "NO_LUMBAR_LEVELS": "the field of view does not appear to show the lumbar spine",
    "REFERENCE_MARROW_UNAVAILABLE": "no normal-marrow reference could be built, ratios are undefined",
    "EXTERNAL_MASK_MISSING": "--masks was given but no label image for the study was found",
    "EXTERNAL_MASK_MISMATCH": "the external label image is empty on the study's grid or uses unknown label values",
    "INTERNAL_ERROR": "an unexpected error occurred; see batch.log for the traceback",
    "WORKER_CRASHED": "the worker process processing the study died (crash or out-of-memory kill)",
    "TIMEOUT": "the study exceeded the per-study time limit",
    "OUT_OF_MEMORY": "the study needed more memory than a worker may use (batch.worker_memory_mb) or the machine had",
    "DISK_FULL": "the output disk was full (or a quota reached) while the study's files were written; nothing was "
                 "kept for the study and the run stopped",
}


class StudyError(Exception):
    """A study cannot be analysed.  ``code`` is one of REASON_CODES, ``message`` says why in words."""

    def __init__(self, code: str, message: str, *, details: dict | None = None):
        if code not in REASON_CODES:
            raise ValueError(f"unknown reason code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}

    def __reduce__(self):
        # Exceptions pickle as cls(*self.args); ours takes (code, message), not the one formatted string. Without
        # this, a StudyError raised in a worker process (ProcessPoolExecutor, dask) broke the whole pool instead
        # of reaching the caller.
        return (self.__class__, (self.code, self.message), {"details": self.details})

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "details": self.details}


class ConfigError(Exception):
    """The configuration is invalid; the run stops before any study (exit code 2)."""

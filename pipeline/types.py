"""Typed pieces passed between the pipeline stages.

Geometry convention (read this once, it holds everywhere):

* Every volume handed to the middle stages (segment, measure, classify) is an array in the
  **working frame** ``WORK_AXCODES = ("I", "P", "R")``: axis 0 runs superior -> inferior,
  axis 1 anterior -> posterior, axis 2 patient left -> right (across the sagittal slices).
  ``data[:, :, k]`` is therefore a sagittal slice shown head up, anterior on the left, which is
  also the layout of the real data in ``../shared/data/vertebral-bodies``.
* ``affine`` follows nibabel: it maps voxel indices ``(i, j, k, 1)`` to **RAS+** millimetres
  (x to the patient's Right, y Anterior, z Superior).  DICOM stores geometry in **LPS+**; the loader
  converts with ``diag(-1, -1, 1, 1)`` so no other module ever sees LPS.
* ``spacing`` is the voxel size in mm along the three array axes (the column norms of the affine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

WORK_AXCODES: tuple[str, str, str] = ("I", "P", "R")

# Vertebral level names in label-image order.  Label value = index + 1, so L1 = 1 ... S1 = 6.
LUMBAR_LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5", "S1")
# Thoracic bodies above L1 get 7, 8, ... counting upward (T12 = 7, T11 = 8, ...).
THORACIC_BASE_VALUE = 7
# Bodies whose level could not be named confidently get 101, 102, ... from top to bottom.
UNLABELLED_BASE_VALUE = 101


def level_value(name: str) -> int:
    """Integer written into label images for a level name (documented in README)."""
    if name in LUMBAR_LEVELS:
        return LUMBAR_LEVELS.index(name) + 1
    if name.startswith("T") and name[1:].isdigit():
        return THORACIC_BASE_VALUE + (12 - int(name[1:]))
    if name.startswith("B") and name[1:].isdigit():  # "B3" = third unlabelled body from the top
        return UNLABELLED_BASE_VALUE + int(name[1:]) - 1
    raise ValueError(f"unknown vertebral level name {name!r}")


def value_level(value: int) -> str:
    """Inverse of :func:`level_value`."""
    if 1 <= value <= len(LUMBAR_LEVELS):
        return LUMBAR_LEVELS[value - 1]
    if THORACIC_BASE_VALUE <= value < UNLABELLED_BASE_VALUE:
        return f"T{12 - (value - THORACIC_BASE_VALUE)}"
    if value >= UNLABELLED_BASE_VALUE:
        return f"B{value - UNLABELLED_BASE_VALUE + 1}"
    raise ValueError(f"label value {value} names no level")


@dataclass
class Volume:
    """An image: array in the working frame + RAS affine + where it came from."""

    data: np.ndarray  # float32, working frame (I, P, R)
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    series_uid: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


@dataclass
class SeriesSummary:
    """Header facts about one series, enough to choose its role (no pixel data)."""

    series_uid: str
    study_uid: str
    files: list[str]  # paths of the files holding this series (one for enhanced multi-frame)
    n_frames: int  # number of 2-D images (slices) in the series
    modality: str = ""
    series_description: str = ""
    series_number: int | None = None
    orientation: str = ""  # "sagittal" | "axial" | "coronal" | "oblique" | "unknown"
    image_orientation: tuple[float, ...] | None = None  # DICOM IOP (LPS), 6 floats
    repetition_time: float | None = None  # ms
    echo_time: float | None = None  # ms
    inversion_time: float | None = None  # ms
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    contrast_agent: str = ""
    image_type: tuple[str, ...] = ()
    rows: int | None = None
    columns: int | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    is_localizer: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyFiles:
    """One study as found on disk: its series and the (identifying) header fields."""

    study_uid: str
    series: dict[str, SeriesSummary]  # by SeriesInstanceUID
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""
    root: str = ""  # common folder of the study's files


@dataclass
class SkippedFile:
    path: str
    reason: str  # short code, e.g. NOT_DICOM, UNREADABLE, NO_PIXEL_DATA, EMPTY_FILE


@dataclass
class Discovery:
    studies: dict[str, StudyFiles]
    skipped: list[SkippedFile]
    n_files_seen: int


@dataclass
class RoleChoice:
    role: str  # "T1" | "T2" | "STIR"
    series_uid: str
    confidence: float  # 0..1
    evidence: list[str]  # human-readable reasons, e.g. "TR 550 ms < 1000 ms -> T1-weighted"
    series_description: str = ""
    kind: str = ""  # e.g. "STIR", "T2 fat-sat", "TIRM"


@dataclass
class RoleAssignment:
    roles: dict[str, RoleChoice]  # keys among T1, T2, STIR; T1 and T2 always present on success
    warnings: list[str] = field(default_factory=list)
    candidates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per role: scored runners-up


@dataclass
class VertebralBody:
    level: str  # "L1".."S1", "T12", ... or "B1".. when unlabelled
    value: int  # value in the label image
    centroid_vox: tuple[float, float, float]
    volume_mm3: float


@dataclass
class Segmentation:
    labels: np.ndarray  # int16 label image in the working frame, values per level_value()
    bodies: list[VertebralBody]  # top to bottom
    labelling_confidence: float  # 0..1
    flags: list[str]  # e.g. "COUNT_AMBIGUOUS", "PARTIAL_FOV", "POSSIBLE_TRANSITIONAL_VERTEBRA"
    notes: list[str] = field(default_factory=list)
    body_probability: np.ndarray | None = field(default=None, repr=False)  # P(body) on the labels' grid (max over contrasts), near the bodies

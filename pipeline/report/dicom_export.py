"""DICOM export (``modicscan run --dicom-out``): a DICOM SEG of the vertebral bodies and a DICOM SR (TID 1500).

Per analysed study two files are written beside ``report.json``:

* ``seg.dcm`` -- Segmentation Storage (BINARY), one segment per vertebral body in the label image
  (segment label = level name, e.g. ``L4``).  Its frames follow the **source T2 images**: every source
  frame (single-frame files or the frames of one enhanced multi-frame file) is mapped into the working
  volume through its own ImagePositionPatient / ImageOrientationPatient / PixelSpacing (LPS, converted to
  RAS) and the inverse of the T2 volume affine, and the labels are sampled there with nearest neighbour.
  No assumption about slice order, file order or in-plane flips is needed.  Frames holding no body are
  omitted (highdicom ``omit_empty_frames``).
* ``sr.dcm`` -- Comprehensive 3D SR holding a TID 1500 Measurement Report.  Measurement groups are TID 1411
  volumetric ROI groups that reference the SEG segment of their vertebral body:

  - one group per vertebral body (tracking identifier ``"L4 vertebral body"``): qualitative evaluation
    *Edema* (SCT 79654002) = *Present* (SCT 52101004) / *Absent* (SCT 272519000); edema extent in % of
    the body volume and of the body height (UCUM ``%``), edema confidence (UCUM ``1``), body volume
    (SCT 118565006 *Volume*, UCUM ``mm3``).  Edema is a per-vertebra finding in report.json, so it is
    reported in the body group, not repeated in the endplate groups.
  - one group per endplate (tracking identifier ``"L4 superior endplate"``): qualitative evaluation
    *Modic type* (private code, see below); zone / reference-marrow signal ratios for T1, T2 and STIR
    when present (UCUM ``1``), Modic extent in % of body height and % of zone volume (UCUM ``%``),
    classification confidence (UCUM ``1``); and, for an endplate next to a disc, the Modic type of that disc
    level (private ``DISC-MODIC-TYPE``, from both endplates: report.json ``discs[].modic``).

  Every group has a tracking UID, the algorithm identification (``modicscan`` + version) and a finding
  site: the vertebra code; endplate groups add the topographical modifier (SCT 106233006) *Superior*
  (SCT 264217000) or *Inferior* (SCT 261089000).

Codes
-----
Vertebrae: SCT ``L1 vertebra`` 66794005, ``L2`` 14293000, ``L3`` 36470004, ``L4`` 11994002,
``L5`` 49668003 and thoracic ``T1``..``T12`` (the DICOM CID 7602 / pydicom ``codes.SCT.<n>Vertebra``
codes).  DICOM has no coded S1 vertebra, so S1 uses SCT 54735007 *Sacrum*; bodies whose level could not be
named (``B1``, ``B2``, ...) use SCT 51282000 *Vertebra*.  The segment text label always carries the level
name.  SEG segmented property category: SCT 91723000 *Anatomical Structure* (CID 7150); algorithm
family DCM 123110 *Artificial Intelligence* (CID 7162).  Procedure reported: SCT 363679005 *Imaging
procedure*.  Units: UCUM ``1`` (no units) for ratios / confidences, ``%`` for extents.

Private codes use the coding scheme designator ``99MODICSCAN`` (declared in the SR's Coding Scheme
Identification Sequence): Modic type concept ``MODIC-TYPE`` with values ``MODIC-0`` (no Modic change),
``MODIC-I``, ``MODIC-II``, ``MODIC-III``, ``MODIC-I-II`` (mixed I/II), ``MODIC-II-III`` (mixed II/III);
measurement concepts ``RATIO-T1``, ``RATIO-T2``, ``RATIO-STIR``, ``MODIC-EXT-HEIGHT``,
``MODIC-EXT-VOLUME``, ``MODIC-CONFIDENCE``, ``EDEMA-EXT-VOLUME``, ``EDEMA-EXT-HEIGHT``,
``EDEMA-CONFIDENCE`` (see :data:`PRIVATE_CONCEPTS`).

Identifiers (privacy)
---------------------
The objects follow the identifier mode of the report (``report["study"]["identifiers"]``):

* ``original`` (``--keep-identifiers``): the patient and study attributes of the source T2 images are
  copied unchanged (highdicom copies the Patient / Study modules).
* ``removed`` (default) and ``pseudonymised`` (``--pseudonymise KEY``): before the source datasets are
  handed to highdicom, every Patient / Patient-Study / General-Study attribute is removed except the
  StudyInstanceUID; PatientName becomes the report's study key (``key^``), PatientID the report's keyed patient hash
  (pseudonymised) or the study key (removed); PatientBirthDate, PatientSex, StudyDate, StudyTime,
  AccessionNumber, StudyID and ReferringPhysicianName are written empty; institution / station names are
  dropped so they do not reach the Contributing Equipment Sequence.

In **all** modes the objects keep the source StudyInstanceUID and reference the source T2 series and
SOP instance UIDs (a SEG / SR must, to attach to the study and its images in a PACS).  With ``removed`` /
``pseudonymised`` those UIDs are *indirect identifiers*: whoever holds the source archive can link the
objects back to the patient.  That is accepted here (the JSON report keeps UIDs in ``removed`` mode too);
do not share ``seg.dcm`` / ``sr.dcm`` where the JSON's pseudonymised UIDs were the reason to pseudonymise.

The new objects' UIDs are derived deterministically from the source study / T2 series UIDs, the config
hash and the modicscan version, so re-running the same analysis replaces rather than duplicates them.
"""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.types import level_value

SCHEME = "99MODICSCAN"
SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902

MODIC_CODES: dict[str, tuple[str, str]] = {
    "0": ("MODIC-0", "No Modic change"),
    "I": ("MODIC-I", "Modic type I"),
    "II": ("MODIC-II", "Modic type II"),
    "III": ("MODIC-III", "Modic type III"),
    "I/II": ("MODIC-I-II", "Mixed Modic type I/II"),
    "II/III": ("MODIC-II-III", "Mixed Modic type II/III"),
}

PRIVATE_CONCEPTS: dict[str, str] = {
    "MODIC-TYPE": "Modic type",
    "RATIO-T1": "T1 signal ratio, endplate zone to reference marrow",
    "RATIO-T2": "T2 signal ratio, endplate zone to reference marrow",
    "RATIO-STIR": "STIR signal ratio, endplate zone to reference marrow",
    "MODIC-EXT-HEIGHT": "Modic change extent, percent of vertebral body height",
    "MODIC-EXT-VOLUME": "Modic change extent, percent of endplate zone volume",
    "MODIC-CONFIDENCE": "Modic classification confidence",
    "DISC-MODIC-TYPE": "Modic type of the disc level (both endplates)",
    "EDEMA-EXT-VOLUME": "Marrow edema extent, percent of vertebral body interior volume",
    "EDEMA-EXT-HEIGHT": "Marrow edema extent, percent of vertebral body height",
    "EDEMA-CONFIDENCE": "Marrow edema classification confidence",
}

# SNOMED CT vertebra codes (DICOM CID 7602); S1 -> Sacrum, unnamed bodies -> Vertebra.
_VERTEBRA_SCT: dict[str, tuple[str, str]] = {
    "L1": ("66794005", "L1 vertebra"), "L2": ("14293000", "L2 vertebra"), "L3": ("36470004", "L3 vertebra"),
    "L4": ("11994002", "L4 vertebra"), "L5": ("49668003", "L5 vertebra"), "S1": ("54735007", "Sacrum"),
    "T1": ("64864005", "T1 vertebra"), "T2": ("53733008", "T2 vertebra"), "T3": ("1626008", "T3 vertebra"),
    "T4": ("73071006", "T4 vertebra"), "T5": ("56401006", "T5 vertebra"), "T6": ("45296009", "T6 vertebra"),
    "T7": ("62487009", "T7 vertebra"), "T8": ("11068009", "T8 vertebra"), "T9": ("82687006", "T9 vertebra"),
    "T10": ("7610001", "T10 vertebra"), "T11": ("12989004", "T11 vertebra"), "T12": ("23215003", "T12 vertebra"),
}
_GENERIC_VERTEBRA = ("51282000", "Vertebra")

# Attributes removed from the source datasets (before highdicom copies the Patient / Study modules) unless
# the report keeps the original identifiers.  Type 2 ones are re-added empty (or replaced) afterwards.
_REMOVE_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientBirthDate",
    "PatientBirthTime", "PatientSex", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "EthnicGroup",
    "PatientComments", "PatientAge", "PatientSize", "PatientWeight", "MedicalAlerts", "Allergies", "Occupation",
    "AdditionalPatientHistory", "PregnancyStatus", "SmokingStatus", "PatientState", "ResponsiblePerson",
    "ResponsibleOrganization", "PatientSpeciesDescription", "PatientBreedDescription", "QualityControlSubject",
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "StudyDescription", "ProcedureCodeSequence",
    "ReferencedStudySequence", "RequestingService", "AdmittingDiagnosesDescription", "AdmissionID",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "OperatorsName",
    "PerformingPhysicianName", "DeviceSerialNumber",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
)
_EMPTY_TYPE2 = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                "ReferringPhysicianName")


# ---------------------------------------------------------------------------------------------- codes
def _code(value: str, scheme: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _private(value: str):
    return _code(value, SCHEME, PRIVATE_CONCEPTS[value])


def vertebra_code(level: str):
    """SNOMED CT code of a level name (``S1`` -> Sacrum; unnamed ``B<n>`` -> Vertebra)."""
    value, meaning = _VERTEBRA_SCT.get(level, _GENERIC_VERTEBRA)
    return _code(value, "SCT", meaning)


def modic_code(modic_type: str):
    value, meaning = MODIC_CODES[modic_type]
    return _code(value, SCHEME, meaning)


def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


# ---------------------------------------------------------------------------------------------- geometry
def frame_geometry(ds) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per frame of a source image: (IPP, IOP, PixelSpacing) in DICOM LPS, in stored frame order (read as the
    loader reads them, :func:`pipeline.io.frame_geometry`); every frame must have all three."""
    from pipeline.io.volumes import frame_geometry as read_geometry

    out = read_geometry(ds)
    if any(v is None for geo in out for v in geo):
        raise ValueError(f"source image {ds.get('SOPInstanceUID', '?')} lacks plane geometry for the SEG")
    return [tuple(np.asarray(v, dtype=np.float64) for v in geo) for geo in out]


def sample_labels_on_frame(labels: np.ndarray, affine: np.ndarray, ipp: np.ndarray, iop: np.ndarray,
                           spacing: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Labels (working frame, RAS ``affine``) sampled by nearest neighbour on one source frame's pixel grid.

    Pixel (r, c) of the frame lies at ``IPP + c * dc * IOP[:3] + r * dr * IOP[3:]`` (LPS); LPS -> RAS flips
    x and y; the inverse affine gives fractional voxel indices. Pixels outside the volume get 0.
    """
    flip = np.array([-1.0, -1.0, 1.0])
    inv = np.linalg.inv(affine)
    v0 = inv[:3, :3] @ (ipp * flip) + inv[:3, 3]
    step_r = inv[:3, :3] @ (iop[3:] * float(spacing[0]) * flip)  # one row down
    step_c = inv[:3, :3] @ (iop[:3] * float(spacing[1]) * flip)  # one column right
    r = np.arange(rows, dtype=np.float64)[:, None, None]
    c = np.arange(cols, dtype=np.float64)[None, :, None]
    idx = np.rint(v0 + r * step_r + c * step_c).astype(np.int64)  # (rows, cols, 3)
    shape = np.asarray(labels.shape)
    inside = np.all((idx >= 0) & (idx < shape), axis=-1)
    out = np.zeros((rows, cols), dtype=labels.dtype)
    ii = idx[inside]
    out[inside] = labels[ii[:, 0], ii[:, 1], ii[:, 2]]
    return out


def labels_on_source_frames(labels: np.ndarray, affine: np.ndarray, sources: list) -> np.ndarray:
    """(n_frames, rows, cols) labels in the order highdicom expects: source images in the given order, and
    within a multi-frame source its frames in stored order."""
    planes = []
    for ds in sources:
        rows, cols = int(ds.Rows), int(ds.Columns)
        for ipp, iop, ps in frame_geometry(ds):
            planes.append(sample_labels_on_frame(labels, affine, ipp, iop, ps, rows, cols))
    return np.stack(planes, axis=0)


# ---------------------------------------------------------------------------------------------- identity
def _apply_identity(sources: list, study: dict) -> None:
    """Scrub / replace patient and study identifiers in place per the report's identifier mode (see module doc)."""
    if study.get("identifiers") == "original":
        return
    key = str(study.get("key") or "anonymous")
    patient_id = str(study.get("patient_id") or key) if study.get("identifiers") == "pseudonymised" else key
    for ds in sources:
        for kw in _REMOVE_KEYWORDS:
            if kw in ds:
                delattr(ds, kw)
        ds.PatientName = key + "^"  # a family-name-only person name (PN), i.e. the study key
        ds.PatientID = patient_id
        for kw in _EMPTY_TYPE2:
            setattr(ds, kw, "")


# ---------------------------------------------------------------------------------------------- SEG
def build_seg(sources: list, labels: np.ndarray, affine: np.ndarray, bodies: list, *, uid_seed: tuple):
    """highdicom Segmentation (BINARY) with one segment per vertebral body present on the source grid.

    Returns (seg, {label value: segment number})."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pipeline import __version__

    planes = labels_on_source_frames(labels, affine, sources)
    present = set(np.unique(planes).tolist()) - {0}
    algorithm = hd.AlgorithmIdentificationSequence(name="modicscan", family=codes.DCM.ArtificialIntelligence,
                                                   version=__version__)
    descriptions = []
    segment_of: dict[int, int] = {}
    for body in sorted(bodies, key=lambda b: b.value):
        if body.value not in present:
            continue
        number = len(descriptions) + 1
        segment_of[body.value] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=body.level,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=vertebra_code(body.level),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=_uid(*uid_seed, "segment", body.level), tracking_id=f"{body.level} vertebral body",
        ))
    if not descriptions:
        raise ValueError("no vertebral body lies on the source T2 images; nothing to put into a DICOM SEG")
    lut = np.zeros(int(max(int(labels.max()), max(segment_of))) + 1, dtype=np.uint8)
    for value, number in segment_of.items():
        lut[value] = number
    pixel = lut[np.clip(planes, 0, None)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=_uid(*uid_seed, "seg-series"),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=_uid(*uid_seed, "seg-instance"), instance_number=1,
        manufacturer="modicscan", manufacturer_model_name="modicscan", software_versions=__version__,
        device_serial_number="none", content_label="VERTEBRAE",
        content_description="Vertebral bodies (modicscan research output, not for diagnosis)",
    )
    seg.SeriesDescription = "modicscan vertebral bodies"
    return seg, segment_of


# ---------------------------------------------------------------------------------------------- SR
def _measurement(name, value, unit):
    """One TID 300 numeric measurement (the algorithm is named once per group, not per measurement)."""
    import highdicom as hd

    return hd.sr.Measurement(name=name, value=float(value), unit=unit)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def build_measurement_groups(report: dict, seg, segment_of: dict[int, int], *, uid_seed: tuple) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pipeline import __version__

    algorithm = hd.sr.AlgorithmIdentification(name="modicscan", version=__version__)
    ratio_unit = codes.UCUM.NoUnits
    pct = codes.UCUM.Percent
    groups = []
    disc_modic = disc_modic_by_endplate(report)
    for vert in report.get("vertebrae", []):
        level = vert["level"]
        value = int(vert.get("label_value") or level_value(level))
        number = segment_of.get(value)
        if number is None:  # body not on the source images (cannot happen for the T2 grid; be safe)
            continue
        ref = hd.sr.ReferencedSegment.from_segmentation(seg, number)
        site = vertebra_code(level)

        edema = vert.get("edema") or {}
        measurements = []
        if _finite(vert.get("volume_mm3")):
            measurements.append(_measurement(codes.SCT.Volume, vert["volume_mm3"], codes.UCUM.CubicMillimeter))
        for concept, key in (("EDEMA-EXT-VOLUME", "extent_volume_pct"), ("EDEMA-EXT-HEIGHT", "extent_height_pct")):
            if _finite(edema.get(key)):
                measurements.append(_measurement(_private(concept), edema[key], pct))
        if _finite(edema.get("confidence")):
            measurements.append(_measurement(_private("EDEMA-CONFIDENCE"), edema["confidence"], ratio_unit))
        evaluations = []
        if "present" in edema:
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=codes.SCT.Edema, value=codes.SCT.Present if edema["present"] else codes.SCT.Absent))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(*uid_seed, "track", level, "body"),
                                                          identifier=f"{level} vertebral body"),
            referenced_segment=ref, algorithm_id=algorithm, finding_sites=[hd.sr.FindingSite(site)],
            measurements=measurements or None, qualitative_evaluations=evaluations or None,
        ))

        for side, modifier in (("superior", codes.SCT.Superior), ("inferior", codes.SCT.Inferior)):
            ep = (vert.get("endplates") or {}).get(side)
            if not ep:
                continue
            measurements = []
            signal = ((vert.get("zones") or {}).get(side) or {}).get("signal") or {}
            for role in ("T1", "T2", "STIR"):
                ratio = (signal.get(role) or {}).get("ratio")
                if _finite(ratio):
                    measurements.append(_measurement(_private(f"RATIO-{role}"), ratio, ratio_unit))
            for concept, key in (("MODIC-EXT-HEIGHT", "extent_height_pct"), ("MODIC-EXT-VOLUME", "extent_volume_pct")):
                if _finite(ep.get(key)):
                    measurements.append(_measurement(_private(concept), ep[key], pct))
            if _finite(ep.get("confidence")):
                measurements.append(_measurement(_private("MODIC-CONFIDENCE"), ep["confidence"], ratio_unit))
            evaluations = [hd.sr.QualitativeEvaluation(name=_private("MODIC-TYPE"), value=modic_code(ep["modic_type"]))]
            if (level, side) in disc_modic:
                evaluations.append(hd.sr.QualitativeEvaluation(name=_private("DISC-MODIC-TYPE"),
                                                               value=modic_code(disc_modic[level, side])))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(*uid_seed, "track", level, side),
                                                              identifier=f"{level} {side} endplate"),
                referenced_segment=ref, algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(site, topographical_modifier=modifier)],
                measurements=measurements or None, qualitative_evaluations=evaluations,
            ))
    return groups


def disc_modic_by_endplate(report: dict) -> dict[tuple[str, str], str]:
    """(level, side) of each endplate next to a disc -> the Modic type of that disc level."""
    out = {}
    for d in report.get("discs", []):
        mtype = (d.get("modic") or {}).get("modic_type")
        if mtype is not None:
            out[d["upper"], "inferior"] = mtype
            out[d["lower"], "superior"] = mtype
    return out


def build_sr(sources: list, seg, report: dict, segment_of: dict[int, int], *, uid_seed: tuple):
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    from pipeline import __version__

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("modicscan-device", __version__), name="modicscan", manufacturer_name="modicscan",
            model_name="modicscan", serial_number=__version__),
    )
    measurement_report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=build_measurement_groups(report, seg, segment_of, uid_seed=uid_seed),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg], content=measurement_report, series_instance_uid=_uid(*uid_seed, "sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=_uid(*uid_seed, "sr-instance"), instance_number=1,
        manufacturer="modicscan", is_complete=True, is_final=False, is_verified=False,
    )
    sr.SeriesDescription = "modicscan Modic / edema measurements (research)"
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "modicscan private codes"
    scheme.CodingSchemeResponsibleOrganization = "modicscan project"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


# ---------------------------------------------------------------------------------------------- entry point
def _to_bytes(ds) -> bytes:
    buf = _io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_dicom_outputs(out_dir: Path, report: dict, artefacts: dict[str, Any], source_files: list[str]) -> list[str]:
    """Write ``seg.dcm`` and ``sr.dcm`` for one analysed study; returns the file names written.

    ``source_files`` are the files of the T2 series the labels live on (``artefacts["volumes"]["T2"]``).
    """
    import pydicom

    from pipeline.io.atomic import write_bytes_atomic
    from pipeline.io.tags import DEFER_SIZE

    if not source_files:
        raise ValueError("DICOM export needs the source T2 files (artefacts['t2_files'])")
    t2 = artefacts["volumes"]["T2"]
    seg_result = artefacts["segmentation"]
    sources = [pydicom.dcmread(f, defer_size=DEFER_SIZE, force=True)  # force: files without preamble (discovery)
               for f in source_files]  # private blobs stay on disk
    series_uids = {str(ds.SeriesInstanceUID) for ds in sources}
    if series_uids != {t2.series_uid}:
        raise ValueError(f"source files belong to series {sorted(series_uids)}, not the T2 series {t2.series_uid}")
    uid_seed = (str(sources[0].StudyInstanceUID), t2.series_uid, (report.get("config") or {}).get("hash", ""),
                report.get("software", {}).get("version", ""))
    _apply_identity(sources, report.get("study") or {})
    seg, segment_of = build_seg(sources, seg_result.labels, t2.affine, seg_result.bodies, uid_seed=uid_seed)
    sr = build_sr(sources, seg, report, segment_of, uid_seed=uid_seed)
    out_dir = Path(out_dir)
    write_bytes_atomic(out_dir / SEG_FILE, _to_bytes(seg))
    write_bytes_atomic(out_dir / SR_FILE, _to_bytes(sr))
    return [SEG_FILE, SR_FILE]


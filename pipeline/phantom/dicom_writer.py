"""Phantom DICOM: headers of a realistic vendor, classic single-frame and enhanced multi-frame MR
datasets, stored values, transfer syntaxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from pipeline.phantom.scenarios import _TRANSFER_SYNTAXES

_SEQ_PARAMS = {
    # TR, TE, TI (ms), echo train length, flip angle, ScanningSequence, SequenceVariant, ScanOptions
    "T1": {"tr": 550.0, "te": 10.0, "ti": None, "etl": 3, "flip": 150.0, "ss": ["SE"], "sv": ["SK", "SP", "OSP"],
           "so": ["PFP"], "contrast": "T1"},
    "T2": {"tr": 3500.0, "te": 100.0, "ti": None, "etl": 15, "flip": 150.0, "ss": ["SE"], "sv": ["SK", "SP", "OSP"],
           "so": ["PFP"], "contrast": "T2"},
    "STIR": {"tr": 4000.0, "te": 60.0, "ti": 150.0, "etl": 13, "flip": 150.0, "ss": ["SE", "IR"],
             "sv": ["SK", "SP", "MP"], "so": ["IR"], "contrast": "T2"},
}


def _ds_str(v: float) -> str:
    """DICOM DS value, at most 16 characters, deterministic."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def _uid(*parts: Any) -> str:
    return generate_uid(entropy_srcs=["modicscan-phantom"] + [str(p) for p in parts])


def _fake_date(rng: np.random.Generator, start_year: int, end_year: int) -> str:
    y = int(rng.integers(start_year, end_year + 1))
    m = int(rng.integers(1, 13))
    d = int(rng.integers(1, 29))
    return f"{y:04d}{m:02d}{d:02d}"


def _study_header(seed: int, vendor: dict[str, Any], patient_name: str, patient_id: str, rng: np.random.Generator,
                  key: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    study_date = _fake_date(rng, 2016, 2024)
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    ds.AccessionNumber = f"ACC{seed:07d}"
    ds.Modality = "MR"
    ds.Manufacturer = vendor["manufacturer"]
    ds.ManufacturerModelName = vendor["model"]
    ds.InstitutionName = "PHANTOM GENERAL HOSPITAL"
    ds.ReferringPhysicianName = "PHANTOM^REFERRER"
    ds.StationName = f"PHMR{seed % 10}"
    ds.StudyDescription = "LUMBAR SPINE"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = _fake_date(rng, 1940, 1995)
    ds.PatientSex = "F" if seed % 2 else "M"
    ds.PatientAge = f"{int(study_date[:4]) - int(ds.PatientBirthDate[:4]):03d}Y"
    ds.PatientWeight = _ds_str(float(np.round(rng.uniform(55, 105), 0)))
    ds.BodyPartExamined = "LSPINE"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(key, "study")
    ds.FrameOfReferenceUID = _uid(key, "for")
    ds.PositionReferenceIndicator = ""
    ds.StudyID = f"{seed % 100000}"
    return ds


def _write_dataset(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    ts = _TRANSFER_SYNTAXES[transfer_syntax]
    if ts != ExplicitVRLittleEndian:
        # pydicom's RLE encoder / pylibjpeg-openjpeg / pyjpegls, all lossless; keep our deterministic UID
        ds.compress(ts, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "MODICSCAN_PH1"
    return meta


def _store(values: np.ndarray, bits: int, slope: float, intercept: float) -> np.ndarray:
    """Physical values -> stored uint16 (rounded, clipped to BitsStored)."""
    stored = np.rint((values - intercept) / slope)
    return np.clip(stored, 0, 2 ** bits - 1).astype(np.uint16)


def _to_stored(values: np.ndarray, vendor: dict[str, Any], rescale: bool):
    bits = vendor["bits"]
    if rescale:
        # Philips-style: stored integers use the full 12-bit range and RescaleSlope maps them back
        slope = float(np.round(max(float(values.max()), 1.0) / 4000.0, 6)) or 1.0
        intercept = 0.0
    else:
        slope, intercept = 1.0, 0.0
    return _store(values, bits, slope, intercept), slope, intercept, bits


def _grid_affine(grid_s, grid_a, grid_x, px: float, thickness: float, off: np.ndarray) -> np.ndarray:
    """voxel (i, j, k) of a model-frame (I, P, R) array -> RAS mm, given the LPS offsets of the model origin."""
    spacing = np.array([abs(grid_s[1] - grid_s[0]) if len(grid_s) > 1 else thickness,
                        px, abs(grid_x[1] - grid_x[0]) if len(grid_x) > 1 else thickness])
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, -spacing[0]]
    affine[:3, 1] = [0.0, -spacing[1], 0.0]
    affine[:3, 2] = [spacing[2], 0.0, 0.0]
    lps0 = np.array([-grid_x[0] + off[0], grid_a[0] + off[1], -grid_s[0] + off[2]])
    affine[:3, 3] = [-lps0[0], -lps0[1], lps0[2]]
    return affine


def _frames(stored, grid_s, grid_a, grid_x, orientation, off) -> list[dict[str, Any]]:
    """2-D frames in acquisition order (ascending along the slice normal) with their geometry."""
    frames = []
    if orientation == "sagittal":
        # row cosine +P, column cosine -S (= I); normal = row x col = -L = patient Right
        iop = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        for k in range(stored.shape[2]):
            ipp = [-grid_x[k] + off[0], grid_a[0] + off[1], -grid_s[0] + off[2]]
            # SliceLocation = position along the normal (patient Right), i.e. -L
            frames.append({"pixels": np.ascontiguousarray(stored[:, :, k]), "ipp": ipp, "iop": iop,
                           "slice_location": float(-ipp[0]), "index": k})
    else:
        # row cosine +L, column cosine +P; normal = +S: ascending position = going up = descending s
        iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        for k in range(stored.shape[0] - 1, -1, -1):
            # pixel column c runs toward patient Left, i.e. toward decreasing x (model) -> reversed columns
            ipp = [-grid_x[-1] + off[0], grid_a[0] + off[1], -grid_s[k] + off[2]]
            frames.append({"pixels": np.ascontiguousarray(stored[k, :, ::-1]), "ipp": ipp, "iop": iop,
                           "slice_location": float(-grid_s[k] + off[2]), "index": k})
    return frames


def _mr_params(role: str, vendor: dict[str, Any]) -> dict[str, Any]:
    p = dict(_SEQ_PARAMS[role])
    if vendor["field"] >= 3.0 and role == "STIR":
        p["ti"] = 210.0  # fat nulls later at 3 T
    if vendor["manufacturer"].startswith("GE"):
        p["ss"] = ["IR"] if role == "STIR" else ["SE"]
        p["so"] = ["IR_GEMS", "FAST_GEMS"] if role == "STIR" else ["FAST_GEMS", "FC"]
        p["sv"] = ["SK"]
    elif vendor["manufacturer"].startswith("Philips"):
        p["ss"] = ["IR"] if role == "STIR" else ["SE"]
        p["so"] = ["IR"] if role == "STIR" else ["OTHER"]
        p["sv"] = ["SK"] if role != "STIR" else ["SK", "MP"]
    return p


def _window(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values[::2, ::2, ::2], [1, 99.5])
    return float(np.round((lo + hi) / 2)), float(np.round(max(hi - lo, 1.0)))


def _classic_dataset(header: Dataset, frame: dict[str, Any], instance: int, c: dict[str, Any]) -> Dataset:
    role, vendor = c["role"], c["vendor"]
    p = _mr_params(role, vendor)
    sop_uid = _uid(c["key"], "sop", role, frame["index"])
    ds = Dataset()
    ds.update(header)
    ds.file_meta = _file_meta(MRImageStorage, sop_uid)
    ds.ImageType = vendor["image_type"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesDescription = c["desc"]
    ds.ProtocolName = c["desc"]
    ds.ScanningSequence = p["ss"]
    ds.SequenceVariant = p["sv"]
    ds.ScanOptions = p["so"]
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = vendor["seqname"][role]
    ds.SliceThickness = _ds_str(c["thickness"])
    ds.RepetitionTime = _ds_str(p["tr"])
    ds.EchoTime = _ds_str(p["te"])
    if p["ti"] is not None:
        ds.InversionTime = _ds_str(p["ti"])
    ds.NumberOfAverages = "2" if role == "T1" else "1"
    ds.ImagingFrequency = _ds_str(42.577478 * vendor["field"])
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds_str(vendor["field"])
    ds.SpacingBetweenSlices = _ds_str(c["thickness"])
    ds.EchoTrainLength = p["etl"]
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "190" if role == "T1" else "220"
    ds.FlipAngle = _ds_str(p["flip"])
    ds.SeriesInstanceUID = c["series_uid"]
    ds.SeriesNumber = c["num"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds_str(v) for v in frame["ipp"]]
    ds.ImageOrientationPatient = [_ds_str(v) for v in frame["iop"]]
    ds.SliceLocation = _ds_str(frame["slice_location"])
    _pixel_module(ds, frame["pixels"], c)
    return ds


def _pixel_module(ds: Dataset, pixels: np.ndarray, c: dict[str, Any]) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.PixelSpacing = [_ds_str(c["px"]), _ds_str(c["px"])]
    ds.BitsAllocated = 16
    ds.BitsStored = c["bits"]
    ds.HighBit = c["bits"] - 1
    ds.PixelRepresentation = 0
    center, width = _window(c["values"])
    ds.WindowCenter = _ds_str(center)
    ds.WindowWidth = _ds_str(width)
    if c["slope"] != 1.0 or c["intercept"] != 0.0:
        ds.RescaleIntercept = _ds_str(c["intercept"])
        ds.RescaleSlope = _ds_str(c["slope"])
        ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()


def _enhanced_dataset(header: Dataset, frames: list[dict[str, Any]], perm: np.ndarray, c: dict[str, Any]) -> Dataset:
    """Enhanced MR Image (multi-frame) with shared / per-frame functional groups."""
    role, vendor = c["role"], c["vendor"]
    p = _mr_params(role, vendor)
    sop_uid = _uid(c["key"], "sop-mf", role)
    ds = Dataset()
    ds.update(header)
    ds.file_meta = _file_meta(EnhancedMRImageStorage, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ContentTime = header.StudyTime
    ds.AcquisitionDateTime = header.StudyDate + header.StudyTime
    ds.SeriesDescription = c["desc"]
    ds.ProtocolName = c["desc"]
    ds.SeriesInstanceUID = c["series_uid"]
    ds.SeriesNumber = c["num"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    ds.MagneticFieldStrength = _ds_str(vendor["field"])
    ds.ContentQualification = "PRODUCT"
    ds.ImagedNucleus = "1H"
    ds.ImagingFrequency = _ds_str(42.577478 * vendor["field"])
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = p["contrast"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PulseSequenceName = vendor["seqname"][role]
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "YES"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    # legacy-style acquisition tags kept at top level as many scanners do (role detection reads either)
    ds.ScanningSequence = p["ss"]
    ds.SequenceVariant = p["sv"]
    ds.ScanOptions = p["so"]
    ds.SliceThickness = _ds_str(c["thickness"])
    ds.SpacingBetweenSlices = _ds_str(c["thickness"])

    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [_ds_str(c["px"]), _ds_str(c["px"])]
    pm.SliceThickness = _ds_str(c["thickness"])
    pm.SpacingBetweenSlices = _ds_str(c["thickness"])
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = [_ds_str(v) for v in frames[0]["iop"]]
    shared.PlaneOrientationSequence = Sequence([po])
    timing = Dataset()
    timing.RepetitionTime = p["tr"]
    timing.FlipAngle = p["flip"]
    timing.EchoTrainLength = p["etl"]
    timing.RFEchoTrainLength = p["etl"]
    timing.GradientEchoTrainLength = 0
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = p["te"]
    shared.MREchoSequence = Sequence([echo])
    mod = Dataset()
    mod.InversionRecovery = "YES" if p["ti"] is not None else "NO"
    if p["ti"] is not None:
        mod.InversionTimes = [p["ti"]]
    mod.FlowCompensation = "NONE"
    mod.T2Preparation = "NO"
    mod.SpatialPresaturation = "NONE"
    mod.PartialFourier = "NO"
    mod.ParallelAcquisition = "NO"
    shared.MRModifierSequence = Sequence([mod])
    fc = Dataset()
    fc.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    fc.PixelPresentation = "MONOCHROME"
    fc.VolumetricProperties = "VOLUME"
    fc.VolumeBasedCalculationTechnique = "NONE"
    fc.ComplexImageComponent = "MAGNITUDE"
    fc.AcquisitionContrast = p["contrast"]
    shared.MRImageFrameTypeSequence = Sequence([fc])
    pvt = Dataset()
    pvt.WindowCenter, pvt.WindowWidth = (_ds_str(v) for v in _window(c["values"]))
    shared.FrameVOILUTSequence = Sequence([pvt])
    if c["slope"] != 1.0 or c["intercept"] != 0.0:
        pvx = Dataset()
        pvx.RescaleIntercept = _ds_str(c["intercept"])
        pvx.RescaleSlope = _ds_str(c["slope"])
        pvx.RescaleType = "US"
        shared.PixelValueTransformationSequence = Sequence([pvx])
    fov = Dataset()
    fov.InPlanePhaseEncodingDirection = "ROW"  # sagittal spine: phase encoding anterior-posterior
    fov.MRAcquisitionFrequencyEncodingSteps = int(frames[0]["pixels"].shape[0])
    fov.MRAcquisitionPhaseEncodingStepsInPlane = int(frames[0]["pixels"].shape[1])
    fov.MRAcquisitionPhaseEncodingStepsOutOfPlane = 1
    fov.PercentSampling = 100.0
    fov.PercentPhaseFieldOfView = 100.0
    shared.MRFOVGeometrySequence = Sequence([fov])
    avg = Dataset()
    avg.NumberOfAverages = 2.0 if role == "T1" else 1.0
    shared.MRAveragesSequence = Sequence([avg])
    rx = Dataset()
    rx.ReceiveCoilName = "SPINE"
    rx.ReceiveCoilManufacturerName = vendor["manufacturer"]
    rx.ReceiveCoilType = "MULTICOIL"
    rx.QuadratureReceiveCoil = "NO"
    shared.MRReceiveCoilSequence = Sequence([rx])
    txc = Dataset()
    txc.TransmitCoilName = "BODY"
    txc.TransmitCoilManufacturerName = vendor["manufacturer"]
    txc.TransmitCoilType = "BODY"
    shared.MRTransmitCoilSequence = Sequence([txc])
    imod = Dataset()
    imod.PixelBandwidth = 190.0 if role == "T1" else 220.0
    imod.TransmitterFrequency = 42.577478 * vendor["field"]
    imod.MagnetizationTransfer = "NONE"
    imod.BloodSignalNulling = "NO"
    imod.Tagging = "NONE"
    shared.MRImagingModifierSequence = Sequence([imod])
    anat = Dataset()
    region = Dataset()
    region.CodeValue = "122496003"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Lumbar spine"
    anat.AnatomicRegionSequence = Sequence([region])
    anat.FrameLaterality = "U"
    shared.FrameAnatomySequence = Sequence([anat])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.AcquisitionContextSequence = Sequence([])
    ds.PresentationLUTShape = "IDENTITY"

    stack_uid = "1"
    dim_org = _uid(c["key"], "dimorg", role)
    org = Dataset()
    org.DimensionOrganizationUID = dim_org
    ds.DimensionOrganizationSequence = Sequence([org])
    ds.DimensionOrganizationType = "3D"
    idx = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111)):  # StackID, InStackPositionNumber
        d = Dataset()
        d.DimensionOrganizationUID = dim_org
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = group
        idx.append(d)
    ds.DimensionIndexSequence = Sequence(idx)

    per_frame = []
    pixel_stack = []
    for pos in perm:  # frame order may differ from spatial order, like InstanceNumber in classic files
        fr = frames[int(pos)]
        f = Dataset()
        content = Dataset()
        content.StackID = stack_uid
        content.InStackPositionNumber = int(pos) + 1
        content.DimensionIndexValues = [1, int(pos) + 1]
        content.FrameAcquisitionDateTime = header.StudyDate + header.StudyTime
        content.FrameReferenceDateTime = header.StudyDate + header.StudyTime
        content.FrameAcquisitionDuration = 180000.0 / len(frames)  # ms, a 3-minute series
        f.FrameContentSequence = Sequence([content])
        pp = Dataset()
        pp.ImagePositionPatient = [_ds_str(v) for v in fr["ipp"]]
        f.PlanePositionSequence = Sequence([pp])
        per_frame.append(f)
        pixel_stack.append(fr["pixels"])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    _pixel_module(ds, np.stack(pixel_stack), c)
    # PixelSpacing / WindowCenter / Rescale belong in the functional groups for this IOD
    for kw in ("PixelSpacing", "WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope", "RescaleType"):
        if kw in ds:
            delattr(ds, kw)
    return ds


def _apply_extra(ds: Dataset, extra_tags: dict[str, Any] | None) -> None:
    for kw, value in (extra_tags or {}).items():
        if value is None:
            if kw in ds:
                delattr(ds, kw)
        else:
            setattr(ds, kw, value)

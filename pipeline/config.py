"""The one typed configuration object, loaded from YAML and validated before any study runs.

Each stage owns one section.  Every field carries its allowed range (or choices) in ``metadata`` so
that a wrong key, a wrong type or an out-of-range value stops the run with one message naming the key
and what is allowed.  ``configs/default.yaml`` documents every key; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


def _f(default: Any, lo: float | None = None, hi: float | None = None, choices: tuple | None = None, doc: str = ""):
    """A config field with its allowed range / choices and a one-line meaning."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "doc": doc}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoadingConfig:
    min_slices: int = _f(5, 1, 10000, doc="series with fewer slices are not analysed")
    spacing_tolerance: float = _f(0.1, 0.0, 1.0, doc="allowed relative deviation of slice gaps from their median")
    max_files: int = _f(200000, 1, 10_000_000, doc="refuse to scan more files than this per run")
    max_pixels_per_study: int = _f(100_000_000, 1_000_000, 5_000_000_000, doc="pixels the series to analyse may "
                                   "declare together (decoded stack or 1.5 mm working grid, whichever is larger), "
                                   "checked from the headers before decoding; more => IMAGE_TOO_LARGE")
    min_pixel_spacing_mm: float = _f(0.05, 0.001, 1.0, doc="PixelSpacing below this is not a real MR pixel => GEOMETRY_INVALID")
    max_pixel_spacing_mm: float = _f(10.0, 1.0, 100.0, doc="PixelSpacing above this is not a real MR pixel => GEOMETRY_INVALID")


@dataclass
class RolesConfig:
    sagittal_min_cosine: float = _f(0.8, 0.0, 1.0, doc="|slice normal . LR axis| above which a series counts as sagittal")
    t1_max_tr_ms: float = _f(1000.0, 100.0, 5000.0, doc="TR below which a spin-echo series is T1-weighted")
    t1_max_te_ms: float = _f(30.0, 1.0, 200.0, doc="TE below which a spin-echo series is T1-weighted")
    t2_min_te_ms: float = _f(60.0, 10.0, 300.0, doc="TE above which a long-TR series is T2-weighted")
    stir_max_ti_ms: float = _f(250.0, 50.0, 1000.0, doc="TI at or below which an inversion-recovery series nulls fat (STIR/TIRM)")
    accept_t2_fatsat_as_stir: bool = _f(True, doc="use a fat-saturated T2 series as the fluid-sensitive series when no STIR")


@dataclass
class SegmentationConfig:
    body_model: str = _f("auto", choices=("auto", "classifier", "unet", "onepass"), doc="what gives the body "
                         "probability: the 2.5-D U-Net after the classifier's column search, with an edge refiner "
                         "(ONNX Runtime; better outlines and level names on the real volumes), the one-pass net alone "
                         "on whole slices (trained with domain randomisation and on single-slice crops), the two-stage "
                         "pixel classifier, or auto: the one-pass net for a single-slice study, the U-Net otherwise")
    min_body_volume_ml: float = _f(4.0, 0.1, 200.0, doc="connected components smaller than this are not vertebral bodies")
    max_body_volume_ml: float = _f(150.0, 1.0, 1000.0, doc="components larger than this are split or discarded")
    probability_threshold: float = _f(0.5, 0.05, 0.95, doc="voxels with body probability above this form the body mask")
    grow_threshold: float = _f(0.2, 0.05, 0.95, doc="the bodies found at probability_threshold grow into neighbouring "
                               "voxels above this (the split between bodies is unchanged); equal to probability_threshold: off")
    grow_max_mm: float = _f(3.0, 0.0, 10.0, doc="a growing body takes no voxel farther than this from its part found at "
                            "probability_threshold (0: no growth)")
    max_off_axis_mm: float = _f(25.0, 5.0, 100.0, doc="components farther than this from the spinal column line are dropped")
    complete_max_mm: float = _f(10.0, 0.0, 20.0, doc="a body shorter than its neighbours next to an abnormally wide gap is extended by at most this")
    sacral_tilt_deg: float = _f(30.0, 5.0, 60.0, doc="a lowest lumbar body tilted more than this is flagged as possibly transitional")
    major_body_fraction: float = _f(0.45, 0.1, 1.0, doc="components smaller than this fraction of a typical body are fragments, not levels")
    smooth_mm: float = _f(5.0, 0.0, 10.0, doc="per body and slice, notches narrower than this are closed and holes filled (0: off)")
    refine_edges: bool = _f(True, doc="re-decide the voxels within 4 mm of each body surface at the input resolution "
                            "(edge classifier of the shipped model; onepass: by its probability, edge_threshold)")
    extra_contrasts: bool = _f(True, doc="also run the body model on T1 / STIR near the bodies T2 found and keep the "
                               "voxel-wise maximum (marrow that looks unlike a body on T2 rarely does on all); false: "
                               "bodies from T2 alone (faster; T1 / STIR are still measured)")
    int8: bool = _f(True, doc="run the body nets' int8 versions (ONNX Runtime static quantisation, "
                    "pipeline.training.quantize_nets): 2-3 x faster nets, per-body Dice within 0.001 of the float "
                    "nets' on the real scans; false: the float nets")
    edge_threshold: float = _f(0.5, 0.0, 0.95, doc="onepass: body surfaces at the input resolution where the interpolated "
                               "probability crosses this (within 1.5 mm of the working-grid surface; 0: off)")


@dataclass
class MeasurementConfig:
    endplate_band_mm: float = _f(8.0, 1.0, 30.0, doc="thickness of the superior / inferior endplate zone, measured from the endplate")
    endplate_band_max_fraction: float = _f(0.4, 0.05, 0.5, doc="band never exceeds this fraction of the local body height")
    core_margin_fraction: float = _f(0.3, 0.05, 0.45, doc="the reference core leaves this fraction of the height free at each endplate")
    height_zone_fraction: float = _f(0.15, 0.05, 0.4, doc="anterior / posterior height is taken over this fraction of the AP depth")


@dataclass
class ClassificationConfig:
    t1_low: float = _f(0.8, 0.1, 1.0, doc="T1 ratio below this is 'low' (Modic I, III)")
    t1_high: float = _f(1.2, 1.0, 5.0, doc="T1 ratio above this is 'high' (Modic II)")
    fluid_high: float = _f(1.5, 1.0, 10.0, doc="STIR (or T2) ratio above this is 'high' (edema, Modic I)")
    fluid_low: float = _f(0.8, 0.1, 1.0, doc="STIR ratio below this is 'low' (Modic II, III)")
    min_zone_fraction: float = _f(0.12, 0.0, 1.0, doc="fraction of an endplate band that must show a type for it to count")
    cortex_exclusion_mm: float = _f(2.0, 0.0, 10.0, doc="voxels this close to the body surface (endplates, rim, lateral surface across slices: cortex, partial volume) are neither typed nor counted for edema")
    t2_low: float = _f(0.6, 0.1, 1.0, doc="T2 ratio below this is 'low' (Modic III); cross-validated on SPIDER (README)")
    t2_iso_min: float = _f(1.1, 0.1, 2.0, doc="T2 ratio at or above this is 'high' enough for Modic II when there is no "
                           "STIR (fat is bright on fast spin-echo T2); cross-validated on SPIDER (README)")
    edema_min_fraction: float = _f(0.12, 0.0, 1.0, doc="fraction of a body's interior voxels (cortex_exclusion_mm inside its surface) that must be fluid-bright for edema")
    diffuse_edema_volume_pct: float = _f(50.0, 10.0, 100.0, doc="edema above this % of the body's interior is diffuse, not an endplate (Modic) change")
    edema_adjacent_fraction: float = _f(0.3, 0.0, 1.0, doc="edema counts as endplate-adjacent when this fraction of it lies in the endplate bands")
    fracture_height_ratio: float = _f(0.8, 0.3, 1.0, doc="a height ratio at or below this (>= 20 % height loss) with edema flags a possible acute fracture")
    disc_bright_ratio: float = _f(1.3, 1.0, 5.0, doc="disc T2 median / median of the study's discs at or above this is 'bright'")
    single_slice_confidence: float = _f(0.6, 0.0, 1.0, doc="confidences are multiplied by this on a single-slice study "
                                        "(one sagittal slice per series: a change off that slice is not seen)")
    disc_model: str = _f("model", choices=("model", "thresholds"), doc="per-disc Modic presence: 'model' = the "
                         "shipped model on both endplate bands, the disc and the patient's other discs (cross-validated "
                         "on SPIDER, README); 'thresholds' = the union of the two endplates' threshold types")


@dataclass
class EdemaConfig:
    """The voxel-wise marrow-edema rule (``classify.edema_mask``), calibrated on real STIR against two readers'
    edema masks (../shared/data/edema-sij, leave-one-patient-out; figures in the README)."""

    reference_scale_mm: float = _f(40.0, 0.0, 500.0, doc="the normal-marrow reference follows slow shading over this scale "
                                   "(Gaussian sigma, mm); 0: one reference for the whole bone region")
    reference_trim_quantile: float = _f(0.75, 0.3, 1.0, doc="marrow voxels above this quantile of the region's STIR "
                                        "(edema, vessels) are left out of the shading map of the reference")
    smooth_mm: float = _f(0.0, 0.0, 5.0, doc="Gaussian sigma (mm) of the STIR / T1 before the ratios; 0: none")
    seed_ratio: float = _f(2.4, 1.0, 10.0, doc="a region is edema only if it reaches this STIR ratio somewhere (hysteresis high)")
    grow_ratio: float = _f(1.6, 1.0, 10.0, doc="an edema region extends over the connected voxels above this STIR ratio "
                           "(hysteresis low)")
    t1_max_ratio: float = _f(1.5, 1.0, 10.0, doc="voxels brighter than this T1 ratio (fat) are never edema")
    min_volume_mm3: float = _f(10.0, 0.0, 10000.0, doc="edema regions smaller than this are dropped (noise)")


@dataclass
class ReportConfig:
    pseudonymise_key: str = _f("", doc="HMAC key: when set, patient and study identifiers are replaced by keyed hashes")
    keep_identifiers: bool = _f(False, doc="write original patient / study identifiers (off by default)")


@dataclass
class BatchConfig:
    jobs: int = _f(1, 1, 256, doc="worker processes")
    study_timeout_s: float = _f(600.0, 1.0, 86400.0, doc="a study running longer than this is abandoned with TIMEOUT")
    worker_memory_mb: int = _f(0, 0, 16_777_216, doc="address-space limit of each worker process in MiB (0: none); a "
                               "study needing more fails with OUT_OF_MEMORY instead of reaching the job's or the "
                               "machine's memory limit")


@dataclass
class Config:
    loading: LoadingConfig = field(default_factory=LoadingConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    measurement: MeasurementConfig = field(default_factory=MeasurementConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    edema: EdemaConfig = field(default_factory=EdemaConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_dict_public(self) -> dict[str, Any]:
        """The config as written into outputs: the pseudonymisation key is a secret and never leaves the run."""
        d = self.to_dict()
        d["report"]["pseudonymise_key"] = "<set>" if d["report"]["pseudonymise_key"] else ""
        return d

    def hash(self) -> str:
        """Stable hash of everything that changes results (identity options and job count excluded)."""
        d = self.to_dict()
        d.pop("batch", None)
        d["report"] = {k: v for k, v in d["report"].items() if k not in ("pseudonymise_key",)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    origin = typing.get_origin(annotation)
    if origin is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(inner is Any or _type_ok(v, inner) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    return True


_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def _short(value: Any) -> str:
    """A value as an error message may show it: a few dozen characters, never a whole expanded structure."""
    return _SHORT.repr(value)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _build_section(cls: type, raw: Any, where: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{where}' must be a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}.{str(key)[:60]}'; allowed keys: {', '.join(sorted(fields))}")
        f = fields[key]
        ann = hints[key]
        if dataclasses.is_dataclass(ann):
            kwargs[key] = _build_section(ann, value, f"{where}.{key}")
            continue
        if not _type_ok(value, ann):
            raise ConfigError(
                f"config key '{where}.{key}' must be of type {_type_name(ann)}, got {_short(value)} ({type(value).__name__})"
            )
        if isinstance(value, float) and not math.isfinite(value):  # .nan passes every range test
            raise ConfigError(f"config key '{where}.{key}' = {value!r} is not a finite number")
        lo, hi, choices = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"config key '{where}.{key}' = {_short(value)} is not allowed; allowed values: {list(choices)}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ConfigError(f"config key '{where}.{key}' = {value!r} is out of range; allowed: {lo} to {hi}")
        if ann is float:
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    """Validate a plain mapping (as read from YAML) and build the typed config."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the config file must hold a mapping of sections (loading, roles, ...)")
    hints = typing.get_type_hints(Config)
    allowed = {f.name for f in dataclasses.fields(Config)}
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"unknown config section '{str(key)[:60]}'; allowed sections: {', '.join(sorted(allowed))}")
    return Config(**{name: _build_section(hints[name], raw.get(name), name) for name in allowed})


MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; anything larger is a mistake (or an attack)
MAX_CONFIG_DEPTH = 8  # sections hold keys hold values: 3 levels; lists of lists at most a few more


class _ConfigLoader(yaml.SafeLoader):
    """YAML without anchors / aliases: a config needs none, and a few hundred bytes of nested aliases expand
    into billions of list items (a "billion laughs" bomb) as soon as anything looks at the value."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.YAMLError("anchors and aliases (&name, *name) are not allowed in a config "
                                 f"(line {event.start_mark.line + 1})")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; ConfigError (one line) for anything else.

    Refused cheaply, before any expansion: files over 1 MiB, text that is not UTF-8, anchors / aliases, nesting
    deeper than :data:`MAX_CONFIG_DEPTH`.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with open(p, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {p} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config holds a few keys")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())[:200]  # one short line, whatever the parser said
        raise ConfigError(f"config file {p} is not valid YAML: {first}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (loading, roles, ...)")
    return raw


def load_config(path: str | Path | None = None) -> Config:
    """Read a YAML file (or the built-in defaults when ``path`` is None) into a validated Config."""
    if path is None:
        return Config()
    return config_from_dict(read_config_file(path))

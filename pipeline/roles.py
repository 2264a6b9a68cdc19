"""Stage 2: which sagittal series is the T1, the T2 and the STIR — decided from the acquisition headers.

Physics first (TR, TE, TI, ScanningSequence IR, fat suppression in ScanOptions, contrast agent, ImageType);
the SeriesDescription is only a tie-breaker, or the evidence of last resort when timing tags are missing
(then with lower confidence). Every choice carries the tag values that decided it.

Before any choice, what must never be mixed is refused: series of different patients under one
StudyInstanceUID (``PATIENT_CONFLICT``), and chosen series in different frames of reference
(``FRAME_OF_REFERENCE_CONFLICT``: their affines cannot be compared). Only MR series are candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.config import RolesConfig
from pipeline.errors import StudyError
from pipeline.types import RoleAssignment, RoleChoice, SeriesSummary, StudyFiles

MR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage and its enhanced / legacy-converted kin
_FS_OPTIONS = {"FS", "SFS", "FAT_SAT", "FATSAT", "SP_FS", "FSA", "FSP", "FSA_GEMS", "FSS_GEMS", "FSI_GEMS", "SPIR", "SPAIR", "CHESS"}
_DERIVED_WORDS = ("WATER", "FAT", "IN_PHASE", "OUT_PHASE", "OPP_PHASE", "MPR", "SUB", "PROJECTION IMAGE", "MIP")


def _desc_has(desc: str, *words: str) -> bool:
    d = desc.lower()
    return any(re.search(rf"(^|[^a-z0-9]){re.escape(w)}([^a-z0-9]|$)", d) for w in words)


@dataclass
class _Kind:
    kind: str  # T1, T2, STIR, T2FS, FLAIR, PD, OTHER
    confidence: float
    evidence: list[str]


def weighting(s: SeriesSummary, cfg: RolesConfig) -> _Kind:
    """What contrast a series carries, from its timing and sequence tags."""
    tr, te, ti = s.repetition_time, s.echo_time, s.inversion_time
    ev: list[str] = []
    ir = "IR" in s.scanning_sequence or "IR" in s.scan_options or any("IR" == o for o in s.scan_options) or \
        any(o.startswith("IR_") for o in s.scan_options)
    fs = bool(set(s.scan_options) & _FS_OPTIONS) or any("FS" in o.split("_") for o in s.scan_options)
    desc = s.series_description
    if ir or (ti is not None and ti > 0):
        ev.append(f"inversion recovery (ScanningSequence {'/'.join(s.scanning_sequence) or '-'}, TI {ti} ms)")
        if ti is not None and ti <= cfg.stir_max_ti_ms:
            ev.append(f"TI {ti:g} ms <= {cfg.stir_max_ti_ms:g} ms nulls fat -> STIR/TIRM")
            return _Kind("STIR", 0.95, ev)
        if ti is not None and ti > cfg.stir_max_ti_ms:
            ev.append(f"TI {ti:g} ms > {cfg.stir_max_ti_ms:g} ms -> FLAIR-type inversion, not STIR")
            return _Kind("FLAIR", 0.8, ev)
        if _desc_has(desc, "stir", "tirm"):
            ev.append(f"no TI; description '{desc}' says STIR/TIRM")
            return _Kind("STIR", 0.6, ev)
        return _Kind("OTHER", 0.3, ev)
    if tr is not None and te is not None:
        if tr < cfg.t1_max_tr_ms and te <= cfg.t1_max_te_ms:
            ev.append(f"TR {tr:g} ms < {cfg.t1_max_tr_ms:g} ms and TE {te:g} ms <= {cfg.t1_max_te_ms:g} ms -> T1-weighted")
            return _Kind("T1", 0.95 if not fs else 0.7, ev + (["fat suppressed (ScanOptions)"] if fs else []))
        if tr >= cfg.t1_max_tr_ms * 1.5 and te >= cfg.t2_min_te_ms:
            ev.append(f"TR {tr:g} ms and TE {te:g} ms >= {cfg.t2_min_te_ms:g} ms -> T2-weighted")
            if fs:
                ev.append(f"fat suppression in ScanOptions {'/'.join(s.scan_options)} -> T2 fat-sat")
                return _Kind("T2FS", 0.9, ev)
            return _Kind("T2", 0.95, ev)
        if tr >= cfg.t1_max_tr_ms * 1.5 and te < cfg.t2_min_te_ms:
            ev.append(f"long TR {tr:g} ms with short TE {te:g} ms -> proton density")
            return _Kind("PD", 0.7, ev)
        ev.append(f"TR {tr:g} ms / TE {te:g} ms fit no standard weighting")
    else:
        ev.append("TR / TE missing from the header")
    # Timing tags missing or ambiguous: the description is the evidence of last resort.
    if _desc_has(desc, "stir", "tirm"):
        return _Kind("STIR", 0.5, ev + [f"description '{desc}' says STIR/TIRM"])
    if _desc_has(desc, "t1", "t1w", "t1_tse", "t1_fse"):
        return _Kind("T1", 0.5, ev + [f"description '{desc}' says T1"])
    if _desc_has(desc, "t2", "t2w"):
        if _desc_has(desc, "fs", "fatsat", "fat sat", "spair", "spir"):
            return _Kind("T2FS", 0.45, ev + [f"description '{desc}' says fat-saturated T2"])
        return _Kind("T2", 0.5, ev + [f"description '{desc}' says T2"])
    return _Kind("OTHER", 0.2, ev)


def _is_derived(s: SeriesSummary) -> bool:
    it = " ".join(s.image_type)
    return "DERIVED" in s.image_type or any(w in it for w in _DERIVED_WORDS)


def _is_post_contrast(s: SeriesSummary) -> bool:
    agent = (s.contrast_agent or "").strip().lower()
    return bool(agent and agent not in ("none", "no", "0")) or _desc_has(s.series_description, "+c", "gd", "gad", "post", "km")


def _quality(s: SeriesSummary) -> tuple:
    """Preference among candidates of one role: more slices, finer pixels, then the later series (repeat)."""
    px = s.pixel_spacing[0] * s.pixel_spacing[1] if s.pixel_spacing else 1e6
    return (min(s.n_frames, 40), -px, s.series_number or 0)


def _is_mr(s: SeriesSummary) -> bool:
    """Modality MR; without a Modality, an MR storage class (or no storage class known either)."""
    if s.modality:
        return s.modality.strip().upper() == "MR"
    sop = str(s.extra.get("sop_class_uid", ""))
    return not sop or sop == MR_SOP_CLASS_PREFIX or sop.startswith(MR_SOP_CLASS_PREFIX + ".")


def check_one_patient(study: StudyFiles) -> None:
    """Series of two patients under one StudyInstanceUID are never analysed together (PATIENT_CONFLICT)."""
    ids = {str(s.extra.get("patient_id") or "") for s in study.series.values()} - {""}
    if len(ids) > 1:
        n_series = len(study.series)
        raise StudyError("PATIENT_CONFLICT", f"the study's {n_series} series carry {len(ids)} different PatientIDs "
                         "under one StudyInstanceUID (two patients' studies, e.g. from an archive that reused the "
                         "UID); none is analysed, so that no patient's findings are mixed with another's",
                         details={"n_patient_ids": len(ids)})


def check_one_frame_of_reference(chosen: dict[str, SeriesSummary]) -> None:
    """The chosen series are aligned through their affines: only meaningful in one frame of reference."""
    frames = {role: str(s.extra.get("frame_of_reference_uid") or "") for role, s in chosen.items()}
    if len(set(frames.values()) - {""}) > 1:
        groups: dict[str, list[str]] = {}
        for role, uid in frames.items():
            groups.setdefault(uid or "(none)", []).append(role)
        split = " vs ".join("+".join(roles) for roles in groups.values())
        raise StudyError("FRAME_OF_REFERENCE_CONFLICT", f"the chosen series lie in {len(groups)} different "
                         f"frames of reference ({split}: FrameOfReferenceUID differs), so their positions cannot "
                         "be compared; they may come from different sessions or patients")


def assign_roles(study: StudyFiles, cfg: RolesConfig | None = None) -> RoleAssignment:
    """Choose the sagittal T1, T2 and (optional) STIR series; raise StudyError when T1 or T2 is missing."""
    cfg = cfg or RolesConfig()
    check_one_patient(study)
    warnings: list[str] = []
    others: list[str] = []  # series that are no sagittal MR candidates, and why
    seen: list[str] = []  # sagittal MR series and the weighting found
    sagittal: list[tuple[SeriesSummary, float, list[str]]] = []
    mr = [s for s in study.series.values() if _is_mr(s)]
    if not mr:
        kinds = sorted({s.modality or "not given" for s in study.series.values()})
        raise StudyError("NO_MR_SERIES", f"the study holds no MR series (Modality {', '.join(kinds)}); only MR "
                         "series are analysed")
    for s in study.series.values():
        name = f"'{s.series_description or s.series_uid}'"
        if not _is_mr(s):
            others.append(f"{name}: Modality {s.modality or 'not given'}, not MR")
            continue
        if s.is_localizer:
            others.append(f"{name}: localiser")
            continue
        if s.image_orientation is None:
            others.append(f"{name}: no ImageOrientationPatient")
            continue
        iop = np.asarray(s.image_orientation)
        normal = np.cross(iop[:3], iop[3:])
        cos_lr = abs(normal[0]) / max(np.linalg.norm(normal), 1e-9)
        if cos_lr < cfg.sagittal_min_cosine:
            others.append(f"{name}: {s.orientation} (|normal.LR| = {cos_lr:.2f})")
            continue
        geo_conf = 1.0 if cos_lr > 0.98 else 0.8
        geo_ev = [f"sagittal (slice normal . LR = {cos_lr:.2f})" + ("" if cos_lr > 0.98 else ", oblique")]
        sagittal.append((s, geo_conf, geo_ev))
    if not sagittal:
        raise StudyError("NO_SAGITTAL_SERIES", "the study holds no sagittal MR series; series seen: "
                         + ("; ".join(others) or "none"))

    cands: dict[str, list[tuple]] = {"T1": [], "T2": [], "STIR": [], "T2FS": []}
    for s, geo_conf, geo_ev in sagittal:
        k = weighting(s, cfg)
        conf, ev = k.confidence * geo_conf, geo_ev + k.evidence
        if _is_derived(s):
            conf *= 0.5
            ev.append(f"derived image ({'/'.join(s.image_type)})")
        post = _is_post_contrast(s)
        if post:
            ev.append(f"post-contrast (ContrastBolusAgent '{s.contrast_agent}' / description)")
        seen.append(f"'{s.series_description or s.series_uid}': {k.kind}")
        if k.kind in cands:
            # Native series before post-contrast, primary before derived, then quality.
            cands[k.kind].append(((not post, not _is_derived(s), _quality(s)), s, conf, ev, post))

    roles: dict[str, RoleChoice] = {}
    candidates_out: dict[str, list[dict]] = {}

    def pick(role: str, pool: list[tuple], kind: str) -> RoleChoice | None:
        if not pool:
            return None
        pool = sorted(pool, key=lambda c: c[0], reverse=True)
        _, s, conf, ev, post = pool[0]
        if len(pool) > 1:
            ev = ev + [f"chosen over {len(pool) - 1} other candidate(s): native / primary / more slices / finer pixels / later series"]
            conf *= 0.95
        if post:
            warnings.append(f"only a post-contrast {role} series was found; it is used as the {role}")
            conf *= 0.7
        candidates_out[role] = [{"series_uid": c[1].series_uid, "series_description": c[1].series_description,
                                 "confidence": round(c[2], 3)} for c in pool[1:]]
        return RoleChoice(role=role, series_uid=s.series_uid, confidence=round(float(conf), 3), evidence=ev,
                          series_description=s.series_description, kind=kind)

    t1 = pick("T1", cands["T1"], "T1")
    t2 = pick("T2", cands["T2"], "T2")
    if t2 is None and cands["T2FS"] and not cands["STIR"]:
        t2 = pick("T2", cands["T2FS"], "T2 fat-sat")
        if t2 is not None:
            warnings.append("no plain T2 series: the fat-saturated T2 is used as the T2")
            cands["T2FS"] = []
    listing = "sagittal series seen: " + "; ".join(seen) + (f"; other series: {'; '.join(others)}" if others else "")
    if t1 is None:
        raise StudyError("NO_SAGITTAL_T1", "no sagittal T1-weighted series was identified; " + listing)
    if t2 is None:
        raise StudyError("NO_SAGITTAL_T2", "no sagittal T2-weighted series was identified; " + listing)
    roles["T1"], roles["T2"] = t1, t2
    stir = pick("STIR", cands["STIR"], "STIR")
    if stir is None and cfg.accept_t2_fatsat_as_stir and cands["T2FS"]:
        stir = pick("STIR", cands["T2FS"], "T2 fat-sat")
        if stir is not None:
            stir.evidence.append("no STIR/TIRM: the fat-saturated T2 serves as the fluid-sensitive series")
            stir.confidence = round(stir.confidence * 0.9, 3)
    if stir is not None:
        roles["STIR"] = stir
    else:
        warnings.append("no sagittal STIR / fat-saturated T2 series: edema is judged from T2 with lower confidence")
    check_one_frame_of_reference({role: study.series[c.series_uid] for role, c in roles.items()})
    return RoleAssignment(roles=roles, warnings=warnings, candidates=candidates_out)

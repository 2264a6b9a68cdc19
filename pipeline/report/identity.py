"""Identifiers in outputs: study keys, keyed hashes (HMAC-SHA256) and the identifier mode
(default, pseudonymised, kept)."""

from __future__ import annotations

import hashlib
import hmac

from pipeline.types import StudyFiles


# ---------------------------------------------------------------------------------------------- identity
def keyed_hash(value: str, key: str, n: int = 16) -> str:
    """HMAC-SHA256 of ``value`` under ``key``: stable across runs, not reversible without the key."""
    return hmac.new(key.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()[:n]


def study_key(study_uid: str, pseudonymise_key: str = "") -> str:
    """Name of the study's output folder: a hash of the StudyInstanceUID, never a patient name or ID."""
    if pseudonymise_key:
        return keyed_hash("study:" + study_uid, pseudonymise_key)
    return hashlib.sha256(("modicscan-study:" + study_uid).encode("utf-8")).hexdigest()[:16]


class Identity:
    """Decides which identifiers reach the outputs: removed (default), pseudonymised (HMAC) or original."""

    def __init__(self, pseudonymise_key: str = "", keep_identifiers: bool = False):
        if pseudonymise_key and keep_identifiers:
            raise ValueError("--pseudonymise and --keep-identifiers exclude each other")
        self.key = pseudonymise_key
        self.keep = keep_identifiers

    @property
    def mode(self) -> str:
        return "original" if self.keep else "pseudonymised" if self.key else "removed"

    def uid(self, uid: str, kind: str) -> str | None:
        """Study / series UIDs: kept by default (they are not direct identifiers), hashed when pseudonymising."""
        if self.key:
            return "2.25." + str(int(keyed_hash(f"{kind}:{uid}", self.key, 30), 16))
        return uid

    def patient_id(self, value: str) -> str | None:
        if self.keep:
            return value or None
        if self.key and value:
            return keyed_hash("patient:" + value, self.key)
        return None

    def study_block(self, study: StudyFiles, input_hash: str, n_files: int, source_folder: str | None) -> dict:
        return {
            "key": study_key(study.study_uid, self.key),
            "study_uid": self.uid(study.study_uid, "study"),
            "identifiers": self.mode,
            "patient_id": self.patient_id(study.patient_id),
            "patient_name": (study.patient_name or None) if self.keep else None,
            "study_date": (study.study_date or None) if self.keep else None,
            "input_hash": input_hash,
            "n_files": n_files,
            # Folder names can carry patient names: only with --keep-identifiers.
            "source_folder": source_folder if self.keep else None,
        }

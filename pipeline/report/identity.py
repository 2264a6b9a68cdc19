"""Identifiers in outputs: study keys, keyed hashes (HMAC-SHA256), the identifier mode (default,
pseudonymised, kept) and the redaction of identifying text (names, IDs, dates, descriptions, paths) from
free text such as messages and evidence."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Any

from pipeline.types import StudyFiles

_MIN_NEEDLE = 3  # shorter strings (a file named "1", a name "Li") would also hit ordinary words and numbers
# Values that hold text from the input (tags, file names, exception messages); everything else in a record is
# built by us from measurements (levels, Modic types, flags) and must not be touched: "III" is a name suffix too.
FREE_TEXT_KEYS = frozenset({"series_description", "study_description", "evidence", "warnings", "message", "details"})
_ROMAN = re.compile(r"^[ivxlcdm]+$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- identity
def keyed_hash(value: str, key: str, n: int = 16) -> str:
    """HMAC-SHA256 of ``value`` under ``key``: stable across runs, not reversible without the key."""
    # surrogateescape: a path whose name is not UTF-8 (Latin-1 "M\xfcller") is hashed as its bytes, never an error
    return hmac.new(key.encode("utf-8"), value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:n]


def study_key(study_uid: str, pseudonymise_key: str = "") -> str:
    """Name of the study's output folder: a hash of the StudyInstanceUID, never a patient name or ID."""
    if pseudonymise_key:
        return keyed_hash("study:" + study_uid, pseudonymise_key)
    return hashlib.sha256(("modicscan-study:" + study_uid).encode("utf-8")).hexdigest()[:16]


def public_path(path: str, pseudonymise_key: str) -> str:
    """An input folder or file name as outputs may show it: a keyed hash when pseudonymising."""
    if pseudonymise_key and path:
        return "path-" + keyed_hash("path:" + path, pseudonymise_key, 12)
    return path


def _date_forms(dicom_date: str) -> list[str]:
    """A DICOM date (YYYYMMDD) as it may be typed into free text."""
    d = dicom_date.strip()
    if len(d) != 8 or not d.isdigit():
        return [d]
    y, m, day = d[:4], d[4:6], d[6:]
    return [d, f"{y}-{m}-{day}", f"{day}.{m}.{y}", f"{day}/{m}/{y}", f"{m}/{day}/{y}", f"{y}/{m}/{day}"]


def _name_forms(person_name: str) -> list[str]:
    """A DICOM person name (Family^Given^Middle^Prefix^Suffix): whole, as words, and each of its words."""
    words = [w for w in re.split(r"[\^\s,=]+", person_name) if w]
    return [person_name, " ".join(words), " ".join(reversed(words)), *words]


class Redactor:
    """Replaces identifying substrings of free text (messages, descriptions, evidence) by placeholders.

    Matching ignores case and takes whole words only (letters and digits; "_" separates), longest needle first:
    a path goes before the file name inside it, and a patient called "Ann" leaves "Annotated" alone.
    """

    def __init__(self, replacements: dict[str, str] | None = None):
        self._token: dict[str, str] = {}
        for needle, token in (replacements or {}).items():
            needle = needle.strip()
            if len(needle) >= _MIN_NEEDLE and not _ROMAN.match(needle):
                self._token.setdefault(needle.lower(), token)
        self._compiled: re.Pattern | None = None

    @property
    def _pattern(self) -> re.Pattern | None:
        """Compiled on first use: a study of thousands of files takes a second to compile."""
        if self._compiled is None and self._token:
            needles = sorted(self._token, key=len, reverse=True)
            # A needle ends where letters and digits end: "_" and "-" separate words in folder and file names
            self._compiled = re.compile(r"(?<![^\W_])(?:" + "|".join(map(re.escape, needles)) + r")(?![^\W_])",
                                        re.IGNORECASE)
        return self._compiled

    def text(self, value: str) -> str:
        if not value or not self._token:
            return value
        return self._pattern.sub(lambda m: self._token.get(m.group(0).lower(), "[removed]"), value)

    def walk(self, obj: Any, free_text: bool = False) -> Any:
        """A record (report, error record) with the strings under :data:`FREE_TEXT_KEYS` redacted."""
        if not self._token:
            return obj
        if isinstance(obj, str):
            return self.text(obj) if free_text else obj
        if isinstance(obj, dict):
            return {k: self.walk(v, free_text or k in FREE_TEXT_KEYS) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.walk(v, free_text) for v in obj]
        return obj


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

    def redactor(self, study: StudyFiles, files: list[str] = (), input_root: str = "",
                 source_folder: str = "") -> Redactor:
        """What to strip from the study's free text in this mode.

        Default: the patient's own name, ID, birth date and the accession number, and the input file names
        (error messages name a file by its number in the study's sorted file list instead). Pseudonymised:
        also the series and study descriptions and the input and study folder paths. Kept: nothing.
        """
        if self.keep:
            return Redactor()
        rep: dict[str, str] = {}
        for i, f in enumerate(files, 1):
            names = [f, os.path.basename(f)] + ([os.path.relpath(f, input_root)] if input_root else [])
            rep.update(dict.fromkeys(_path_forms(names), f"[file #{i}]"))
        if self.key:
            # whole paths only: single folder names ("DICOM", "T2") would also hit ordinary words of a message
            if input_root:
                rep.update(dict.fromkeys(_path_forms([input_root]), "[input folder]"))
                rep.update(dict.fromkeys(_path_forms([os.path.join(input_root, source_folder)]), "[study folder]"))
            rep.update(dict.fromkeys(_path_forms([source_folder, study.root]), "[study folder]"))
            for s in study.series.values():
                label = f"[series {s.series_number}]" if s.series_number is not None else "[series description]"
                rep[s.series_description] = label
                # a series without a description is named by its UID in messages: hashed UIDs only in this mode
                rep[s.series_uid] = rep[str(s.extra.get("series_uid_original") or s.series_uid)] = label
            rep[study.study_uid] = "[study uid]"
            rep[study.study_description] = "[study description]"
        rep.update(_patient_needles(study))  # last: they win over a folder or description with the same text
        return Redactor(rep)

    def patients_redactor(self, studies) -> Redactor:
        """The identifiers of every patient of the run, for paths no single study owns (skipped files)."""
        if self.keep:
            return Redactor()
        rep: dict[str, str] = {}
        for study in studies:
            rep.update(_patient_needles(study))
        return Redactor(rep)


def _path_forms(paths) -> list[str]:
    """Paths as the OS gives them (a name that is not UTF-8 holds lone surrogates) and as messages and JSON show
    them (:func:`pipeline.io.walk.shown`: ``\\xfc`` escapes): a redactor must find both."""
    from pipeline.io.walk import shown

    out = []
    for p in paths:
        if p:
            out += [p, shown(p)]
    return out


def _byte_forms(text: str) -> list[str]:
    """``text`` (a name from a header, decoded) as it appears in a path written by a Latin-1 system: the file
    system gives bytes that are not UTF-8, shown as lone surrogates or ``\\xfc`` escapes ("M\\xfcller")."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return []
    if raw == text.encode("utf-8"):
        return []  # plain ASCII: the same in every form
    return _path_forms([os.fsdecode(raw)])


def _patient_needles(study: StudyFiles) -> dict[str, str]:
    """The patient's own name, ID, birth date and the accession number, with their placeholders; and those of every
    other patient whose series share the StudyInstanceUID (their files are named in the study's messages)."""
    people = [(study.patient_name, study.patient_id, study.patient_birth_date, study.accession_number)]
    people += [(str(s.extra.get("patient_name") or ""), str(s.extra.get("patient_id") or ""),
                str(s.extra.get("patient_birth_date") or ""), str(s.extra.get("accession_number") or ""))
               for s in study.series.values()]
    rep: dict[str, str] = {}
    for name, pid, birth, accession in dict.fromkeys(people):
        for form in _name_forms(name):
            rep.update(dict.fromkeys([form, *_byte_forms(form)], "[patient name]"))
        rep.update(dict.fromkeys([pid, *_byte_forms(pid)], "[patient id]"))
        rep.update(dict.fromkeys(_date_forms(birth), "[birth date]"))
        rep.update(dict.fromkeys([accession, *_byte_forms(accession)], "[accession number]"))
    return rep

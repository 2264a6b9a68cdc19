"""Input folders that yielded no study: which count as a failed study, and which are merely skipped.

A top-level input folder that held files but no usable DICOM series is a *failed study* only when something
in it looked like an attempt at DICOM (an empty ``.dcm``, a truncated header, an image without pixels, ...).
A folder of files that are plainly not DICOM (``truth/``, ``notes/``: NIfTI, JSON, text, PNG), or one of our own
output folders, is *skipped*: listed in ``batch.json`` (``skipped_folders``; our outputs in ``skipped_files``
only), not failed, exit code unchanged.
A folder the OS would not list (permission denied, path past the OS limit) is always a failed record of its
own (``FOLDER_UNREADABLE``), wherever it lies: a study may be in it, so the batch must not look complete.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.io.walk import (
    BROKEN_LINK,
    FOLDER_SEEN_BEFORE,
    MODICSCAN_OUTPUT,
    NOT_A_FILE,
    PATH_TOO_LONG,
    UNREADABLE_FOLDER,
    shown,
)
from pipeline.types import SkippedFile, StudyFiles

# Skip reasons that say "this was never meant to be a DICOM image".
NOT_A_STUDY_REASONS = frozenset({"NOT_DICOM", "DICOMDIR", MODICSCAN_OUTPUT, FOLDER_SEEN_BEFORE, BROKEN_LINK, NOT_A_FILE})
UNREADABLE_REASONS = frozenset({UNREADABLE_FOLDER, PATH_TOO_LONG})
_FOLDER_REASONS = UNREADABLE_REASONS | {FOLDER_SEEN_BEFORE, MODICSCAN_OUTPUT}


@dataclass
class FolderVerdict:
    folder: str  # relative to the input root, printable
    status: str  # "failed" | "skipped"
    code: str  # NO_DICOM_FILES | FOLDER_UNREADABLE for failed; NO_DICOM_IMAGES for skipped
    message: str
    n_files: int

    def key_for(self, pseudonymise_key: str = "") -> str:
        """The folder's entry key in batch.json: a keyed hash when pseudonymising (a plain hash of a folder name such
        as a patient's could be confirmed by hashing guessed names)."""
        if pseudonymise_key:
            from pipeline.report.identity import keyed_hash

            return "folder-" + keyed_hash("folder:" + self.folder, pseudonymise_key, 10)
        return "folder-" + hashlib.sha256(os.fsencode(self.folder)).hexdigest()[:10]


def _top(path: str, root: Path, is_folder: bool) -> str:
    rel = Path(os.path.relpath(path, root)).parts
    if is_folder:
        return rel[0] if rel and rel[0] != "." else ""
    return rel[0] if len(rel) > 1 else ""


def folder_verdicts(root: Path, skipped: list[SkippedFile], studies: dict[str, StudyFiles]) -> list[FolderVerdict]:
    """One verdict per unreadable folder and per top-level folder that held files but yielded no study."""
    covered: set[str] = set()
    for st in studies.values():
        for s in st.series.values():
            covered.update(_top(f, root, False) for f in s.files)
    out: list[FolderVerdict] = []
    groups: dict[str, list[SkippedFile]] = {}
    for sk in skipped:
        if sk.reason == MODICSCAN_OUTPUT:
            continue  # our own outputs: listed in skipped_files, never a study nor a folder to report
        if sk.reason in UNREADABLE_REASONS:
            rel = shown(os.path.relpath(sk.path, root))
            why = ("the path is longer than the operating system allows" if sk.reason == PATH_TOO_LONG
                   else "it could not be listed (permission denied or an I/O error)")
            out.append(FolderVerdict(rel, "failed", "FOLDER_UNREADABLE", f"this input folder was not read: {why}; "
                                     "any study inside it is missing from this batch", 0))
            continue
        top = _top(sk.path, root, sk.reason in _FOLDER_REASONS)
        if top and top not in covered:
            groups.setdefault(top, []).append(sk)
    for top, items in sorted(groups.items()):
        reasons = sorted({s.reason for s in items})
        n_files = sum(s.reason not in _FOLDER_REASONS for s in items)
        if set(reasons) <= NOT_A_STUDY_REASONS:
            out.append(FolderVerdict(shown(top), "skipped", "NO_DICOM_IMAGES",
                                     f"no DICOM image here ({n_files} file(s): {', '.join(reasons)}); not a study", n_files))
        else:
            out.append(FolderVerdict(shown(top), "failed", "NO_DICOM_FILES",
                                     f"{n_files} file(s) in this folder could not be used ({', '.join(reasons)}); "
                                     "no DICOM image series found", n_files))
    return out

"""Walking an input tree: every file to read, and every folder or link not read, with its reason.

Nothing under the input may be lost silently, and nothing of ours may be read back as input:

* directory symlinks are followed (a study is often reached through one); a folder reached a second time
  (a link loop, or two links to one folder) is read once, the later visit is listed as ``FOLDER_SEEN_BEFORE``;
* a folder that cannot be listed is listed as ``UNREADABLE_FOLDER``, a path past the OS limit as
  ``PATH_TOO_LONG``, a dangling link as ``BROKEN_LINK``, a FIFO / socket / device as ``NOT_A_FILE``;
* our own output folders are not entered (``MODICSCAN_OUTPUT``): the run's OUT folder when it lies inside
  the input, and any sub-folder holding a modicscan ``batch.json`` (an earlier run's output); when OUT is
  INPUT itself, the run's files at its top (lock, reserve, ``batch.json``, ``batch.log``, cohort tables, temp
  files) and its study folders (holding our ``report.json`` / ``error.json``) are listed the same way, also
  when a later run meets that folder below its own input (its ``batch.json`` says ``output_is_input``: the
  studies in it are input, not output);
* file and folder names are kept as the OS gives them (``str`` with surrogate escapes for bytes that are
  not UTF-8, so the files can still be opened); :func:`shown` turns such a path into text for messages
  and JSON.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import StudyError
from pipeline.types import SkippedFile

# Skip reasons of folders and links (files get theirs in discovery).
UNREADABLE_FOLDER = "UNREADABLE_FOLDER"
PATH_TOO_LONG = "PATH_TOO_LONG"
FOLDER_SEEN_BEFORE = "FOLDER_SEEN_BEFORE"
BROKEN_LINK = "BROKEN_LINK"
NOT_A_FILE = "NOT_A_FILE"
MODICSCAN_OUTPUT = "MODICSCAN_OUTPUT"

_BATCH_RECORD = re.compile(r"^batch(\.shard-\d+-of-\d+)?\.json$")
_STUDY_RECORD = re.compile(r"^(report|error)\.json$")
_OUR_RECORD_TYPE = re.compile(r'"report_type":\s*"modicscan\.(batch|study_report|study_error)"')
_OUTPUT_IS_INPUT = re.compile(r'"output_is_input":\s*true')
OUTPUT, OUTPUT_IN_INPUT = "output", "output in input"  # is_modicscan_output: skip the folder / enter it
# What a run leaves at the top of its OUT folder besides the study folders (OUT == INPUT: never read as input)
_OWN_TOP_FILES = re.compile(r"^(\.modicscan\.(lock|reserve)(\.shard-\d+-of-\d+)?|batch(\.shard-\d+-of-\d+)?\.json"
                            r"|batch\.log|cohort\.(csv|parquet)|summary\.json|\..+\.\d+\..*tmp.*)$")


def shown(path: str | os.PathLike) -> str:
    """``path`` as printable text: bytes that are not UTF-8 (a Latin-1 ``M\\xfcller``) become ``\\xfc``
    escapes instead of the lone surrogates Python keeps internally (those cannot be encoded, hashed or
    written to JSON)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def os_reason(exc: OSError) -> str:
    """The skip reason of a path the OS refused."""
    return PATH_TOO_LONG if exc.errno == errno.ENAMETOOLONG else UNREADABLE_FOLDER


def is_modicscan_output(folder: Path, names: Iterable[str], study_records: bool = False) -> str | None:
    """``OUTPUT`` when ``folder`` (whose entries are ``names``) holds a modicscan batch record (``batch.json`` /
    ``batch.shard-i-of-N.json``: an earlier run's output folder) or, with ``study_records`` (a folder at the top
    of an OUT that is its run's INPUT too), a study record (``report.json`` / ``error.json``);
    ``OUTPUT_IN_INPUT`` when its batch record says the run wrote into its own input (``-o INPUT``: the folder
    holds input studies besides our files); None otherwise."""
    for name in (n for n in names if _BATCH_RECORD.match(n) or (study_records and _STUDY_RECORD.match(n))):
        try:
            with open(folder / name, encoding="utf-8") as fh:
                head = fh.read(4096)  # report_type is among the first keys; never parse a huge file
        except (OSError, UnicodeDecodeError):
            continue
        if _OUR_RECORD_TYPE.search(head):
            return OUTPUT_IN_INPUT if _BATCH_RECORD.match(name) and _OUTPUT_IS_INPUT.search(head) else OUTPUT
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_inputs(root: Path, max_files: int, exclude: Iterable[str | os.PathLike] = ()
                ) -> tuple[list[Path], list[SkippedFile]]:
    """Files under ``root`` in a stable order (a folder's files by name, then its sub-folders by name), and
    every folder / link that was not read with its reason. Folders in ``exclude`` are not entered."""
    excluded = {ident for ident in (_identity(Path(p)) for p in exclude) if ident is not None}
    # Folders where a run's own files lie among the input's (`-o INPUT`, this run's or an earlier one's)
    mixed: set[Path] = {root} if _identity(root) in excluded else set()
    seen: set[tuple[int, int]] = set()
    files: list[Path] = []
    skipped: list[SkippedFile] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            skipped.append(SkippedFile(str(folder), os_reason(exc)))
            continue
        ident = (st.st_dev, st.st_ino)
        if folder != root and ident in excluded:
            skipped.append(SkippedFile(str(folder), MODICSCAN_OUTPUT))
            continue
        if ident in seen:
            skipped.append(SkippedFile(str(folder), FOLDER_SEEN_BEFORE))
            continue
        seen.add(ident)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append(SkippedFile(str(folder), os_reason(exc)))
            continue
        kind = is_modicscan_output(folder, [e.name for e in entries], study_records=folder.parent in mixed)
        if kind == OUTPUT_IN_INPUT:
            mixed.add(folder)
        elif kind == OUTPUT and folder != root:
            skipped.append(SkippedFile(str(folder), MODICSCAN_OUTPUT))
            continue
        sub: list[Path] = []
        for entry in entries:
            path = Path(entry.path)
            if folder in mixed and _OWN_TOP_FILES.match(entry.name):
                skipped.append(SkippedFile(str(path), MODICSCAN_OUTPUT))  # OUT is INPUT: our lock, log, tables
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    sub.append(path)
                    continue
                if entry.is_file():
                    files.append(path)
                    if len(files) > max_files:
                        # no path in the message: it reaches batch.log and stderr, also when pseudonymising
                        raise StudyError("NO_DICOM_FILES", f"more than {max_files} files under the input folder; "
                                         "nothing was analysed: raise loading.max_files (--config) or run on "
                                         "sub-folders")
                    continue
                reason = BROKEN_LINK if entry.is_symlink() else NOT_A_FILE
            except OSError as exc:
                reason = os_reason(exc)
            skipped.append(SkippedFile(str(path), reason))
        stack.extend(reversed(sub))
    return files, skipped

"""Atomic file writes (temporary file + rename, never a half-written result), study folders published
whole (written in a staging folder, then renamed into place), file modes that follow the umask, and the
clean-up of temporary files and folders a killed run left behind."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------------------------- writing
def finite_json(obj: Any) -> Any:
    """JSON has no NaN/inf: turn them into null so the report stays valid (schema then says where)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # NumPy scalar
        return finite_json(obj.item())
    return obj


# "No space left on device" and "disk quota exceeded": the output disk is full, every later write fails too.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask alone must set one)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(directory: bool = False) -> int:
    """The mode a plain ``open()`` / ``mkdir()`` would give: temp files and folders start 0600 / 0700."""
    return (0o777 if directory else 0o666) & ~current_umask()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid is in the temp name so a later run can remove temp files of killed writers.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, shared_mode())  # mkstemp makes 0600: colleagues could not read the results
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# Staging folders carry the writer's pid and host: shards of a SLURM array share one output folder from several
# machines, and a pid says nothing about a process on another host.
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]
_OTHER_HOST = re.compile(r"\.\d+\.h([0-9a-f]{8})-")


def _dir_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}.h{_HOST}-"


def make_staging_dir(parent: str | Path, name: str) -> Path:
    """An empty folder beside ``parent/name`` to write a study's files in before :func:`publish_dir`."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_dir_prefix(name), suffix=".tmp", dir=parent))
    os.chmod(staging, shared_mode(directory=True))
    return staging


def remove_staging_of(parent: str | Path, name: str, pid: int) -> None:
    """Delete the staging folders a killed writer (``pid``, this host) left for ``parent/name``."""
    for p in Path(parent).glob(f".{name}.{pid}.h{_HOST}-*"):
        shutil.rmtree(p, ignore_errors=True)


def publish_dir(staging: Path, target: Path) -> None:
    """Put a completely written folder in place of ``target``: a reader sees the old folder, none, or the new one.

    The old folder (a rerun's) is first renamed aside and deleted after the new one is in place; a run killed
    in between leaves the study absent (rerun analyses it) and a pid-named folder :func:`remove_stale_temp_files`
    removes.
    """
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=_dir_prefix(target.name), suffix=".old.tmp", dir=target.parent))
        os.rename(target, aside / "old")
    os.rename(staging, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_stale_temp_files(folder: str | Path, keep: tuple[str | Path, ...] = ()) -> int:
    """Delete temp files and staging folders left by writers that were killed (their pid no longer runs here;
    staging folders of another host are left alone). Nothing under a folder in ``keep`` is touched: the input
    may lie inside the output folder (``modicscan run proj/dicom -o proj``), and input files are never changed."""
    n = 0
    pat = re.compile(r"^\..+?\.(\d+)\.(?:[^.]+\.)?(?:old\.)?tmp(?:\..*)?$")
    kept = [Path(os.path.abspath(k)) for k in keep]
    for p in sorted(Path(folder).rglob(".*tmp*"), key=lambda q: len(q.parts)):
        m = pat.match(p.name)
        if not m or not p.exists():
            continue
        absolute = Path(os.path.abspath(p))
        if any(absolute == k or k in absolute.parents for k in kept):
            continue
        host = _OTHER_HOST.search(p.name)
        if host and host.group(1) != _HOST:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


def write_json_atomic(path: str | Path, obj: Any) -> None:
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False, ensure_ascii=False)
    # backslashreplace: a lone surrogate (a path byte that is not UTF-8, missed by walk.shown) is written as its
    # JSON escape instead of killing the batch with UnicodeEncodeError
    write_bytes_atomic(path, (text + "\n").encode("utf-8", "backslashreplace"))


def write_csv_atomic(path: str | Path, rows: list[dict], empty_header: tuple[str, ...] = ("case",)) -> None:
    """Rows as CSV, written atomically: the columns are every key of the rows in first-seen order, a missing or
    None value is an empty cell; with no rows only the ``empty_header`` line (nothing when it is empty)."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    fields = fields or list(empty_header)
    buf = io.StringIO()
    if fields:
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))

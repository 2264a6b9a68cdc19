"""Atomic file writes (temporary file + rename, never a half-written result) and the clean-up of
temporary files a killed run left behind."""

from __future__ import annotations

import json
import math
import os
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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + fsync + os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid is in the temp name so a later run can remove temp files of killed writers.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
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


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete temp files left by writers that were killed mid-write (their pid no longer runs)."""
    import re

    n = 0
    pat = re.compile(r"^\..+?\.(\d+)\.(?:[^.]+\.)?tmp(?:\..*)?$")
    for p in Path(folder).rglob(".*tmp*"):
        m = pat.match(p.name)
        if not m or not p.is_file():
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
            p.unlink(missing_ok=True)
            n += 1
    return n


def write_json_atomic(path: str | Path, obj: Any) -> None:
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False, ensure_ascii=False)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))

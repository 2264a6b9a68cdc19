"""The output folder of a run: one run at a time (a lock file), refused with one line when it cannot be
written, and a little disk space held in reserve so that a run that fills the disk can still finish batch.json."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from pipeline.io.atomic import is_disk_full

LOCK_NAME = ".modicscan.lock"
RESERVE_NAME = ".modicscan.reserve"
# Room for batch.json of ~15000 studies and the last lines of batch.log; on a nearly full disk less is reserved
# (still enough for a small batch's batch.json) rather than refusing to start.
RESERVE_SIZES = (4 << 20, 1 << 20, 256 << 10, 64 << 10)


class OutputFolderError(Exception):
    """The output folder cannot be used: read-only, not writable, in use by another run, or its disk is full."""

    def __init__(self, message: str, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


class OutputFolder:
    """Holds ``OUT/.modicscan.lock`` (``flock``, released when this process ends, even by SIGKILL) and the reserve.

    A second run on the same folder would analyse every study again beside the first and both would rewrite
    batch.json: it is refused instead (``OutputFolderError``; the CLI exits with 2).
    """

    def __init__(self, out_root: str | Path):
        self.root = Path(out_root)
        self._fd: int | None = None

    def __enter__(self) -> OutputFolder:
        return self.acquire()

    def acquire(self) -> OutputFolder:
        """Create the folder if needed, lock it, reserve the space; OutputFolderError (one line) if it cannot."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputFolderError(f"cannot write to the output folder {self.root}: {_reason(exc)}",
                                    disk_full=is_disk_full(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            other = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise OutputFolderError(f"another modicscan run (pid {other or '?'}) is writing to {self.root}; wait "
                                        "for it to end or choose another output folder") from None
            raise OutputFolderError(f"cannot lock the output folder {self.root}: {_reason(exc)}") from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            self._make_reserve()
        except OSError as exc:
            self.release()
            if is_disk_full(exc):
                raise OutputFolderError(f"the disk of the output folder {self.root} is full ({_reason(exc)})",
                                        disk_full=True) from None
            raise OutputFolderError(f"cannot write to the output folder {self.root}: {_reason(exc)}") from None
        return self

    def _make_reserve(self) -> None:
        path = self.root / RESERVE_NAME
        for size in RESERVE_SIZES:
            try:
                with open(path, "wb") as fh:  # real bytes: a sparse file (truncate) would reserve nothing
                    fh.write(bytes(size))
                    fh.flush()
                    os.fsync(fh.fileno())
                return
            except OSError as exc:
                path.unlink(missing_ok=True)
                if not is_disk_full(exc) or size == RESERVE_SIZES[-1]:
                    raise

    def release_reserve(self) -> None:
        """Give the reserved space back (the disk is full: batch.json and the log need it now)."""
        try:
            (self.root / RESERVE_NAME).unlink()
        except FileNotFoundError:
            pass

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is None:  # not ours: the reserve may be another run's
            return
        self.release_reserve()
        os.close(self._fd)  # closing releases the flock
        self._fd = None

"""The output folder of a run: one run at a time (a lock file; the shards of a job array side by side, each
shard once), refused with one line when it cannot be written, and a little disk space held in reserve so that a
run that fills the disk can still finish batch.json."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from pipeline.io.atomic import is_disk_full

log = logging.getLogger("modicscan")

LOCK_NAME = ".modicscan.lock"
RESERVE_NAME = ".modicscan.reserve"
# File systems without locks (some NFS / Lustre mounts): the run goes on unlocked, with a warning.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
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
    batch.json: it is refused instead (``OutputFolderError``; the CLI exits with 2). A shard (``--shard i/N``)
    shares the folder lock with the other shards and holds its own shard lock: shards run side by side, a shard
    twice or a whole run beside shards does not.
    """

    def __init__(self, out_root: str | Path, shard: tuple[int, int] | None = None):
        self.root = Path(out_root)
        self.shard = shard
        self._fds: list[int] = []
        self._reserved = False
        tag = "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"
        self.reserve_path = self.root / (RESERVE_NAME + tag)
        # (lock file, flock mode): whole run exclusive; shard: folder shared + its own exclusive
        self._locks = [(LOCK_NAME, fcntl.LOCK_EX)] if shard is None else [
            (LOCK_NAME, fcntl.LOCK_SH), (LOCK_NAME + tag, fcntl.LOCK_EX)]

    def __enter__(self) -> OutputFolder:
        return self.acquire()

    def acquire(self) -> OutputFolder:
        """Create the folder if needed, lock it, reserve the space; OutputFolderError (one line) if it cannot."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for name, mode in self._locks:
                self._lock(name, mode)
        except OSError as exc:
            self.release()
            raise OutputFolderError(f"cannot write to the output folder {self.root}: {_reason(exc)}",
                                    disk_full=is_disk_full(exc)) from None
        except OutputFolderError:
            self.release()
            raise
        try:
            self._make_reserve()
        except OSError as exc:
            self.release()
            if is_disk_full(exc):
                raise OutputFolderError(f"the disk of the output folder {self.root} is full ({_reason(exc)})",
                                        disk_full=True) from None
            raise OutputFolderError(f"cannot write to the output folder {self.root}: {_reason(exc)}") from None
        return self

    def _lock(self, name: str, mode: int) -> None:
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as exc:
            other = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                log.warning("the file system of %s has no file locks: two runs on it would not be stopped", self.root)
                return
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                what = "another modicscan run" + (f" (pid {other})" if other else "")
                raise OutputFolderError(f"{what} is writing to {self.root}; wait for it to end or choose another "
                                        "output folder") from None
            raise
        self._fds.append(fd)
        if mode == fcntl.LOCK_EX:  # who holds it, for the refusal message of the next run
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def _make_reserve(self) -> None:
        path = self.reserve_path
        for size in RESERVE_SIZES:
            try:
                self._reserved = True
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
        if not self._reserved:  # never another run's reserve
            return
        self._reserved = False
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            pass

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        self.release_reserve()
        for fd in self._fds:
            os.close(fd)  # closing releases the flock
        self._fds = []

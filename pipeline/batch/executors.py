"""How studies are handed to workers. Each executor takes (tasks, jobs) and yields StudyOutcomes as they finish.

* ``iter_local`` — this machine: a small supervised pool of ``jobs`` long-lived worker processes, one study
  at a time each, also at ``jobs == 1`` (the batch process itself never decodes a study, so a study that
  needs more memory than the job has is OOM-killed in its worker, not the batch). Unlike
  ``concurrent.futures.ProcessPoolExecutor`` (which breaks the whole pool when one worker dies), a worker that
  segfaults or is OOM-killed costs only the study it held: that study gets ``error.json`` with
  ``WORKER_CRASHED`` and a fresh worker takes its place. A study running longer than
  ``batch.study_timeout_s`` is stopped the same way with ``TIMEOUT``. Workers end with the batch process,
  even when it is killed.
* ``iter_inline`` — in the calling process, no isolation: for debugging (pdb) and tests that patch functions.
* ``iter_dask`` — a dask.distributed cluster (``--dask-scheduler`` address, or a LocalCluster), same
  per-study function, same records; a task whose worker dies is not retried (``allowed-failures: 0``)
  and is recorded as ``WORKER_CRASHED``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait

from pipeline.batch.study import StudyOutcome, StudyTask, process_study, write_failure
from pipeline.io.atomic import is_disk_full, remove_staging_of

log = logging.getLogger("modicscan")

Executor = Callable[[list[StudyTask], int], Iterable[StudyOutcome]]

# Workers fork from a server that has imported the pipeline and loaded the fork-safe models once: no worker pays
# for them in its first study, and a fresh worker (after a crash) starts fast. (A name that fails to import is
# silently skipped by multiprocessing: tests/test_executors.py checks what a worker starts with.)
FORKSERVER_PRELOAD = ["pipeline.batch.study", "pipeline.batch.worker_preload"]

# Each worker runs one study at a time on one core: BLAS / OpenMP threads would only compete.
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def single_thread_env() -> None:
    for var in _THREAD_VARS:
        os.environ.setdefault(var, "1")


def _end_with_parent(parent_pid: int) -> None:
    """The worker dies with the batch process, even when that is SIGKILLed (an orphan would go on writing)."""
    try:  # Linux: the kernel signals us when our parent (the forkserver, which ends with the batch) dies
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass

    def watch() -> None:  # elsewhere: look every half second
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True, name="modicscan-parent-watch").start()


def _limit_memory(mib: int) -> None:
    """Cap this worker's address space (soft limit, so the next study may raise it again): a study asking for more
    gets MemoryError (OUT_OF_MEMORY) instead of the job's or the machine's memory running out."""
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = hard if mib <= 0 else (mib << 20 if hard == resource.RLIM_INFINITY else min(mib << 20, hard))
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not on this platform
        log.warning("batch.worker_memory_mb is not supported on this platform")


def _log_to(log_file: str | None, formatter: logging.Formatter | None, level: int) -> None:
    """Worker log lines (a study's traceback) go to the batch's log file too."""
    logging.raiseExceptions = False  # a full disk must not print a logging traceback per line
    log.setLevel(level)
    log.propagate = False
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(formatter)
        log.addHandler(handler)


def _parent_log_file() -> tuple[str | None, logging.Formatter | None]:
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            return h.baseFilename, h.formatter
    return None, None


def _worker_main(conn, test_hooks: str | None = None, parent_pid: int | None = None, log_file: str | None = None,
                 log_format: logging.Formatter | None = None, log_level: int = logging.INFO) -> None:
    single_thread_env()
    if parent_pid is not None:
        _end_with_parent(parent_pid)
    _log_to(log_file, log_format, log_level)
    # The forkserver keeps the environment of the moment it started; the parent's current switch is passed in.
    if test_hooks is None:
        os.environ.pop("MODICSCAN_TEST_HOOKS", None)
    else:
        os.environ["MODICSCAN_TEST_HOOKS"] = test_hooks
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except Exception:  # noqa: BLE001 - optional
        pass
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if task is None:
            return
        _limit_memory(task.config.batch.worker_memory_mb)
        try:
            outcome = process_study(task)
        except KeyboardInterrupt:
            return
        conn.send(outcome)


def _crash_outcome(task: StudyTask, code: str, message: str, seconds: float) -> StudyOutcome:
    try:
        write_failure(task, code, message)
    except Exception as exc:  # noqa: BLE001 - the outcome still reaches batch.json
        if is_disk_full(exc):
            code, message = "DISK_FULL", f"{message}; its error.json could not be written: the output disk is full"
        else:
            log.exception("could not write error.json for study %s", task.key)
    log.error("study %s (%s): %s", task.key, task.public_folder, message)
    return StudyOutcome(task.key, "failed", code, message, seconds, task.public_folder, n_files=task.n_files)


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        log_file, log_format = _parent_log_file()
        self.proc = ctx.Process(target=_worker_main, args=(child, os.environ.get("MODICSCAN_TEST_HOOKS"), os.getpid(),
                                                           log_file, log_format, log.getEffectiveLevel()),
                                daemon=True)
        self.proc.start()
        child.close()
        self.task: StudyTask | None = None
        self.started = 0.0

    def give(self, task: StudyTask) -> None:
        self.task, self.started = task, time.monotonic()
        try:
            self.conn.send(task)
        except OSError:  # BrokenPipeError: the worker died before it got the study (killed while idle, or at start)
            pass  # the supervision loop sees its sentinel and records the study as WORKER_CRASHED

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        if self.task is not None:  # what it was writing when it died: the study folder stays complete or absent
            remove_staging_of(self.task.out_root, self.task.key, self.proc.pid)


def iter_inline(tasks: list[StudyTask], jobs: int = 1) -> Iterator[StudyOutcome]:
    """Run the tasks one after the other in this process (no isolation, no time limit)."""
    for t in tasks:
        yield process_study(t)


def iter_local(tasks: list[StudyTask], jobs: int) -> Iterator[StudyOutcome]:
    """Run tasks in a supervised pool of ``jobs`` worker processes (one at ``jobs == 1``), yielding outcomes as they
    finish."""
    if not tasks:
        return
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    pending = list(reversed(tasks))
    workers = [_Worker(ctx) for _ in range(max(1, min(jobs, len(tasks))))]
    try:
        for w in workers:
            if pending:
                w.give(pending.pop())
        while any(w.task is not None for w in workers):
            busy = [w for w in workers if w.task is not None]
            timeout_s = min(w.task.config.batch.study_timeout_s for w in busy)
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=1.0)
            now = time.monotonic()
            for i, w in enumerate(workers):
                if w.task is None:
                    continue
                outcome = None
                if w.conn in ready:
                    try:
                        outcome = w.conn.recv()
                    except (EOFError, OSError):
                        outcome = None
                if outcome is None and (w.proc.sentinel in ready or not w.proc.is_alive()):
                    code = w.proc.exitcode
                    w.kill()
                    outcome = _crash_outcome(
                        w.task, "WORKER_CRASHED",
                        f"the worker process died while analysing this study (exit code {code}; e.g. a crash in a "
                        "decoder or an out-of-memory kill); the other studies were not affected",
                        now - w.started)
                    workers[i] = w = _Worker(ctx)
                elif outcome is None and now - w.started > timeout_s:
                    w.kill()
                    outcome = _crash_outcome(w.task, "TIMEOUT", f"the study took longer than {timeout_s:g} s and "
                                             "was stopped (config batch.study_timeout_s)", now - w.started)
                    workers[i] = w = _Worker(ctx)
                if outcome is not None:
                    w.task = None
                    yield outcome
                    if pending:
                        w.give(pending.pop())
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            w.proc.join(timeout=2)
            w.kill()


# ---------------------------------------------------------------------------------------------- dask
def _dask_process(task: StudyTask) -> StudyOutcome:
    single_thread_env()
    return process_study(task)


def make_dask_executor(scheduler: str | None = None) -> Executor:
    def iter_dask(tasks: list[StudyTask], jobs: int) -> Iterator[StudyOutcome]:
        import dask
        from distributed import Client, LocalCluster, as_completed
        from distributed.client import FutureCancelledError

        try:
            from distributed.scheduler import KilledWorker
        except ImportError:  # pragma: no cover - moved in some versions
            from distributed import KilledWorker  # type: ignore[no-redef]

        if not tasks:
            return
        settings = {"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 1.0}
        with dask.config.set(settings):
            cluster = None
            if scheduler:
                client = Client(scheduler)
            else:
                cluster = LocalCluster(n_workers=max(1, jobs), threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.ERROR)
                client = Client(cluster)
            try:
                futures = {}
                for t in tasks:
                    # pure=False: a rerun with --force must really run again
                    fut = client.submit(_dask_process, t, key=f"modicscan-{t.key}-{time.time_ns()}", pure=False)
                    futures[fut] = t
                for fut in as_completed(futures):
                    t = futures[fut]
                    try:
                        yield fut.result()
                    except KilledWorker:
                        yield _crash_outcome(t, "WORKER_CRASHED", "the dask worker analysing this study died (crash "
                                             "or out-of-memory kill); the other studies were not affected", 0.0)
                    except FutureCancelledError:
                        yield _crash_outcome(t, "WORKER_CRASHED", "the dask task of this study was cancelled", 0.0)
                    except Exception as exc:  # noqa: BLE001 - process_study never raises for bad input
                        yield _crash_outcome(t, "INTERNAL_ERROR", f"dask task failed: {type(exc).__name__}: {exc}", 0.0)
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()

    return iter_dask


def get_executor(kind: str = "local", scheduler: str | None = None) -> Executor:
    if kind == "local":
        return iter_local
    if kind == "inline":
        return iter_inline
    if kind == "dask":
        import distributed  # noqa: F401 - fail early with a clear ImportError

        return make_dask_executor(scheduler)
    raise ValueError(f"unknown executor {kind!r}; choose 'local', 'inline' or 'dask'")

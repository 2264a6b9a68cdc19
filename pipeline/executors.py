"""How studies are handed to workers. Each executor takes (tasks, jobs) and yields StudyOutcomes as they finish."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

from .batch import StudyOutcome, StudyTask, process_study

Executor = Callable[[list[StudyTask], int], Iterable[StudyOutcome]]


def iter_local(tasks: list[StudyTask], jobs: int) -> Iterator[StudyOutcome]:
    """Run tasks in this process (jobs == 1) or in a process pool, yielding outcomes as they finish."""
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield process_study(t)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(process_study, t): t for t in tasks}
        for fut in as_completed(futures):
            yield fut.result()


def get_executor(kind: str = "local", scheduler: str | None = None) -> Executor:
    if kind == "local":
        return iter_local
    raise ValueError(f"unknown executor {kind!r}; choose 'local' or 'dask'")

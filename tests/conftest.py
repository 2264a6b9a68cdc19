"""Shared fixtures: the real-data folder (skipped with a reason when absent) and repo paths."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()
VERTEBRAL_BODIES = SHARED_DATA / "vertebral-bodies"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def vertebral_bodies_dir() -> Path:
    """../shared/data/vertebral-bodies, or skip: the real data is not part of the repository."""
    if not (VERTEBRAL_BODIES / "cases.csv").is_file():
        pytest.skip(f"real data not available: {VERTEBRAL_BODIES} is absent (see README, 'Real data')")
    return VERTEBRAL_BODIES

"""Synthetic lumbar spine MRI studies with known truth (DICOM files + NIfTI labels + findings JSON).

The generator's public API; the method is described in :mod:`pipeline.phantom.study`. Modules:
``scenarios`` (tissue signals, planted findings per seed), ``anatomy`` (bodies, discs, column in model mm),
``render`` (painting T1 / T2 / STIR and acquisition effects), ``dicom_writer`` (vendor-like DICOM datasets),
``study`` (one study on disk with its truth).
"""

from pipeline.phantom.scenarios import (
    FINDING_FACTORS,
    SAMPLE_SEEDS,
    SCENARIOS,
    SEQUENCES,
    TISSUES,
    normalise_findings,
    scenario_findings,
)
from pipeline.phantom.study import cli_phantom, make_sample_data, make_study

__all__ = [
    "SEQUENCES",
    "SCENARIOS",
    "TISSUES",
    "FINDING_FACTORS",
    "SAMPLE_SEEDS",
    "make_study",
    "make_sample_data",
    "cli_phantom",
    "scenario_findings",
    "normalise_findings",
]

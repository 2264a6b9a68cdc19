"""What the local executor's fork server loads before it forks the study workers (``set_forkserver_preload``).

Importing this module sets the workers' single-thread defaults (``OMP_NUM_THREADS`` ...), imports the stage
modules a study needs and loads the shipped models that are plain Python / NumPy objects (the segmentation
classifier, the disc model, the report schema validators). Every worker forked afterwards finds them in memory
(shared copy-on-write) instead of paying for them in its first study: about 1.5 s of CPU per worker (0.3 s more
with pictures), which made the first study of each worker several times slower than the others (at ``--jobs 2``
two of four benchmark studies). ONNX Runtime sessions start threads and are not fork-safe: they stay per worker.
Best effort: whatever fails here is loaded later by the study that needs it, as before.
"""

from __future__ import annotations

import importlib

# The modules analyse_study and the study writers import when they first run.
STAGE_MODULES = (
    "pipeline.roles", "pipeline.io.volumes", "pipeline.io.nifti", "pipeline.io.nifti_study",
    "pipeline.segmentation.segment", "pipeline.measure", "pipeline.classify", "pipeline.disc_model",
    "pipeline.report.study_outputs", "pipeline.report.overlays",
    # what the PNG writer imports (0.3 s; --overlays flagged is the default)
    "matplotlib.figure", "matplotlib.patheffects", "matplotlib.patches", "matplotlib.backends.backend_agg",
)


def preload() -> list[str]:
    """Import the stage modules and load the fork-safe models; returns what could not be loaded (never raises:
    the fork server must start whatever happens here)."""
    failed = []
    try:
        from pipeline.batch.executors import single_thread_env

        single_thread_env()  # as in the workers: libraries loaded from here on start no thread pools of their own
    except Exception:  # noqa: BLE001 - only a thread-count default
        failed.append("single-thread environment")
    for name in STAGE_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the study that needs the module reports the error
            failed.append(name)
    loaders = (("segmentation classifier", "pipeline.segmentation.probability", "load_model"),
               ("disc model", "pipeline.disc_model", "load_disc_model"),
               ("report schema", "pipeline.report.schema", "load_validators"),
               ("software versions", "pipeline.report.json_report", "software_info"))
    for what, module, function in loaders:
        try:
            getattr(importlib.import_module(module), function)()
        except Exception:  # noqa: BLE001 - e.g. a model file missing: the study fails with its own reason
            failed.append(what)
    return failed


PRELOAD_FAILED = preload()

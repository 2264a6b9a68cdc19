"""notebooks/explore_cohort.ipynb: committed without outputs, in sync with its generator, and runs cleanly."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "explore_cohort.ipynb"
STUDIES = ("phantom_seed0000", "phantom_seed0002")  # two sample studies keep the run short


def test_notebook_is_committed_without_outputs_and_matches_its_generator():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    sys.path.insert(0, str(REPO / "notebooks"))
    try:
        import make_explore_cohort
    finally:
        sys.path.pop(0)
    built = make_explore_cohort.build()
    assert [c.source for c in built.cells] == [c.source for c in nb.cells], \
        "notebook out of date: run python notebooks/make_explore_cohort.py"


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec named python3 that runs *this* interpreter (where modicscan is installed), found first via
    JUPYTER_PATH: works on a fresh machine where only `pip install -e ".[test]"` was run, without touching ~."""
    from ipykernel.kernelspec import write_kernel_spec

    kernels = tmp_path / "jupyter" / "kernels"
    kernels.mkdir(parents=True)
    write_kernel_spec(kernels / "python3", overrides={"display_name": "Python 3 (modicscan tests)"})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.resource_dir).resolve() == (kernels / "python3").resolve()
    return "python3"


def test_notebook_runs_on_sample_studies_and_shows_pictures_and_tables(tmp_path, monkeypatch, python3_kernel):
    from nbclient import NotebookClient

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    sample = tmp_path / "sample"
    for name in STUDIES:
        shutil.copytree(REPO / "sample_data" / name / "DICOM", sample / name / "DICOM")
    out = tmp_path / "out"
    monkeypatch.setenv("MODICSCAN_REPO", str(REPO))
    monkeypatch.setenv("MODICSCAN_SAMPLE", str(sample))
    monkeypatch.setenv("MODICSCAN_NOTEBOOK_OUT", str(out))

    nb = nbformat.read(work / NOTEBOOK.name, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name=python3_kernel, allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
                     for o in outputs)
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs if o.output_type != "stream")
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= len(STUDIES) + 1  # the overview of every study and the prevalence chart
    assert "exit code 0" in text
    assert f"{len(STUDIES)} studies" in text  # cohort table and summary
    assert "study_key" in html and "modic_type" in html  # the cohort table is shown
    assert "any Modic (% of endplates)" in html  # prevalence by level table
    assert "not a medical device" in text  # the report's disclaimer
    assert len(list(out.glob("*/overview.png"))) == len(STUDIES)
    assert (out / "cohort.csv").is_file() and (out / "summary.json").is_file()

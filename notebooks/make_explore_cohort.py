"""Build notebooks/explore_cohort.ipynb (without outputs) from the cells below: python notebooks/make_explore_cohort.py

Edit the cells here, not the .ipynb, and rerun this script; tests/test_notebook.py executes the notebook.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# Explore a modicscan cohort

Runs the pipeline on the bundled synthetic studies in `sample_data/`, then looks at what it wrote:
the QC overview pictures, the cohort table (`cohort.csv`), prevalence by level (`summary.json`) and one
study's report. See `docs/outputs.md` for every output file.

*Research output, not a medical device: nothing here is a diagnosis.*

Environment variables (all optional): `MODICSCAN_REPO` (repository root; default: found by walking up from
the notebook's folder), `MODICSCAN_SAMPLE` (input folder; default `sample_data/`), `MODICSCAN_NOTEBOOK_OUT`
(output folder; default `notebooks/_out/`, ignored by git)."""),
    ("code", """import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Image, display


def find_repo_root(start: Path) -> Path:
    for folder in [start, *start.parents]:
        if (folder / "sample_data").is_dir() and (folder / "pipeline").is_dir():
            return folder
    raise FileNotFoundError(f"no modicscan repository above {start}; set MODICSCAN_REPO")


ROOT = Path(os.environ["MODICSCAN_REPO"]) if os.environ.get("MODICSCAN_REPO") else find_repo_root(Path.cwd().resolve())
SAMPLE = Path(os.environ.get("MODICSCAN_SAMPLE", ROOT / "sample_data"))
OUT = Path(os.environ.get("MODICSCAN_NOTEBOOK_OUT", ROOT / "notebooks" / "_out"))
print("input :", SAMPLE)
print("output:", OUT)"""),
    ("md", """## Run the pipeline

Same as `modicscan run sample_data -o notebooks/_out --overlays flagged`. A rerun skips studies that are
already analysed (resume); pass `force=True` to recompute."""),
    ("code", """from pipeline.batch.run import run_batch
from pipeline.config import config_from_dict

result = run_batch(SAMPLE, OUT, config_from_dict({}), jobs=1, progress=False, options={"overlays": "flagged"})
print("exit code", result.exit_code)
print(json.loads((OUT / "batch.json").read_text())["counts"])"""),
    ("md", """## Overview pictures

Mid-sagittal T1 / T2 / STIR per study, head up and anterior on the left: body outlines (cyan; orange for a
body with a review flag), level names, Modic I / II / III and edema colours."""),
    ("code", """reports = {p.parent.name: json.loads(p.read_text()) for p in sorted(OUT.glob("*/report.json"))}
for key in reports:
    print(key, "-", reports[key]["summary"][:160])
    display(Image(filename=str(OUT / key / "overview.png"), width=900))"""),
    ("md", """## Cohort table

One row per study x vertebra x endplate (`cohort.csv`, also `cohort.parquet`)."""),
    ("code", """cohort = pd.read_csv(OUT / "cohort.csv")
print(len(cohort), "rows,", cohort["study_key"].nunique(), "studies")
abnormal = cohort[(cohort["modic_type"].astype(str) != "0") | cohort["edema_present"]]
abnormal[["study_key", "level", "endplate", "modic_type", "modic_confidence", "extent_height_pct",
          "edema_present", "edema_extent_volume_pct", "review_flags"]]"""),
    ("md", "## Prevalence by level (`summary.json`)"),
    ("code", """summary = json.loads((OUT / "summary.json").read_text())
by_level = pd.DataFrame({lv: {"any Modic (% of endplates)": v["any_modic_pct"],
                               "edema (% of vertebrae)": v["edema_pct_of_vertebrae"]}
                          for lv, v in summary["by_level"].items()}).T
print(f"{summary['n_studies']} studies; any Modic change in {summary['studies_with_any_modic_pct']} % of studies")
ax = by_level.plot.bar(figsize=(8, 3.5), rot=0, color=["tab:red", "tab:purple"])
ax.set_ylabel("%")
ax.set_title("Automated findings by level (synthetic sample, not a diagnosis)")
plt.tight_layout()
plt.show()
by_level"""),
    ("md", "## One study's report"),
    ("code", """key = max(reports, key=lambda k: (len(reports[k]["flags"]), k))  # a study with review flags, if any
rep = reports[key]
print("study       :", rep["study"]["key"], "| status", rep["status"], "| schema", rep["schema_version"])
print("series      :", {role: s.get("series_description") for role, s in rep["series"].items() if isinstance(s, dict)})
print("levels      :", rep["segmentation"]["levels_found"], "| labelling confidence", rep["segmentation"]["labelling_confidence"])
print("flags       :", [f["message"] for f in rep["flags"]] or "none")
print("summary     :", rep["summary"])
for v in rep["vertebrae"]:
    ep = v["endplates"]
    print(f"  {v['level']:>4}: superior {ep['superior']['modic_type']:>6}, inferior {ep['inferior']['modic_type']:>6}, "
          f"edema {'yes' if v['edema']['present'] else 'no':>3}, volume {v['volume_mm3'] / 1000:.1f} ml")
print(rep["disclaimer"])"""),
    ("code", """levels = sorted(p.name for p in (OUT / key).glob("level_*.png"))
print("per-level pictures:", levels)
if levels:
    display(Image(filename=str(OUT / key / levels[0]), width=700))"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in CELLS:
        nb.cells.append(new_markdown_cell(src) if kind == "md" else new_code_cell(src))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: a rebuild gives the same file
    return nb


if __name__ == "__main__":
    path = Path(__file__).with_name("explore_cohort.ipynb")
    nbformat.validate(nb := build())
    nbformat.write(nb, path)
    print(f"wrote {path}")

"""Per-study files beside report.json: label masks, zone masks, the QC overview picture; external masks in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import StudyError
from .types import Segmentation, VertebralBody, Volume, value_level

MODIC_COLOURS = {1: (1.0, 0.2, 0.2), 2: (1.0, 0.85, 0.1), 3: (0.3, 0.5, 1.0), 4: (1.0, 0.3, 1.0)}
MODIC_NAMES = {1: "Modic I", 2: "Modic II", 3: "Modic III", 4: "edema (outside endplate bands)"}


def write_study_outputs(out_dir: Path, report: dict, artefacts: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """Write the extra outputs of one analysed study; returns the file names written (relative to out_dir)."""
    from . import io

    written = []
    seg = artefacts["segmentation"]
    ref = artefacts["volumes"]["T2"]
    if options.get("write_masks", True):
        io.save_nifti(seg.labels, ref.affine, out_dir / "vertebrae.nii.gz")
        written.append("vertebrae.nii.gz")
    if options.get("zone_masks"):
        io.save_nifti(artefacts["findings"].zone_map, ref.affine, out_dir / "zones.nii.gz")
        written.append("zones.nii.gz")
    if options.get("overlays", "flagged") != "none":
        write_overview(out_dir / "overview.png", report, artefacts)
        written.append("overview.png")
    return written


def write_overview(path: Path, report: dict, artefacts: dict[str, Any]) -> None:
    """Mid-sagittal T1 / T2 / STIR side by side: body outlines, level names, Modic / edema colours, flags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .report import write_bytes_atomic

    vols: dict[str, Volume] = artefacts["volumes"]
    seg: Segmentation = artefacts["segmentation"]
    cls = artefacts["findings"].class_map
    k = int(round(np.median([b.centroid_vox[2] for b in seg.bodies]))) if seg.bodies else seg.labels.shape[2] // 2
    sp = vols["T2"].spacing
    roles = [r for r in ("T1", "T2", "STIR") if r in vols]
    fig, axes = plt.subplots(1, len(roles), figsize=(4.2 * len(roles), 5.2), dpi=90)
    axes = np.atleast_1d(axes)
    flagged = {lv for f in report["flags"] for lv in f["levels"]}
    for ax, role in zip(axes, roles, strict=True):
        img = vols[role].data[:, :, k]
        lo, hi = np.percentile(img, [1, 99.5])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=sp[0] / sp[1])  # head up, anterior left
        overlay = np.zeros(img.shape + (4,), np.float32)
        for c, rgb in MODIC_COLOURS.items():
            overlay[cls[:, :, k] == c] = (*rgb, 0.55)
        ax.imshow(overlay, aspect=sp[0] / sp[1])
        lab = seg.labels[:, :, k]
        if lab.any():
            ax.contour(lab > 0, levels=[0.5], colors="cyan", linewidths=0.6)
        for b in seg.bodies:
            colour = "red" if b.level in flagged else "yellow"
            ax.text(b.centroid_vox[1] - 0.35 * img.shape[1] / 4, b.centroid_vox[0], b.level + (" !" if b.level in flagged else ""),
                    color=colour, fontsize=8, ha="right", va="center")
        ax.set_title(f"{role} ({vols[role].meta.get('series_description', '')})", fontsize=8)
        ax.axis("off")
    handles = [Patch(color=MODIC_COLOURS[c], label=MODIC_NAMES[c]) for c in MODIC_COLOURS]
    handles.append(Patch(color="cyan", label="vertebral body outline"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    flags = "; ".join(f["message"] for f in report["flags"]) or "no review flags"
    fig.suptitle(f"study {report['study']['key']} — {flags}\nresearch output, not a diagnosis", fontsize=8)
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def segmentation_from_masks(masks_dir: Path, task, reference: Volume) -> Segmentation:
    """An external label image for the study (``--masks DIR``) instead of our segmentation.

    The file is ``DIR/<study key>.nii.gz`` or ``DIR/<StudyInstanceUID>.nii.gz`` (first found); values follow
    the documented convention (L1=1 ... S1=6, T12=7, ...; 101+ unlabelled). It is resampled (nearest
    neighbour) onto the T2 grid through the affines when the grids differ.
    """
    from scipy import ndimage

    from . import io

    candidates = [masks_dir / f"{task.key}.nii.gz", masks_dir / f"{task.study.study_uid}.nii.gz",
                  masks_dir / f"{task.key}.nii", masks_dir / f"{task.study.study_uid}.nii"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise StudyError("EXTERNAL_MASK_MISSING", f"no label image for this study in {masks_dir} "
                         f"(looked for {task.key}.nii.gz and <StudyInstanceUID>.nii.gz)")
    vol = io.resample_to(io.load_nifti(path), reference, order=0)
    labels = np.rint(vol.data).astype(np.int16)
    values = [int(v) for v in np.unique(labels) if v > 0]
    if not values:
        raise StudyError("EXTERNAL_MASK_MISMATCH", f"{path.name} holds no labelled voxel on the T2 grid")
    try:
        names = [value_level(v) for v in values]
    except ValueError as exc:
        raise StudyError("EXTERNAL_MASK_MISMATCH", f"{path.name}: {exc} (see README, label values)") from exc
    ones = np.ones(labels.shape, np.float32)
    cents = ndimage.center_of_mass(ones, labels, values)
    counts = ndimage.sum_labels(ones, labels, values)
    vox = float(np.prod(reference.spacing))
    bodies = sorted((VertebralBody(n, v, tuple(float(x) for x in c), float(cnt * vox))
                     for n, v, c, cnt in zip(names, values, cents, counts, strict=True)), key=lambda b: b.centroid_vox[0])
    confident = all(1 <= v <= 6 or 7 <= v < 101 for v in values)
    return Segmentation(labels=labels, bodies=bodies, labelling_confidence=1.0 if confident else 0.3,
                        flags=[] if confident else ["COUNT_AMBIGUOUS"], notes=[f"external label image {path.name}"])

"""PNG pictures of a study: the overview (mid-sagittal T1 / T2 / STIR with outlines, level names,
Modic / edema colours, flags), per-level crops with captions, and the segmentation QC picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.types import Segmentation, VertebralBody, Volume

MODIC_COLOURS = {1: (1.0, 0.2, 0.2), 2: (1.0, 0.85, 0.1), 3: (0.3, 0.5, 1.0), 4: (1.0, 0.3, 1.0)}
MODIC_NAMES = {1: "Modic I", 2: "Modic II", 3: "Modic III", 4: "edema (outside endplate bands)"}
OUTLINE_COLOUR = (0.0, 1.0, 1.0)  # cyan: vertebral body outline
# Text and flag colours stay clear of the Modic legend (red, yellow, blue, magenta): a level name must not read
# as a finding.
FLAGGED_OUTLINE_COLOUR = (0.2, 1.0, 0.2)  # green: outline and name of a body with a review flag
LEVEL_NAME_COLOUR = (1.0, 1.0, 1.0)  # white: level names (the level of a level_*.png ...)
OTHER_LEVEL_COLOUR = (0.75, 0.75, 0.75)  # ... and, light grey, its neighbours
LEVEL_NAMES_NOTE = "level name (B1, B2, ...: a body whose level could not be named)"
OVERLAY_ALPHA = 0.55  # opacity of the Modic / edema colours over the grey image


def display_window(img: np.ndarray) -> tuple[float, float]:
    """Grey-level window of a slice: 1st to 99.5th percentile (robust to a few very bright voxels)."""
    lo, hi = (float(x) for x in np.percentile(img, [1, 99.5]))
    return lo, (hi if hi > lo else lo + 1.0)


def body_outline(labels_slice: np.ndarray, flagged_values=()) -> tuple[np.ndarray, np.ndarray] | None:
    """Inner boundary pixels of the labelled bodies on a slice, and those of the bodies whose label value is in
    ``flagged_values`` (None when no body is on the slice)."""
    if not np.any(labels_slice):
        return None
    from skimage.segmentation import find_boundaries

    labels_slice = np.asarray(labels_slice)
    edge = find_boundaries(labels_slice, mode="inner") & (labels_slice > 0)
    flagged = edge & np.isin(labels_slice, list(flagged_values)) if len(flagged_values) else np.zeros_like(edge)
    return edge, flagged


def render_panel(img: np.ndarray, class_slice: np.ndarray | None = None, labels_slice: np.ndarray | None = None, *,
                 window: tuple[float, float] | None = None, flagged_values=(), alpha: float = OVERLAY_ALPHA,
                 outline: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One sagittal slice as an RGB array (H, W, 3), float in [0, 1], at native resolution.

    Grey image (``window`` or :func:`display_window`); voxels with a class code (``class_map``: 1 Modic I,
    2 Modic II, 3 Modic III, 4 edema outside the endplate bands) blended with :data:`MODIC_COLOURS` at
    ``alpha``; the inner boundary of every labelled body drawn in :data:`OUTLINE_COLOUR` (bodies whose label
    value is in ``flagged_values`` in :data:`FLAGGED_OUTLINE_COLOUR`; ``outline``: :func:`body_outline` of
    ``labels_slice``, when the caller draws the same slice on several panels). Array layout is the working frame's
    ``data[:, :, k]``: head up, anterior on the left. Pure numpy: the PNG writers only add text and a legend.
    """
    img = np.asarray(img, dtype=np.float32)
    lo, hi = window if window is not None else display_window(img)
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if class_slice is not None:
        codes = np.asarray(class_slice).astype(np.intp)
        palette = np.zeros((max(max(MODIC_COLOURS), int(codes.max(initial=0))) + 1, 3), np.float32)
        known = np.zeros(palette.shape[0], bool)
        for c, colour in MODIC_COLOURS.items():
            palette[c], known[c] = colour, True
        sel = known[np.clip(codes, 0, palette.shape[0] - 1)]
        rgb[sel] = (1.0 - alpha) * rgb[sel] + alpha * palette[codes[sel]]
    if outline is None and labels_slice is not None:
        outline = body_outline(labels_slice, flagged_values)
    if outline is not None:
        edge, flagged_edge = outline
        rgb[edge] = OUTLINE_COLOUR
        rgb[flagged_edge] = FLAGGED_OUTLINE_COLOUR
    return rgb


def legend_entries(legend: tuple[str, ...]) -> list[tuple[tuple[float, float, float], str]]:
    """(colour, label) of the legend parts named in ``legend``: modic, outline, flags, levels."""
    entries = []
    if "modic" in legend:
        entries += [(MODIC_COLOURS[c], MODIC_NAMES[c]) for c in MODIC_COLOURS]
    if "outline" in legend:
        entries.append((OUTLINE_COLOUR, "vertebral body outline"))
    if "levels" in legend:
        entries.append((LEVEL_NAME_COLOUR, LEVEL_NAMES_NOTE))
    if "flags" in legend:
        entries.append((FLAGGED_OUTLINE_COLOUR, "review flag (outline and name, marked !)"))
    return entries


def _figure_png(panels: list[tuple[str, np.ndarray]], spacing: tuple[float, float], texts, title: str,
                caption: str = "", legend: tuple[str, ...] = ("modic", "outline")) -> bytes:
    """Panels side by side (same texts on each), a title, an optional caption and legend, as PNG bytes.

    ``texts``: (row, col, text, colour) in panel pixel coordinates. The images keep their physical aspect
    (row spacing / column spacing) and are drawn with nearest-neighbour interpolation at about native
    resolution or larger, so one-pixel outlines survive.
    """
    import io as _io

    # A bare Figure (no pyplot): no global backend switch, so the library also behaves inside Jupyter / threads.
    from matplotlib import patheffects
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    h, w = panels[0][1].shape[:2]
    aspect = spacing[0] / spacing[1]
    dpi = 100
    panel_h_px = float(np.clip(h * max(aspect, 1.0), 360, 900))
    panel_w_px = panel_h_px * w / (h * aspect)
    n = len(panels)
    extra_h = 0.9 + 0.16 * caption.count("\n") + (0.35 if caption else 0.0) + (0.3 if legend else 0.0)
    fig = Figure(figsize=(n * panel_w_px / dpi + 0.2 * n, panel_h_px / dpi + extra_h), dpi=dpi)
    axes = fig.subplots(1, n, squeeze=False)
    halo = [patheffects.withStroke(linewidth=2, foreground="black")]  # names readable on bright marrow too
    for ax, (name, rgb) in zip(axes[0], panels, strict=True):
        ax.imshow(rgb, aspect=aspect, interpolation="nearest")  # head up, anterior left
        for row, col, text, colour in texts:
            ax.text(col, row, text, color=colour, fontsize=8, ha="right", va="center", fontweight="bold",
                    path_effects=halo)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
        # Hidden axes are not drawn, but the layout and the title placement still build and measure their ticks
        # (a third of a picture's time) unless the axis objects themselves are invisible.
        ax.xaxis.set_visible(False)
        ax.yaxis.set_visible(False)
    handles = [Patch(facecolor=colour, edgecolor="black", linewidth=0.5, label=label)
               for colour, label in legend_entries(legend)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8)
    if caption:
        fig.text(0.01, 0.06 if handles else 0.01, caption, fontsize=7, ha="left", va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.05 + 0.025 * (caption.count("\n") + 1) if caption else 0.05, 1, 0.95))
    buf = _io.BytesIO()
    # zlib level 1: the same pixels, a few per cent more bytes, about a fifth less time than the default level
    fig.savefig(buf, format="png", bbox_inches="tight", pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def _mid_slice(seg: Segmentation) -> int:
    """The sagittal slice through the middle of the bodies (median of their centroids)."""
    if not seg.bodies:
        return seg.labels.shape[2] // 2
    return int(round(np.median([b.centroid_vox[2] for b in seg.bodies])))


def _level_anchor(lab_slice: np.ndarray, body: VertebralBody) -> tuple[float, float] | None:
    """Where a level name goes on a slice: beside the body's anterior edge, at its mean row (None: not on it)."""
    rows, cols = np.nonzero(lab_slice == body.value)
    return (float(rows.mean()), float(cols.min()) - 2.0) if rows.size else None


def _flagged_levels(report: dict) -> set[str]:
    return {lv for f in report.get("flags", []) for lv in f.get("levels", [])}


def overlay_levels(report: dict, mode: str) -> list[str]:
    """Levels that get a ``level_<LEVEL>.png`` for ``--overlays MODE`` (top to bottom, as in the report).

    ``all``: every vertebra; ``flagged``: levels named by a review flag, or with a Modic type other than 0 at
    either endplate, or with edema; ``none``: no level.
    """
    if mode == "none":
        return []
    levels = [v["level"] for v in report["vertebrae"]]
    if mode == "all":
        return levels
    if mode != "flagged":
        raise ValueError(f"overlays must be 'all', 'flagged' or 'none', got {mode!r}")
    flagged = _flagged_levels(report)
    return [v["level"] for v in report["vertebrae"]
            if v["level"] in flagged or v["edema"]["present"]
            or any(e["modic_type"] != "0" for e in v["endplates"].values())]


def write_overlays(out_dir: Path, report: dict, artefacts: dict[str, Any], mode: str) -> list[str]:
    """overview.png and the per-level pictures for ``mode``; stale ``level_*.png`` of earlier runs are removed."""
    if mode == "none":
        names: list[str] = []
    else:
        write_overview(out_dir / "overview.png", report, artefacts)
        names = ["overview.png"]
        for level in overlay_levels(report, mode):
            if write_level_png(out_dir / f"level_{level}.png", report, artefacts, level):
                names.append(f"level_{level}.png")
    for old in out_dir.glob("level_*.png"):
        if old.name not in names:
            old.unlink(missing_ok=True)
    if mode == "none":
        (out_dir / "overview.png").unlink(missing_ok=True)
    return names


def _study_panels(report: dict, artefacts: dict[str, Any], k: int, crop=None, focus: str | None = None):
    """T1 / T2 / STIR panels of slice ``k`` (optionally cropped to rows r0:r1, cols c0:c1) and level texts."""
    vols: dict[str, Volume] = artefacts["volumes"]
    seg: Segmentation = artefacts["segmentation"]
    cls = artefacts["findings"].class_map
    flagged = _flagged_levels(report)
    flagged_values = [b.value for b in seg.bodies if b.level in flagged]
    r0, r1, c0, c1 = crop if crop is not None else (0, seg.labels.shape[0], 0, seg.labels.shape[1])
    lab = seg.labels[:, :, k]
    outline = body_outline(lab, flagged_values)  # the same on every panel
    panels = []
    for role in ("T1", "T2", "STIR"):
        if role not in vols:
            continue
        img = vols[role].data[:, :, k]
        rgb = render_panel(img, cls[:, :, k], lab, flagged_values=flagged_values, outline=outline)
        # The series number, never its description: descriptions can hold names or IDs
        number = vols[role].meta.get("series_number")
        panels.append((f"{role} (series {number})" if number is not None else role, rgb[r0:r1, c0:c1]))
    texts = []
    for b in seg.bodies:
        row, col = _level_anchor(lab, b) or (b.centroid_vox[0], b.centroid_vox[1] - 12.0)
        if not (r0 <= row < r1):
            continue
        mark = b.level in flagged
        colour = FLAGGED_OUTLINE_COLOUR if mark else (
            LEVEL_NAME_COLOUR if focus is None or b.level == focus else OTHER_LEVEL_COLOUR)
        texts.append((row - r0, max(col - c0, 0.0), b.level + (" !" if mark else ""), colour))
    return panels, texts


def write_overview(path: Path, report: dict, artefacts: dict[str, Any]) -> None:
    """Mid-sagittal T1 / T2 / STIR side by side: body outlines, level names, Modic / edema colours, flags."""
    from pipeline.io.atomic import write_bytes_atomic

    seg: Segmentation = artefacts["segmentation"]
    k = _mid_slice(seg)
    panels, texts = _study_panels(report, artefacts, k)
    flags = "; ".join(f["message"] for f in report["flags"]) or "no review flags"
    title = (f"study {report['study']['key']}, sagittal slice {k + 1} of {seg.labels.shape[2]} (head up, anterior left)"
             f"\n{flags}\nresearch output, not a diagnosis")
    sp = artefacts["volumes"]["T2"].spacing
    write_bytes_atomic(path, _figure_png(panels, (sp[0], sp[1]), texts, title, legend=("modic", "outline", "levels", "flags")))


def _fmt(x, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def level_caption(report: dict, level: str) -> str:
    """Plain-text findings of one level for its picture: endplate types, edema, height and signal ratios, flags."""
    v = next(v for v in report["vertebrae"] if v["level"] == level)
    lines = []
    eps = []
    for side in ("superior", "inferior"):
        e = v["endplates"][side]
        t = e["modic_type"]
        eps.append(f"{side} endplate: Modic {t}" + (f" ({e['extent_height_pct']:.0f} % of height, confidence "
                                                    f"{e['confidence']:.2f})" if t != "0" else ""))
    lines.append(f"{level}: " + "; ".join(eps))
    ed = v["edema"]
    lines.append("edema: " + (f"yes ({ed['source']}), {ed['extent_volume_pct']:.0f} % of interior, "
                              f"{ed['extent_height_pct']:.0f} % of height"
                              + (", next to an endplate" if ed.get("adjacent_to_endplate") else "")
                              if ed["present"] else f"no ({ed['source']})") + f", confidence {ed['confidence']:.2f}")
    hr = v.get("height_ratios") or {}
    lines.append(f"height ratios: anterior/posterior {_fmt(hr.get('anterior_to_posterior'))}, middle/posterior "
                 f"{_fmt(hr.get('middle_to_posterior'))}, to neighbours {_fmt(hr.get('to_neighbours'))}")
    zones = v.get("zones") or {}
    parts = []
    for z in ("core", "superior", "inferior"):
        sig = (zones.get(z) or {}).get("signal") or {}
        roles = [r for r in ("T1", "T2", "STIR") if r in sig]
        if roles:
            parts.append(f"{z} " + "/".join(_fmt((sig[r] or {}).get("ratio")) for r in roles))
    if parts:
        lines.append(f"signal / normal marrow ({'/'.join(r for r in ('T1', 'T2', 'STIR') if r in sig)}): " + ", ".join(parts))
    flags = [f for f in report.get("flags", []) if level in f.get("levels", [])]
    lines.append("review flags: " + ("; ".join(f"{f['code']}" for f in flags) if flags else "none"))
    return "\n".join(lines)


def write_level_png(path: Path, report: dict, artefacts: dict[str, Any], level: str) -> bool:
    """T1 / T2 / STIR crop around one body and its neighbours on the body's own mid-sagittal slice.

    Returns False (nothing written) when the level has no body in the segmentation.
    """
    from scipy import ndimage

    from pipeline.io.atomic import write_bytes_atomic

    seg: Segmentation = artefacts["segmentation"]
    ix = next((i for i, b in enumerate(seg.bodies) if b.level == level), None)
    if ix is None:
        return False
    body = seg.bodies[ix]
    k = int(np.clip(round(body.centroid_vox[2]), 0, seg.labels.shape[2] - 1))
    group = seg.bodies[max(ix - 1, 0): ix + 2]
    boxes = ndimage.find_objects(seg.labels.astype(np.int32, copy=False), max_label=max(b.value for b in group))
    sl = [boxes[b.value - 1] for b in group if boxes[b.value - 1] is not None]
    sp = artefacts["volumes"]["T2"].spacing
    h, w = seg.labels.shape[:2]
    if sl:
        r0, r1 = min(s[0].start for s in sl), max(s[0].stop for s in sl)
        c0, c1 = min(s[1].start for s in sl), max(s[1].stop for s in sl)
    else:  # pragma: no cover - a body always has voxels
        r0, r1, c0, c1 = 0, h, 0, w
    mr, mc = int(np.ceil(6.0 / sp[0])), int(np.ceil(12.0 / sp[1]))  # margins: 6 mm above / below, 12 mm front / back
    crop = (max(r0 - mr, 0), min(r1 + mr, h), max(c0 - mc, 0), min(c1 + mc, w))
    panels, texts = _study_panels(report, artefacts, k, crop=crop, focus=level)
    title = (f"study {report['study']['key']}, level {level}, sagittal slice {k + 1} of {seg.labels.shape[2]} "
             f"(head up, anterior left)\nresearch output, not a diagnosis")
    write_bytes_atomic(path, _figure_png(panels, (sp[0], sp[1]), texts, title, caption=level_caption(report, level),
                                         legend=("modic", "outline", "levels", "flags")))
    return True


def write_segmentation_png(path: Path, volume: Volume, seg: Segmentation, title: str = "") -> None:
    """QC picture of a segmentation alone (``modicscan segment --png``): the mid-sagittal slice of the
    bodies without and with outlines and level names, drawn with the same panel renderer as the study overlays."""
    from pipeline.io.atomic import write_bytes_atomic

    k = _mid_slice(seg)
    img = volume.data[:, :, k]
    win = display_window(img)
    lab = seg.labels[:, :, k]
    texts = [(*anchor, b.level, LEVEL_NAME_COLOUR) for b in seg.bodies if (anchor := _level_anchor(lab, b)) is not None]
    panels = [("image", render_panel(img, window=win)), ("vertebral bodies", render_panel(img, labels_slice=lab, window=win))]
    head = (f"{title}: " if title else "") + f"{len(seg.bodies)} bodies, labelling confidence {seg.labelling_confidence:.2f}"
    if seg.flags:
        head += ", flags " + ", ".join(seg.flags)
    head += f"\nsagittal slice {k + 1} of {seg.labels.shape[2]} (head up, anterior left); research output, not a diagnosis"
    sp = volume.spacing
    write_bytes_atomic(path, _figure_png(panels, (sp[0], sp[1]), texts, head, legend=("outline", "levels")))

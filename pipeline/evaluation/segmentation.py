"""Segmentation evaluation against expert masks: ``modicscan evaluate-segmentation CASES.csv -o results/``.

Metric (the project's target, see ../shared/data/README.md): per-body Dice — each annotated body is matched
to the predicted body with the largest overlap; Dice of that pair; a missed body scores 0; mean over all
annotated bodies of all cases. Predicted bodies with no annotated counterpart are counted as "extra"
(they may be real unannotated vertebrae). HD95: 95th percentile of the symmetric surface distance (mm).

Level names: the shared cases do not say which level each annotated body is, but a source may annotate a known
run of consecutive levels (vb2 T11-L5, vb3 L1-L5). ``first_levels={"vb3": "L1"}`` names the annotated bodies
of that source from the top down (L1, L2, ...) and scores the level our segmentation gave the matched body:
correct, wrong (a confident wrong name: the worst output, every finding lands at the wrong level) or unnamed
(``B<n>``, or the body was missed).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.config import SegmentationConfig
from pipeline.evaluation.cases import common_box
from pipeline.io.atomic import write_csv_atomic, write_json_atomic
from pipeline.types import LUMBAR_LEVELS


def hd95(a: np.ndarray, b: np.ndarray, spacing) -> float | None:
    """95th percentile of the symmetric surface distance between two masks (mm)."""
    if not a.any() or not b.any():
        return None
    sa = a & ~ndimage.binary_erosion(a)
    sb = b & ~ndimage.binary_erosion(b)
    da = ndimage.distance_transform_edt(~sa, sampling=spacing)
    db = ndimage.distance_transform_edt(~sb, sampling=spacing)
    d = np.concatenate([db[sa], da[sb]])
    return float(np.percentile(d, 95))




# Every level name in head-to-foot order (the segmentation's names: T1..T12, then LUMBAR_LEVELS = L1..L5, S1):
# the expected names of a run of annotated bodies.
LEVEL_ORDER: tuple[str, ...] = tuple(f"T{i}" for i in range(1, 13)) + LUMBAR_LEVELS


def check_level(name: str) -> None:
    """ValueError unless ``name`` is a level name (T1..T12, L1..L5, S1)."""
    if name not in LEVEL_ORDER:
        raise ValueError(f"unknown level {name!r} (expected one of {', '.join(LEVEL_ORDER)})")


def expected_levels(truth: np.ndarray, first_level: str) -> dict[int, str]:
    """Annotated body label -> level name, for annotations of consecutive levels starting at ``first_level``
    (bodies ordered head to foot by their mean row)."""
    from pipeline.arrays import label_counts_and_centroids

    check_level(first_level)
    t_ids = np.unique(truth)
    t_ids = t_ids[t_ids > 0]
    _, cents = label_counts_and_centroids(truth, t_ids)
    start = LEVEL_ORDER.index(first_level)
    ordered = t_ids[np.argsort(cents[:, 0])]
    if start + ordered.size > len(LEVEL_ORDER):
        raise ValueError(f"{ordered.size} annotated bodies from {first_level} run past S1")
    return {int(t): LEVEL_ORDER[start + n] for n, t in enumerate(ordered)}


def level_outcome(expected: str | None, predicted: str | None) -> str | None:
    """``correct`` / ``wrong`` / ``unnamed`` (no name, an unnamed ``B<n>`` body, or missed); None = not scored."""
    if expected is None:
        return None
    if not predicted or predicted.startswith("B"):
        return "unnamed"
    return "correct" if predicted == expected else "wrong"


def per_body_scores(truth: np.ndarray, pred: np.ndarray, spacing) -> tuple[list[dict], int]:
    """Per annotated body: matched predicted label, Dice, HD95. Returns (rows, number of extra predicted bodies)."""
    t_ids = np.unique(truth)
    t_ids = t_ids[t_ids > 0]
    p_ids = np.unique(pred)
    p_ids = p_ids[p_ids > 0]
    # Overlap table of all (truth, pred) pairs in one bincount.
    both = (truth > 0) & (pred > 0)
    pmax = int(pred.max()) + 1
    pair = truth[both].astype(np.int64) * pmax + pred[both]
    overlap = np.bincount(pair, minlength=(int(truth.max()) + 1) * pmax).reshape(-1, pmax)
    t_size = np.bincount(truth.ravel(), minlength=int(truth.max()) + 1)
    p_size = np.bincount(pred.ravel(), minlength=pmax)
    rows, matched = [], set()
    for t in t_ids:  # loop over annotated bodies (<= ~10)
        ov = overlap[t]
        p = int(np.argmax(ov)) if ov.max() > 0 else 0
        if p == 0:
            rows.append({"truth_label": int(t), "pred_label": None, "dice": 0.0, "hd95_mm": None, "detected": False})
            continue
        matched.add(p)
        dice = 2.0 * ov[p] / (t_size[t] + p_size[p])
        rows.append({"truth_label": int(t), "pred_label": p, "dice": float(dice),
                     "hd95_mm": hd95(truth == t, pred == p, spacing), "detected": bool(dice > 0.1)})
    extra = [int(p) for p in p_ids if p not in matched and overlap[:, p].sum() == 0]
    return rows, len(extra)


def _eval_case(args) -> dict:
    row, out_dir, model_path, unet_path, cfg, write_png, first_level = args
    from pipeline.io.nifti import load_nifti
    from pipeline.segmentation import probability, unet
    from pipeline.segmentation.segment import segment_vertebrae

    if model_path:
        import joblib

        probability.load_model.cache_clear()
        probability.MODEL_PATH = Path(model_path)
        joblib.load(model_path)  # fail early on a bad path
    if unet_path:
        unet.use_network(unet_path)
    img = load_nifti(row["image_path"])
    truth = load_nifti(row["labels_path"]).data.astype(np.int32)
    note = ""
    if truth.shape != img.data.shape:
        cropped = truth[common_box(truth.shape, img.data.shape)]
        note = f"label grid {truth.shape} != image grid {img.data.shape}; scored on the common {cropped.shape}"
        truth = cropped
    expected, level_note = {}, None
    if first_level:
        try:
            expected = expected_levels(truth, first_level)
        except ValueError as exc:  # more annotated bodies than levels from first_level down: this case's names unscored
            level_note = f"levels not scored: {exc}"
    t = time.perf_counter()
    try:
        seg = segment_vertebrae(img.data, img.spacing, cfg, keep_below_s1=True)
        pred = seg.labels.astype(np.int32)
        level_of = {b.value: b.level for b in seg.bodies}
        flags, confidence, notes = list(seg.flags), float(seg.labelling_confidence), list(seg.notes)
        err = None
    except Exception as exc:  # noqa: BLE001 - a failed case scores 0 and says why
        pred = np.zeros_like(truth)
        level_of = {}
        flags, confidence, notes = [], None, []
        err = f"{type(exc).__name__}: {exc}"
    secs = time.perf_counter() - t
    err = "; ".join(x for x in (err, note, level_note) if x) or None
    pred = pred[: truth.shape[0], : truth.shape[1], : truth.shape[2]]
    bodies, n_extra = per_body_scores(truth, pred, img.spacing)
    for b in bodies:
        b["expected_level"] = expected.get(b["truth_label"])
        b["predicted_level"] = level_of.get(b["pred_label"]) if b["detected"] else None
        b["level_outcome"] = level_outcome(b["expected_level"], b["predicted_level"])
    if write_png:
        _png(img.data, truth, pred, Path(out_dir) / "png" / f"{row['case']}.png", row["case"],
             np.mean([b["dice"] for b in bodies]) if bodies else 0.0)
    return {"case": row["case"], "source": row["source"], "seconds": secs, "bodies": bodies, "extra": n_extra,
            "error": err, "flags": flags, "labelling_confidence": confidence, "notes": notes}


def _png(image, truth, pred, path: Path, title: str, dice: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.nonzero(truth.any(axis=(0, 1)))[0]
    k = int(np.median(ks)) if ks.size else image.shape[2] // 2
    fig, ax = plt.subplots(figsize=(5, 5), dpi=80)
    ax.imshow(image[:, :, k], cmap="gray")
    ax.contour(truth[:, :, k] > 0, levels=[0.5], colors="lime", linewidths=0.8)
    ax.contour(pred[:, :, k] > 0, levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(f"{title}  mean Dice {dice:.3f}  (green expert, red ours)", fontsize=8)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _progress(results, total: int):
    """Cases as they finish, with a progress bar on stderr (a whole evaluation takes minutes)."""
    from tqdm import tqdm

    return tqdm(results, total=total, unit="case", desc="evaluate-segmentation", file=sys.stderr, leave=True)


def evaluate_rows(rows: list[dict], out_dir: Path, *, jobs: int = 1, cfg: SegmentationConfig | None = None,
                  write_png: bool = True, model_path: Path | None = None, unet_path: Path | None = None,
                  first_levels: dict[str, str] | None = None) -> dict:
    """Evaluate the segmentation of ``rows`` (see :func:`evaluate_segmentation`); ``model_path`` / ``unet_path``:
    a classifier / U-Net other than the shipped ones (e.g. trained without these rows)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first_levels = first_levels or {}
    for level in first_levels.values():  # fail before segmenting anything
        check_level(level)
    args = [(r, str(out_dir), str(model_path) if model_path else None, str(unet_path) if unet_path else None,
             cfg or SegmentationConfig(), write_png, first_levels.get(r["source"])) for r in rows]
    if jobs > 1:
        import multiprocessing

        # forkserver, not fork: a process that has trained or run the OpenMP classifier (train_segmenter --cv)
        # hangs its forked children in OpenMP
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("forkserver")) as ex:
            results = list(_progress(ex.map(_eval_case, args), len(args)))
    else:
        results = list(_progress(map(_eval_case, args), len(args)))
    per_body, per_case = [], []
    for res in results:
        dices = [b["dice"] for b in res["bodies"]]
        hds = [b["hd95_mm"] for b in res["bodies"] if b["hd95_mm"] is not None]
        per_case.append({"case": res["case"], "source": res["source"], "n_bodies": len(dices),
                         "mean_dice": float(np.mean(dices)) if dices else 0.0,
                         "min_dice": float(np.min(dices)) if dices else 0.0,
                         "missed": sum(not b["detected"] for b in res["bodies"]), "extra": res["extra"],
                         "hd95_mm_median": float(np.median(hds)) if hds else None,
                         "labelling_confidence": (None if res["labelling_confidence"] is None
                                                  else round(res["labelling_confidence"], 2)),
                         "level_flags": " ".join(res["flags"]), "level_notes": " | ".join(res["notes"]),
                         "seconds": round(res["seconds"], 3), "error": res["error"] or ""})
        uncertain = "LEVELS_UNCERTAIN" in res["flags"]
        for b in res["bodies"]:
            per_body.append({"case": res["case"], "source": res["source"], **b, "levels_uncertain": uncertain})
    write_csv_atomic(out_dir / "per_case.csv", per_case, empty_header=())
    write_csv_atomic(out_dir / "per_body.csv", per_body, empty_header=())
    dices = np.array([b["dice"] for b in per_body]) if per_body else np.zeros(0)
    sources = sorted({c["source"] for c in per_case})
    summary = {
        "metric": "per-body Dice (largest-overlap match; missed body = 0), mean over all annotated bodies",
        "n_cases": len(per_case), "n_annotated_bodies": int(dices.size),
        "mean_body_dice": round(float(dices.mean()), 4) if dices.size else 0.0,
        "per_source": {s: round(float(np.mean([b["dice"] for b in per_body if b["source"] == s])), 4) for s in sources},
        "case_mean_dice": {"mean": round(float(np.mean([c["mean_dice"] for c in per_case])), 4) if per_case else None,
                           "worst": min(per_case, key=lambda c: c["mean_dice"])["case"] if per_case else None,
                           "worst_value": round(min(c["mean_dice"] for c in per_case), 4) if per_case else None},
        "detected": int(sum(b["detected"] for b in per_body)),
        "missed": int(sum(not b["detected"] for b in per_body)),
        "missed_pct": round(100.0 * sum(not b["detected"] for b in per_body) / max(len(per_body), 1), 2),
        "extra_predicted_bodies": int(sum(c["extra"] for c in per_case)),
        "hd95_mm_median": round(float(np.median([b["hd95_mm"] for b in per_body if b["hd95_mm"] is not None])), 2)
        if any(b["hd95_mm"] is not None for b in per_body) else None,
        "runtime_s_median": round(float(np.median([c["seconds"] for c in per_case])), 3) if per_case else None,
        "worst_cases": sorted(per_case, key=lambda c: c["mean_dice"])[:5],
    }
    if first_levels:
        summary["level_naming"] = {
            s: {k: sum(b["level_outcome"] == k for b in per_body if b["source"] == s) for k in ("correct", "wrong", "unnamed")}
            for s in sources if s in first_levels}
        # does the flag find the wrong names? (a user checks the flagged studies' overlays, trusts the others)
        summary["level_naming_by_flag"] = {
            name: {k: sum(b["level_outcome"] == k for b in per_body
                          if b["levels_uncertain"] == flagged and b["source"] in first_levels)
                   for k in ("correct", "wrong", "unnamed")}
            for name, flagged in (("LEVELS_UNCERTAIN", True), ("not_levels_uncertain", False))}
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def evaluate_segmentation(cases_csv: Path, out_dir: Path, *, jobs: int = 1, cfg: SegmentationConfig | None = None,
                          write_png: bool = True, limit: int | None = None,
                          first_levels: dict[str, str] | None = None, fold: int | None = None,
                          source: str | None = None, model_path: Path | None = None,
                          unet_path: Path | None = None) -> dict:
    """Segment every case of ``cases_csv`` and score it against its expert mask; writes per_case.csv,
    per_body.csv, summary.json (and a PNG per case) into ``out_dir``. ``first_levels``: source -> the level of
    its top annotated body, to score level names as well (module doc). ``fold``: only the cases of this fold of
    ``train_segmenter.case_folds``, ``source``: only this source's cases (held-out evaluation of models trained
    with ``--fold`` / ``--source``)."""
    from pipeline.evaluation.cases import check_source, held_out, read_cases

    rows = read_cases(Path(cases_csv))
    if source is not None:
        check_source(rows, source)
    if fold is not None or source is not None:
        rows = [r for r, keep in zip(rows, held_out(rows, fold, source), strict=True) if keep]
    if limit:
        rows = rows[:limit]
    return evaluate_rows(rows, Path(out_dir), jobs=jobs, cfg=cfg, write_png=write_png, first_levels=first_levels,
                         model_path=model_path, unet_path=unet_path)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(evaluate_segmentation(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))

"""The body probability from a small 2.5-D U-Net (ONNX, run with ONNX Runtime on the CPU; no PyTorch needed).

The net (``models/body_unet.onnx``, 1.9 M parameters, trained by :mod:`pipeline.training.train_unet`) sees one sagittal
slice of the normalised working grid (1.5 mm in-plane, :func:`pipeline.segmentation.grid.normalise`) and the slices
``CONTEXT_MM`` to either side (three channels: lateral context at the same physical distance for 1 mm and 4 mm
slices), and gives one logit per pixel: vertebral body or not. With ``segmentation.body_model: unet`` (what the
default ``auto`` runs on volumes) it takes the place of the classifier's stage 2 (held-out per-body Dice on the 42 real scans, 3-fold case
split: 0.815 -> 0.888 with the same post-processing, 0.891 with its own edge refiner): a body's shape and its disc
above and below are seen at once, not through hand-made features.

Cost control, both measured without loss of Dice: only the columns within ``COLUMN_HALF_MM`` of the spinal column
(found by the classifier's cheap stage 1) are fed to the net, and thin-slice volumes are run on slices
``SLICE_PITCH_MM`` apart, linearly interpolated between.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from pipeline.errors import StudyError

UNET_PATH = Path(__file__).resolve().parent / "models" / "body_unet.onnx"
# The one-pass net (``segmentation.body_model: onepass``): run on whole slices, no classifier before or after it;
# trained with domain randomisation (``python -m pipeline.training.train_unet --onepass``); two outputs: body, L5.
ONEPASS_PATH = Path(__file__).resolve().parent / "models" / "body_net_onepass.onnx"
_OVERRIDE: Path | None = None  # use_network: one net for this process, whichever body model asks
CONTEXT_MM = 4.0  # the two side channels are the slices this far to either side (nearest slice, at least one)
COLUMN_HALF_MM = 45.0  # in-plane crop around the column: the bodies are within ~25 mm of its axis
SLICE_PITCH_MM = 3.0  # 3 mm instead of every slice: same held-out Dice (fold 0: 0.875 vs 0.873), a third of the work
DOWNSAMPLINGS = 4  # the net pools four times: its input sides must be multiples of 2**4
SLICES_PER_RUN = 8  # slices per ONNX Runtime call: bounds the activation memory (~40 MB per 256 x 256 slice)


def context_stack(norm: np.ndarray, slice_mm: float, ks: np.ndarray | None = None) -> np.ndarray:
    """(n, 3, H, W) float32 net input for slices ``ks`` (default all) of a normalised (H, W, K) volume: each slice
    with the slices ``CONTEXT_MM`` to either side (clamped at the first / last slice)."""
    n_k = norm.shape[2]
    ks = np.arange(n_k) if ks is None else np.asarray(ks)
    d = max(1, int(round(CONTEXT_MM / max(float(slice_mm), 1e-3))))
    out = np.empty((ks.size, 3, norm.shape[0], norm.shape[1]), np.float32)
    for c, off in enumerate((-d, 0, d)):
        out[:, c] = np.moveaxis(norm[:, :, np.clip(ks + off, 0, n_k - 1)], 2, 0)
    return out


def _threads() -> int:
    """One thread per process unless OMP_NUM_THREADS says otherwise: batch workers each run one study on one core."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def _float_path(body_model: str) -> Path:
    return ONEPASS_PATH if body_model == "onepass" else UNET_PATH


def int8_path(body_model: str = "unet") -> Path:
    """The shipped int8 version of a body model's net (``python -m pipeline.training.quantize_nets``)."""
    base = _float_path(body_model)
    return base.with_name(base.stem + "_int8.onnx")


def net_path(body_model: str = "unet", int8: bool = False) -> Path:
    """The net file a body model runs: the one :func:`use_network` chose for this process, else the shipped one
    (its int8 version with ``int8``: ``segmentation.int8``)."""
    if _OVERRIDE is not None:
        return _OVERRIDE  # as given, float or int8: held-out evaluations name the exact file they score
    return int8_path(body_model) if int8 else _float_path(body_model)


@functools.cache
def _session(path: str):
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise StudyError("SEGMENTATION_FAILED", f"segmentation network missing: {p} (reinstall the package)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a corrupt or foreign file
        raise StudyError("SEGMENTATION_FAILED", f"segmentation network {p} cannot be loaded: {exc}") from exc


def load_session(path: str | None = None, body_model: str = "unet", int8: bool = False):
    """ONNX Runtime session of ``path`` (default: :func:`net_path` of the body model); cached per path."""
    return _session(str(path) if path else str(net_path(body_model, int8)))


def use_network(path) -> None:
    """Make ``path`` the net of this process, for either body model (held-out fold nets in evaluation and refiner
    training); None: the shipped nets again. A missing or unreadable file fails here, and the current net stays."""
    global _OVERRIDE
    if path is None:
        _OVERRIDE = None
        return
    if _OVERRIDE is not None and Path(path) == _OVERRIDE:
        return  # already this process's net: evaluation and refiner training call this once per case
    _session(str(path))
    _OVERRIDE = Path(path)


def run_net(session, x: np.ndarray, all_channels: bool = False) -> np.ndarray:
    """Sigmoid output (n, H, W) of the net for input ``x`` (n, 3, H, W): padded to multiples of 16, in chunks.
    ``all_channels``: every output channel, (n, C, H, W) (the one-pass net's channel 1 is L5); an empty ``x``
    gives (0, H, W) either way (C is only known from a run: callers skip the net when no slice needs it)."""
    n, _, h, w = x.shape
    m = 2 ** DOWNSAMPLINGS
    hp, wp = -(-h // m) * m, -(-w // m) * m
    name = session.get_inputs()[0].name
    out = None
    for s in range(0, n, SLICES_PER_RUN):
        chunk = x[s:s + SLICES_PER_RUN]
        if (hp, wp) != (h, w):
            chunk = np.pad(chunk, ((0, 0), (0, 0), (0, hp - h), (0, wp - w)))
        logit = session.run(None, {name: np.ascontiguousarray(chunk, dtype=np.float32)})[0][:, :, :h, :w]
        if not all_channels:
            logit = logit[:, 0]
        if out is None:
            out = np.empty((n,) + logit.shape[1:], np.float32)
        out[s:s + chunk.shape[0]] = 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))
    return np.empty((0, h, w), np.float32) if out is None else out


def unet_probability(norm: np.ndarray, slice_mm: float, columns: slice | None = None, session=None,
                     needed: np.ndarray | None = None, level_map: bool = False):
    """P(body) (H, W, K) float32 on the working grid from the U-Net.

    ``columns``: the in-plane columns (AP axis) to run the net on; zero elsewhere. Thin slices are run about
    ``SLICE_PITCH_MM`` apart and interpolated (:func:`pipeline.segmentation.grid.interpolate_slices`).
    ``needed`` (K bools): only these slices are wanted; the net skips every slice that none of them is
    interpolated from (zero there), the needed ones come out as without it.
    ``level_map``: return (P(body), P(L5)) instead, P(L5) from the net's second output (None for a net with one).
    """
    from pipeline.segmentation.grid import classified_slices, interpolate_slices

    session = session or load_session()
    h, w, n_k = norm.shape
    cols = columns or slice(0, w)
    ks = classified_slices(n_k, slice_mm, SLICE_PITCH_MM)
    run = np.ones(ks.size, bool)
    if needed is not None:
        # slice ks[i] feeds the slices strictly between its neighbours ks[i - 1] and ks[i + 1]
        reach = np.r_[ks[0] - 1, ks[:-1]], np.r_[ks[1:], ks[-1] + 1]
        where = np.flatnonzero(needed)
        run = (np.searchsorted(where, reach[1]) - np.searchsorted(where, reach[0], side="right")) > 0
    out = None
    if run.any():
        out = run_net(session, context_stack(norm[:, cols], slice_mm, ks[run]), all_channels=level_map)
    n_out = 1 if out is None or out.ndim == 3 else out.shape[1]
    prob = np.zeros((n_out, h, w, ks.size), np.float32)
    if out is not None:
        out = out.reshape(out.shape[0], n_out, out.shape[-2], out.shape[-1])  # (n, C, H, W)
        prob[:, :, cols][:, :, :, run] = np.moveaxis(out, 0, 3)  # prob[:, :, cols] is a view
    maps = [np.ascontiguousarray(interpolate_slices(c, ks, n_k)) for c in prob]
    if not level_map:
        return maps[0]
    return maps[0], (maps[1] if len(maps) > 1 else None)

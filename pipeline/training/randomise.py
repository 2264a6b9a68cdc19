"""Domain randomisation of training crops: the same anatomy under contrasts, bias fields, blur and noise no scanner
in the training set had (the idea of SynthSeg, Billot et al. 2023, without its full-head label maps).

SynthSeg paints each label of a label map with a random intensity; we have labels for the vertebral bodies only, so
the crop's own intensities are remapped instead: a random, non-monotone lookup table over the normalised
intensity (:func:`random_lookup`) keeps every tissue's texture and edges but gives tissues a random brightness
order (a body may be darker or brighter than its discs, fat bright or dark, as between T1, T2, STIR and water /
fat images). The net must then find the bodies from shape and context. On top: a smooth multiplicative bias field
(coil sensitivity), an in-plane blur (coarser acquisitions) and Gaussian noise, then the pipeline's own
normalisation (:func:`pipeline.segmentation.grid.normalise`), as the net sees every input at run time.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.segmentation.grid import normalise

LUT_KNOTS = np.linspace(-0.3, 1.6, 9)  # normalised intensity: below the foreground's 2nd to past its 98th percentile
BIAS_LOG_SD = 0.3  # log-amplitude of the bias field (x0.74 - x1.35 at one sd)
BIAS_GRID = 4  # bias field control points per side of the crop
BLUR_MAX_PX = 1.2  # in-plane Gaussian sigma, up to this (1.5 mm pixels: a ~4 mm acquisition at most)
NOISE_MAX = 0.06  # noise sd, up to this fraction of the normalised range


def random_lookup(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``x`` through a random piecewise-linear lookup table: values at :data:`LUT_KNOTS` uniform in [0, 1] (not
    sorted: any brightness order of the tissues); flat beyond the outer knots."""
    return np.interp(x, LUT_KNOTS, rng.uniform(0.0, 1.0, LUT_KNOTS.size)).astype(np.float32)


def bias_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth positive (H, W) field: exp of a cubic-interpolated ``BIAS_GRID`` x ``BIAS_GRID`` Gaussian grid."""
    grid = rng.normal(0.0, BIAS_LOG_SD, (BIAS_GRID, BIAS_GRID))
    zoom = (shape[0] / BIAS_GRID, shape[1] / BIAS_GRID)
    field = ndimage.zoom(grid, zoom, order=3, mode="nearest", grid_mode=True)[: shape[0], : shape[1]]
    return np.exp(field).astype(np.float32)


def randomise_crop(x: np.ndarray, inside: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A randomised copy of one (C, H, W) crop whose channels are slices of the same image (same contrast: one
    lookup table, one bias field for all); ``inside`` (H, W) marks the pixels inside the slice (zero beyond, as
    the net sees padding). Returns float32, normalised like the pipeline's input."""
    y = random_lookup(x, rng) * bias_field(x.shape[1:], rng)[None]
    sigma = rng.uniform(0.0, BLUR_MAX_PX)
    if sigma > 0.2:
        y = ndimage.gaussian_filter(y, (0.0, sigma, sigma))
    y = normalise(np.where(inside[None], y + 1e-3, 0.0))  # normalise reads the non-zero voxels: the slice's own
    y += rng.normal(0.0, rng.uniform(0.0, NOISE_MAX), y.shape).astype(np.float32)
    return (y * inside[None]).astype(np.float32)

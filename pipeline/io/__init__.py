"""Inputs and outputs at the edges of the pipeline.

``discovery`` (walk an input tree, headers only, group files into studies and series), ``tags`` (robust header
values), ``volumes`` (a series' pixels into a Volume in the working frame), ``nifti`` (NIfTI in / out, resampling
through affines), ``masks`` (external label images, ``--masks``), ``atomic`` (atomic file writes).
"""

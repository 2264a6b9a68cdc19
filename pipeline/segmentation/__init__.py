"""Stage 3: vertebral bodies segmented and labelled L1..L5, S1 (entry point: :mod:`pipeline.segmentation.segment`).

Bottom to top: ``grid`` (working grid, normalisation), ``features`` (classifier features), ``unet`` (the 2.5-D
U-Net through ONNX Runtime), ``column`` (column curve, cuts at the discs), ``probability`` (P(body) per voxel),
``bodies`` (shape completion), ``labelling`` (level names), ``refine`` (edges at the input resolution),
``segment`` (the one entry point, ``segment_vertebrae``). The trained models ship in ``models/``.
"""

"""Training the shipped segmentation models (not needed to run the pipeline): ``samples`` (voxel samples of
real cases and phantoms), ``train_segmenter`` (the classifiers and edge refiners), ``train_unet`` (the U-Net;
needs PyTorch, the ``[train]`` extra).
"""

"""Evaluations against expert readings on real data: ``cases`` (the annotated cases, folds, held-out
selections), ``segmentation`` (per-body Dice, HD95 and level names against expert masks).
"""

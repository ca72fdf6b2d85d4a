"""Evaluation metrics: the paper's NME (normalised mean error of the iso-surface against the ground-truth face)."""

from lightning_vrn.metrics.nme import NME, EmptyPredictionError, NMEResult, sample_nme

__all__ = ["NME", "EmptyPredictionError", "NMEResult", "sample_nme"]

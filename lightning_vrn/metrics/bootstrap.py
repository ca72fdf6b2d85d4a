"""Bootstrap confidence intervals for per-sample errors, and paired differences between two methods.

Every method of a comparison is scored on the same test samples, so the honest question "is B
better than A?" is about the per-sample differences ``b_i - a_i``: :func:`paired_difference`
resamples the samples (not the two methods separately), which removes the between-face spread that
both methods share. An interval that contains 0 means the difference is within noise at that level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_vrn.metrics.report import YAW_BUCKETS_DEG, balanced_mean, in_yaw_bucket, yaw_bucket_means

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A statistic with its percentile bootstrap interval: ``estimate`` in ``[low, high]`` at ``level``."""

    estimate: float
    low: float
    high: float
    level: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a difference outside noise)."""
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 3) -> str:
        """``"0.123 [0.110, 0.137]"``."""
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_mean(values, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0) -> Interval:
    """Mean of the finite ``values`` (N,) with a percentile bootstrap interval over the samples."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), level)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(values.mean()), float(low), float(high), level)


def bootstrap_balanced_mean(values, yaw_deg, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                            seed: int = 0) -> Interval:
    """The balanced mean of ``values`` (N,) (:func:`~lightning_vrn.metrics.report.balanced_mean` of the |yaw|-bucket
    means, ``yaw_deg`` (N,) degrees) with a percentile interval from resampling the samples within each bucket."""
    values, yaw_deg = np.asarray(values, dtype=np.float64), np.asarray(yaw_deg, dtype=np.float64)
    rng = np.random.default_rng(seed)
    resampled = []  # (resamples,) means of each non-empty bucket
    for lo, hi in YAW_BUCKETS_DEG:
        inside = values[in_yaw_bucket(yaw_deg, lo, hi)]
        if len(inside):
            resampled.append(inside[rng.integers(0, len(inside), size=(resamples, len(inside)))].mean(axis=1))
    estimate = balanced_mean(yaw_bucket_means(values, yaw_deg))
    if not resampled:
        return Interval(estimate, float("nan"), float("nan"), level)
    tail = (1 - level) / 2
    low, high = np.quantile(np.mean(resampled, axis=0), [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), level)


def paired_difference(values, reference, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                      seed: int = 0) -> Interval:
    """Mean of ``values - reference`` over the samples where both are finite, with a paired bootstrap interval.

    ``values`` and ``reference`` (N,) are two methods' errors on the same N samples, in the same order.
    """
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if values.shape != reference.shape:
        raise ValueError(f"paired samples must have the same shape, got {values.shape} and {reference.shape}")
    both = np.isfinite(values) & np.isfinite(reference)
    return bootstrap_mean(values[both] - reference[both], resamples, level, seed)

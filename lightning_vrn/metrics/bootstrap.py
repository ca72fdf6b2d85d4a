"""Bootstrap confidence intervals for per-sample errors, and paired differences between two methods.

Every method of a comparison is scored on the same test samples, so the honest question "is B
better than A?" is about the per-sample differences ``b_i - a_i``: :func:`seeds_and_faces_difference`
draws the same faces for both (not the two methods separately), which removes the between-face spread that
both methods share. A method trained several times (seeds) varies between trainings as much as the differences a
comparison judges, so it resamples the trainings too, then the faces (a two-level bootstrap; one training: the
faces alone), and :func:`verdict` words a difference from such an interval: within noise when it contains 0.
:func:`bootstrap_mean` is the faces-only interval of one list of values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A statistic with its percentile bootstrap interval: ``estimate`` in ``[low, high]`` at ``level``."""

    estimate: float
    low: float
    high: float
    level: float

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


def seeds_and_faces_mean(values, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0,
                         strata=None) -> Interval:
    """Mean of ``values`` (S, N): S trainings (seeds) of a method scored on the same N faces (NaN: a failed face,
    left out), with a two-level percentile bootstrap interval: each resample draws S trainings with replacement
    and, independently, N faces with replacement, and averages the finite drawn cells. ``strata`` (N,) labels
    (e.g. |yaw| buckets): the mean of the strata's means, faces drawn within each stratum.

    Drawing S of S trainings shrinks their spread by (S - 1) / S, so the trainings' mean deviations are first
    widened by sqrt(S / (S - 1)) (the usual variance correction; the estimate is unchanged). Measured coverage of
    a true difference of 0 (tests/test_bootstrap.py's paired_trainings, 300 repetitions of 3 trainings x 190
    faces, faces' sd 0.09): 0.97 without any spread between trainings, 0.96 with a small one (sd 0.005 per
    training), 0.89 with a large one (0.014, about the make-demo recipe's on real photos), 0.79 when it dominates
    (0.02 against faces' 0.03); 5 trainings bring the large case to 0.94. With 3 trainings no interval knows
    their spread well. One training (S = 1) gives the faces-only interval.
    """
    values = _trainings_by_faces(values)
    rng = np.random.default_rng(seed)
    drawn = _draw_trainings(rng, len(values), resamples)
    return _two_level(rng, [(values, drawn)], resamples, level, strata)


def seeds_and_faces_difference(values, reference, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                               seed: int = 0, strata=None) -> Interval:
    """Mean of ``values`` (S, N) minus mean of ``reference`` (S', N), two methods' trainings on the same N faces,
    with :func:`seeds_and_faces_mean`'s interval, the faces drawn once for both. With S = S' the trainings are
    paired by index (the same seed index drawn for both) and a cell failed in either is left out of both; else
    each method's trainings are drawn on their own."""
    values, reference = _trainings_by_faces(values), _trainings_by_faces(reference)
    if values.shape[1] != reference.shape[1]:
        raise ValueError(f"paired (seeds, faces) tables must have the same faces, got shapes {values.shape} and "
                         f"{reference.shape}")
    rng = np.random.default_rng(seed)
    if values.shape == reference.shape:
        either = ~(np.isfinite(values) & np.isfinite(reference))
        values, reference = np.where(either, np.nan, values), np.where(either, np.nan, reference)
        drawn = _draw_trainings(rng, len(values), resamples)
        pairs = [(values, drawn), (reference, drawn)]
    else:
        pairs = [(values, _draw_trainings(rng, len(values), resamples)),
                 (reference, _draw_trainings(rng, len(reference), resamples))]
    return _two_level(rng, pairs, resamples, level, strata)


def _trainings_by_faces(values) -> np.ndarray:
    """``values`` as float64 (S, N), checked."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"values must be (seeds, faces) with at least one of each, got shape {values.shape}")
    return values


def _widened(values: np.ndarray) -> np.ndarray:
    """(S, N) ``values`` with each training's mean deviation from the grand mean widened by sqrt(S / (S - 1))."""
    finite = np.isfinite(values)
    if len(values) > 1 and finite.any():
        grand = values[finite].mean()
        counts = finite.sum(axis=1, keepdims=True)
        means = np.where(finite, values, 0.0).sum(axis=1, keepdims=True) / np.maximum(counts, 1)
        deviation = np.where(counts > 0, means - grand, 0.0)   # a training without finite faces is left as it is
        values = values + deviation * (np.sqrt(len(values) / (len(values) - 1)) - 1)
    return values


def _draw_trainings(rng: np.random.Generator, trainings: int, resamples: int) -> np.ndarray:
    """(R, S) how often each of S trainings is drawn in each resample."""
    return rng.multinomial(trainings, np.full(trainings, 1 / trainings), size=resamples).astype(np.float64)


def _two_level(rng: np.random.Generator, methods: list, resamples: int, level: float, strata) -> Interval:
    """The first method's (mean of strata) mean minus the second's (if any), each ``(values (S, N), drawn
    trainings (R, S))``, with the percentile interval over faces drawn within each stratum (the same for all)."""
    faces = methods[0][0].shape[1]
    labels = np.zeros(faces) if strata is None else np.asarray(strata)
    estimates, resampled = np.zeros(len(methods)), np.zeros((len(methods), resamples))
    groups = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    groups = [group for group in groups if all(np.isfinite(values[:, group]).any() for values, _ in methods)]
    if not groups:
        return Interval(float("nan"), float("nan"), float("nan"), level)
    for group in groups:
        drawn_faces = rng.multinomial(len(group), np.full(len(group), 1 / len(group)), size=resamples)  # (R, n)
        for m, (values, drawn_trainings) in enumerate(methods):
            cells, finite = values[:, group], np.isfinite(values[:, group])
            estimates[m] += cells[finite].mean() / len(groups)
            cells = _widened(cells)
            sums = ((drawn_trainings @ np.where(finite, cells, 0.0)) * drawn_faces).sum(axis=1)
            counts = ((drawn_trainings @ finite) * drawn_faces).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                resampled[m] += sums / counts / len(groups)
    statistic = resampled[0] - (resampled[1] if len(methods) > 1 else 0.0)
    statistic = statistic[np.isfinite(statistic)]
    tail = (1 - level) / 2
    low, high = np.quantile(statistic, [tail, 1 - tail])
    return Interval(float(estimates[0] - (estimates[1] if len(methods) > 1 else 0.0)), float(low), float(high), level)


def verdict(difference: Interval) -> str:
    """``"better"`` (an error difference whose interval lies below 0), ``"worse"`` (above 0) or
    ``"within noise"``."""
    if difference.high < 0:
        return "better"
    return "worse" if difference.low > 0 else "within noise"

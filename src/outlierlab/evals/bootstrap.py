"""Percentile bootstrap over windows: the one way outlierlab puts an interval on a number measured over windows.

A statistic measured on W windows (sequences) is recomputed on `resamples` seeded draws of W windows with
replacement; its interval is the [2.5, 97.5] percentiles of those draws (no interpolation between order statistics,
so an inf bound stays inf). A comparison of two variants measured on the same windows is *paired*: both are
resampled at the same indices, so the spread that the windows share cancels. `BOOTSTRAP` is recorded beside every
interval as `ci_method`. Windows are not independent draws from one text (sequential windows are consecutive), so
read an interval as the spread over these windows, not a guarantee.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

BOOTSTRAP = {"method": "percentile bootstrap over windows", "level": 0.95, "resamples": 2000, "seed": 0}


def resample_indices(count: int, method: dict = BOOTSTRAP) -> np.ndarray:
    """[resamples, count] window indices drawn with replacement (seeded: the same draws for every statistic)."""
    return np.random.default_rng(method["seed"]).integers(0, count, size=(method["resamples"], count))


def resample_weights(count: int, method: dict = BOOTSTRAP) -> np.ndarray:
    """[resamples, count]: how often each window is drawn in each resample (the same draws as resample_indices), for
    statistics that are sums over windows: resampled sums = weights @ per-window sums."""
    indices = resample_indices(count, method)
    weights = np.zeros(indices.shape, dtype=np.float64)
    np.add.at(weights, (np.arange(indices.shape[0])[:, None], indices), 1.0)
    return weights


def percentile_interval(samples, method: dict = BOOTSTRAP) -> list[float]:
    """[low, high] of the bootstrap samples; NaN bounds when any sample is NaN."""
    samples = np.asarray(samples, dtype=np.float64)
    if np.isnan(samples).any():
        return [math.nan, math.nan]
    tail = 50 * (1 - method["level"])
    return [float(v) for v in np.percentile(samples, [tail, 100 - tail], method="inverted_cdf")]


def interval(statistic: Callable[[np.ndarray], np.ndarray], count: int, method: dict = BOOTSTRAP) -> list[float]:
    """Interval of `statistic(indices)` -> one value per resample, over `count` windows; NaN with fewer than 2."""
    if count < 2:
        return [math.nan, math.nan]
    return percentile_interval(statistic(resample_indices(count, method)), method)

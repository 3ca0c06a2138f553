"""Bootstrap intervals: the one home of the resampling code used by the comparison of labels (units resampled),
the naming study's agreement (units, or annotators, resampled) and the ablation's paired difference (images
resampled).

Every interval here is the percentile 95% interval of a statistic over resamples drawn with replacement. Which
items are resampled is the caller's choice and must be the independent ones: a pool of activation maps holds
several maps of each unit, so maps of one unit rise and fall together and resampling maps one by one would make
intervals too narrow; the study resamples whole units (a cluster bootstrap, `cluster_weights`). A mean over
annotators resamples annotators (`annotator_mean`).

Pure numpy; nothing here knows the project database or Qt.
"""
from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

# Percentiles of the 95% interval.
LEVELS = (2.5, 97.5)


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def text(self, digits: int = 3) -> str:
        if not math.isfinite(self.value):
            return "—"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    @property
    def known(self) -> bool:
        """True when the interval was estimated (finite bounds)."""
        return math.isfinite(self.low) and math.isfinite(self.high)


NAN = Interval(math.nan, math.nan, math.nan)


def keyed_rng(seed: int, *key: str) -> np.random.Generator:
    """A generator of its own per (seed, key): one stream per row or comparison, so that its interval does not
    change when other rows are added or computed in another order."""
    return np.random.default_rng([seed, zlib.crc32("\0".join(key).encode())])


def percentile_interval(value: float, samples: np.ndarray) -> Interval:
    """`value` with the 95% percentile interval of `samples` (resampled statistics; NaN ones, from resamples
    where the statistic is undefined, are left out). Without any finite sample the bounds are NaN."""
    samples = np.asarray(samples, dtype=np.float64).reshape(-1)
    samples = samples[np.isfinite(samples)]
    if not samples.size:
        return Interval(float(value), math.nan, math.nan)
    low, high = np.percentile(samples, LEVELS)
    return Interval(float(value), float(low), float(high))


def bootstrap(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> Interval:
    """Mean and percentile 95% interval of the mean over items resampled with replacement."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return NAN
    mean = float(values.mean())
    if n == 1 or n_boot <= 0:
        return Interval(mean, mean, mean)
    means = values[rng.integers(0, n, size=(n_boot, n))].mean(1)
    low, high = np.percentile(means, LEVELS)
    return Interval(mean, float(low), float(high))


def cluster_weights(clusters: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, M] int: how many times each of M items enters each resample when whole clusters are drawn with
    replacement (`clusters[m]` is item m's cluster, e.g. the unit of a map). A statistic computed with these
    weights (counts) equals the statistic on the resample with every item repeated that many times."""
    clusters = np.asarray(clusters).reshape(-1)
    ids, member_of = np.unique(clusters, return_inverse=True)
    k = len(ids)
    if k == 0 or n_boot <= 0:
        return np.zeros((max(n_boot, 0), len(clusters)), dtype=np.int64)
    draws = rng.integers(0, k, size=(n_boot, k))
    times = np.zeros((n_boot, k), dtype=np.int64)
    np.add.at(times, (np.arange(n_boot)[:, None], draws), 1)
    return times[:, member_of]


def annotator_mean(matrix: np.ndarray, n_boot: int, rng: np.random.Generator) -> Interval:
    """Mean of a symmetric [H, H] pairwise statistic between H annotators over pairs of distinct annotators, with
    a 95% interval over annotators resampled with replacement: a resample draws H annotators and averages over
    the pairs of draws that are two different annotators (a person is not compared with themself). With two
    annotators there is one pair and nothing to resample: the bounds are NaN. (One method against each of H
    annotators is a plain mean over annotators: `bootstrap`.)"""
    m = np.asarray(matrix, dtype=np.float64)
    h = m.shape[0]
    if h < 2:
        return NAN
    iu = np.triu_indices(h, 1)
    value = float(np.nanmean(m[iu])) if np.isfinite(m[iu]).any() else math.nan
    if h < 3 or n_boot <= 0:
        # two annotators have one pair: resampling them says nothing about other annotators
        return Interval(value, math.nan, math.nan)
    draws = rng.integers(0, h, size=(n_boot, h))
    a = draws[:, :, None]
    b = draws[:, None, :]
    upper = np.triu(np.ones((h, h), dtype=bool), 1)[None]
    pair = upper & (a != b)
    vals = np.where(pair, m[a, b], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of one annotator drawn H times: no pair
        means = np.nanmean(vals, axis=(1, 2))
    return percentile_interval(value, means)

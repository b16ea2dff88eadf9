"""Exact latency statistics and batch-size histograms.

Percentiles are computed from every sample (no window, no sketch): the
nearest-rank definition, value at index ceil(q * n) - 1 of the sorted
samples, so p100 is the maximum and every reported value is a real sample.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

PERCENTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "p99.9": 0.999}


def nearest_rank(sorted_values: np.ndarray, q: float) -> float:
    """The q-quantile (0 < q <= 1) of already sorted samples, nearest rank."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    # The epsilon keeps float error (0.6 * 5 = 3.0000000000000004) from
    # moving the rank up by one.
    index = min(n - 1, max(0, math.ceil(q * n - 1e-9) - 1))
    return float(sorted_values[index])


def latency_summary(samples_ns: np.ndarray) -> dict:
    """p50/p90/p99/p99.9/max/mean of latency samples, in microseconds."""
    ordered = np.sort(np.asarray(samples_ns, dtype=np.int64))
    summary = {name: nearest_rank(ordered, q) / 1e3 for name, q in PERCENTILES.items()}
    summary["max"] = float(ordered[-1]) / 1e3 if len(ordered) else float("nan")
    summary["mean"] = float(ordered.mean()) / 1e3 if len(ordered) else float("nan")
    return summary


def cdf_points(samples_ns: np.ndarray, points: int = 200) -> list[list[float]]:
    """[latency_us, fraction] pairs sampling the empirical CDF (for plots)."""
    ordered = np.sort(np.asarray(samples_ns, dtype=np.int64))
    n = len(ordered)
    if n == 0:
        return []
    ranks = np.arange(1, points + 1, dtype=np.int64)
    indices = np.minimum(n - 1, (ranks * n + points - 1) // points - 1)  # ceil, in integers
    return [[float(ordered[i]) / 1e3, float(k) / points] for i, k in zip(indices, ranks)]


def merge_histograms(histograms: Iterable[Mapping[int, int]]) -> dict[int, int]:
    """Sum of batch-size histograms {size: batches}."""
    total: Counter = Counter()
    for histogram in histograms:
        for size, count in histogram.items():
            total[int(size)] += int(count)
    return dict(sorted(total.items()))


def histogram_mean(histogram: Mapping[int, int]) -> float:
    """Mean batch size of a {size: batches} histogram (requests per batch)."""
    batches = sum(histogram.values())
    if batches == 0:
        return 0.0
    return sum(size * count for size, count in histogram.items()) / batches

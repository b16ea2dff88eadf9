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


def fast_path_summary(after: Mapping, before: Mapping | None = None) -> dict:
    """The fast path's share of the requests a server served, from its
    ``stats()``: ``server_requests`` and ``fast_path_requests`` (counts),
    ``fast_path_fraction`` (0 to 1), ``fast_path_refusals`` (reason ->
    requests that took the general path) and ``inline_requests`` (served on
    their caller's thread), each None where the stats do not say (torchrl's
    server, or keys a batchserve version does not report yet).

    ``after`` is the snapshot at the end of the measurement, ``before`` one
    at its start (after any reset of the counters). The counts and refusals
    are their differences, so a reset the server ignores for some counter
    still leaves the warm-up out. The server's own ``fast_path_fraction`` is
    taken when ``after`` covers the measurement alone (no ``before``, or its
    request count is 0: the counters started from the reset); otherwise it
    would include earlier requests, and the fraction is
    fast_path_requests / requests of the differences.
    """
    before = before or {}
    requests, fast = after.get("requests"), after.get("fast_path_requests")
    has_counts = fast is not None and requests is not None
    if has_counts:
        requests -= before.get("requests") or 0
        fast -= before.get("fast_path_requests") or 0
    refusals = after.get("fast_path_refusals")
    if isinstance(refusals, Mapping):
        earlier = before.get("fast_path_refusals") or {}
        refusals = {str(reason): int(count) - int(earlier.get(reason, 0))
                    for reason, count in refusals.items()}
        refusals = {reason: count for reason, count in refusals.items() if count > 0}
    else:
        refusals = None
    inline = after.get("inline_requests")
    if inline is not None:
        inline -= before.get("inline_requests") or 0
    fraction = after.get("fast_path_fraction") if not before.get("requests") else None
    if fraction is not None:
        fraction = float(fraction)
        if math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
            fraction = None
    if fraction is None and has_counts and requests > 0:
        fraction = min(1.0, max(0.0, fast / requests))
    return {
        "server_requests": int(requests) if has_counts else None,
        "fast_path_requests": int(fast) if has_counts else None,
        "fast_path_fraction": fraction,
        "fast_path_refusals": refusals,
        "inline_requests": int(inline) if inline is not None else None,
    }


def percent_text(fraction: float | None) -> str:
    """A fast-path fraction as the tables' "fast %" cell: one decimal,
    rounded down (so "100.0" means every request), "—" for None."""
    if fraction is None:
        return "—"
    return f"{math.floor(1000.0 * fraction + 1e-9) / 10.0:.1f}"


def refusals_text(refusals: Mapping[str, int]) -> str:
    """A server's fast_path_refusals as the reports print them: reason and
    count, the most frequent first."""
    return ", ".join(f"{reason} {count:,}" for reason, count in
                     sorted(refusals.items(), key=lambda kv: -kv[1]))


def merge_fast_path(summaries: Iterable[Mapping], weights: Iterable[int]) -> dict:
    """:func:`fast_path_summary` over several measurements (rounds): the
    fraction of all their counted requests when every one has counts, else
    the mean of their fractions weighted by ``weights`` (the requests each
    measured), else None; refusals summed over those that report them."""
    summaries, weights = list(summaries), list(weights)
    counted = [s for s in summaries if s.get("server_requests") is not None]
    requests = fast = None
    fraction = None
    if summaries and len(counted) == len(summaries):
        requests = sum(s["server_requests"] for s in counted)
        fast = sum(s["fast_path_requests"] for s in counted)
        if requests > 0:
            fraction = fast / requests
    if fraction is None:
        known = [(s["fast_path_fraction"], w) for s, w in zip(summaries, weights)
                 if s.get("fast_path_fraction") is not None]
        total = sum(w for _, w in known)
        if known and total > 0:
            fraction = sum(f * w for f, w in known) / total
    refusals = None
    for s in summaries:
        if s.get("fast_path_refusals") is not None:
            refusals = refusals or {}
            for reason, count in s["fast_path_refusals"].items():
                refusals[reason] = refusals.get(reason, 0) + count
    inline = [s.get("inline_requests") for s in summaries]
    return {
        "server_requests": requests,
        "fast_path_requests": fast,
        "fast_path_fraction": fraction,
        "fast_path_refusals": refusals,
        "inline_requests": sum(inline) if inline and None not in inline else None,
    }

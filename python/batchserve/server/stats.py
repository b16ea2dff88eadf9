"""Server statistics: counters, recent-latency percentiles, batch sizes."""

from __future__ import annotations

import collections
import threading
import time

from batchserve import _core


def percentile(values, q: float) -> float:
    """Nearest-rank percentile (index ``round((n - 1) * q)``), 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[int(round((len(ordered) - 1) * q))])


# stats()["fast_path_refusals"]: distinct reasons kept, and the entry that
# counts the requests refused for any further one.
MAX_REFUSAL_REASONS = 64
OTHER_REFUSALS = f"other reasons (beyond {MAX_REFUSAL_REASONS} kinds)"


class ServerStats:
    """Thread-safe accounting for :meth:`InferenceServer.stats`.

    Counters and the batch-size histogram are exact since the last reset;
    queue-wait, forward and server-time percentiles are over the most recent
    ``window_size`` samples.

    Beyond torchrl's keys:

    * ``p50_server_ms`` / ``p95_server_ms`` / ``mean_server_ms``: per request,
      from its submission to the end of the hand-back of its batch (queue,
      forward, results handed back): how long a caller waits on the server.
    * ``p50_client_gap_ms`` / ``mean_client_gap_ms``: per caller (a
      submitting thread of a ``ThreadingTransport``, a slot of a
      ``SharedMemoryTransport``: a client takes the slot it used last), the
      time from its result being handed back to its next request: its env
      step and the rest outside the server. Not measured for other
      transports.
    * ``inference_bound_fraction``: mean server time / (mean server time +
      mean client gap): near 1, actors mostly wait on inference; near 0, they
      are env-bound (pytorch/rl #4061). NaN until a gap is measured.
    * ``interaction_split_batches``: collected batches whose requests asked
      for different interaction types and were served as one forward per
      type (each counted in ``batches``, one per forward).
    * ``fast_path_fraction``: ``fast_path_requests / requests`` (NaN before
      any request).
    * ``inline_requests``: requests served on their caller's own thread
      while the server was idle (``inline_calls``; counted in ``requests``
      and ``batches`` as batches of one).
    * ``padding_rows`` / ``padding_fraction`` (``static_batch_size``): rows
      of padding the CUDA graphs computed (a batch padded to its bucket by
      repeating its last request), and their share of all the rows the
      graphs computed (NaN before any graphed forward);
      ``padded_batch_histogram``: graphed forwards per bucket size.
    * ``server_spin_us`` (a batchserve transport's server): how long the
      server now spins for its next request before it sleeps, learned from
      the gaps it waited (``csrc/core/spin_budget.h``); 0 when it sleeps at
      once.
    * ``fast_path_refusals``: for the requests served on the general path,
      why each could not take the fast path, ``{reason: count}``: a custom
      ``collate_fn``, a transport without batchserve's queue, a leaf that is
      not a contiguous CPU tensor, another schema than the served one... so
      that a user can see what to change.
    """

    def __init__(self, window_size: int = 1024):
        if window_size < 1:
            raise ValueError("stats_window_size must be at least 1.")
        self._window_size = window_size
        self._lock = threading.Lock()
        # Requests, batches and their latencies: recorded in C++, where the
        # fast path records a batch without a Python object per request.
        self.core = _core.ServerStatsCore(window_size)
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.core.reset()
            self._clear()

    def _clear(self) -> None:
        """Clears what is kept here (the core is reset by its owner's call:
        reset(), or snapshot() in the same step as it reads it)."""
        self._started = time.monotonic()
        self._failed_batches = 0
        self._weight_updates = 0
        self._weight_sync_errors = 0
        self._weight_apply_ms = collections.deque(maxlen=self._window_size)
        self._interaction_splits = 0
        self._graphed_rows = 0
        self._padding_rows = 0
        self._bucket_histogram: collections.Counter = collections.Counter()
        self._refusals: collections.Counter = collections.Counter()

    def record_batch(self, size: int, forward_ms: float, submitted_ns=(),
                     dispatch_ns: int = 0, fast_path: bool = False) -> None:
        """One forward over ``size`` requests, submitted at ``submitted_ns``
        (None: unknown) and dispatched at ``dispatch_ns``. (The fast path
        records through ``_core.Batch.record_rows``.)"""
        self.core.record_batch([size], forward_ms, fast_path, False,
                               [s for s in submitted_ns if s is not None], dispatch_ns)

    def record_hand_back(self, submitted_ns, callers, end_ns: int) -> None:
        """A batch handed back at ``end_ns``: each request's server time,
        and each caller's gap since its previous result (``callers``: one per
        request, 0 or none at all: unknown)."""
        if not callers:
            callers = [0] * len(submitted_ns)
        known = [(s, c) for s, c in zip(submitted_ns, callers) if s is not None]
        self.core.record_hand_back([s for s, _ in known], [c for _, c in known], end_ns)

    def record_refusals(self, reasons: list) -> None:
        """Why each of a batch's general-path requests missed the fast path.
        At most :data:`MAX_REFUSAL_REASONS` distinct reasons are kept (they
        name shapes: variable-length requests would grow the table without
        bound); later ones count under :data:`OTHER_REFUSALS`."""
        with self._lock:
            counts = self._refusals
            for reason in reasons:
                if reason not in counts and len(counts) >= MAX_REFUSAL_REASONS:
                    reason = OTHER_REFUSALS
                counts[reason] += 1

    def record_padding(self, rows: int, bucket: int) -> None:
        """One graphed forward: `rows` requests padded to `bucket` rows."""
        with self._lock:
            self._graphed_rows += bucket
            self._padding_rows += bucket - rows
            self._bucket_histogram[bucket] += 1

    def record_interaction_split(self) -> None:
        with self._lock:
            self._interaction_splits += 1

    def record_failed_batch(self) -> None:
        with self._lock:
            self._failed_batches += 1

    def record_weight_update(self, apply_ms: float | None = None) -> None:
        """One applied update; `apply_ms`: how long it held the model lock
        (what a forward could wait for), where the server copied it in."""
        with self._lock:
            self._weight_updates += 1
            if apply_ms is not None:
                self._weight_apply_ms.append(apply_ms)

    def record_weight_sync_error(self) -> None:
        with self._lock:
            self._weight_sync_errors += 1

    @property
    def weight_sync_errors(self) -> int:
        return self._weight_sync_errors

    def snapshot(self, policy_version: int, reset: bool = False) -> dict:
        with self._lock:
            core = self.core.snapshot(reset)
            elapsed = max(time.monotonic() - self._started, 1e-12)
            queue_ms, forward_ms = core.queue_ms, core.forward_ms
            server_ms, gap_ms = core.server_ms, core.client_gap_ms
            apply_ms = list(self._weight_apply_ms)
            mean_gap = sum(gap_ms) / len(gap_ms) if gap_ms else 0.0
            mean_server = sum(server_ms) / len(server_ms) if server_ms else 0.0
            requests, batches = core.requests, core.batches
            result = {
                "requests": requests,
                "fast_path_requests": core.fast_path_requests,
                "inline_requests": core.inline_requests,
                "batches": batches,
                "failed_batches": self._failed_batches,
                "requests_per_s": requests / elapsed,
                "batches_per_s": batches / elapsed,
                "avg_batch_size": requests / batches if batches else 0.0,
                "p50_queue_ms": percentile(queue_ms, 0.50),
                "p95_queue_ms": percentile(queue_ms, 0.95),
                "p99_queue_ms": percentile(queue_ms, 0.99),
                "p50_forward_ms": percentile(forward_ms, 0.50),
                "p95_forward_ms": percentile(forward_ms, 0.95),
                "p99_forward_ms": percentile(forward_ms, 0.99),
                "p50_server_ms": percentile(server_ms, 0.50),
                "p95_server_ms": percentile(server_ms, 0.95),
                "mean_server_ms": mean_server,
                "p50_client_gap_ms": percentile(gap_ms, 0.50),
                "mean_client_gap_ms": mean_gap,
                "inference_bound_fraction": mean_server / (mean_server + mean_gap)
                if gap_ms and mean_server + mean_gap > 0
                else float("nan"),
                "interaction_split_batches": self._interaction_splits,
                "fast_path_fraction": core.fast_path_requests / requests
                if requests
                else float("nan"),
                "fast_path_refusals": dict(self._refusals.most_common()),
                "padding_rows": self._padding_rows,
                "padding_fraction": self._padding_rows / self._graphed_rows
                if self._graphed_rows
                else float("nan"),
                "padded_batch_histogram": dict(sorted(self._bucket_histogram.items())),
                "batch_size_histogram": dict(core.batch_sizes),
                "policy_version": policy_version,
                "weight_updates": self._weight_updates,
                "weight_sync_errors": self._weight_sync_errors,
                "p50_weight_apply_ms": percentile(apply_ms, 0.50),
                "max_weight_apply_ms": max(apply_ms) if apply_ms else float("nan"),
            }
            if reset:
                self._clear()
        return result

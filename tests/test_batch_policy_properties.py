"""Property tests of the C++ batching policy through its bindings."""

from __future__ import annotations

from concurrent.futures import Future

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchserve import _core

_settings = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(
    queued=st.integers(min_value=0, max_value=200),
    max_batch_size=st.integers(min_value=1, max_value=70),
    min_batch_size=st.integers(min_value=1, max_value=80),
)
def test_batches_are_fifo_complete_and_within_bounds(queued, max_batch_size, min_batch_size):
    """Whatever is queued comes out in order, each request exactly once, in
    batches of 1..max_batch_size; a batch is smaller than min_batch_size only
    when the queue ran dry (its deadline has long passed here)."""
    queue = _core.RequestQueue(256)
    queue.configure(max_batch_size, min_batch_size, 0.0)
    futures = [Future() for _ in range(queued)]
    for i, f in enumerate(futures):
        queue.submit(i, f)
    seen = []
    while True:
        batch = queue.collect()
        if batch is None:
            break
        items = batch.items
        assert 1 <= len(items) <= max_batch_size
        remaining = queued - len(seen) - len(items)
        if len(items) < min(min_batch_size, max_batch_size):
            assert remaining == 0  # short only because nothing else was queued
        seen.extend(items)
        batch.resolve(items)
    assert seen == list(range(queued))
    assert [f.result(timeout=0) for f in futures] == list(range(queued))


@_settings
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8),
    max_batch_size=st.integers(min_value=1, max_value=16),
)
def test_withdrawn_requests_are_never_batched(sizes, max_batch_size):
    """Requests whose callers timed out before batching never reach a batch
    and do not count toward its size."""
    queue = _core.RequestQueue(512)
    queue.configure(max_batch_size, 1, 0.0)
    expected = []
    next_id = 0
    for n in sizes:
        for _ in range(n):
            future = Future()
            queue.submit(next_id, future)
            expected.append(next_id)
            next_id += 1
        # A blocking caller that gives up at once (timeout 0) is withdrawn.
        try:
            queue.call(-1, 0.0)
        except TimeoutError:
            pass
    seen = []
    while (batch := queue.collect()) is not None:
        assert 1 <= len(batch) <= max_batch_size
        seen.extend(batch.items)
        batch.resolve(batch.items)
    assert seen == expected

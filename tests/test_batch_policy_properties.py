"""Property tests of the C++ batching policy through its bindings."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchserve import _core
from batchserve.batching import native
from batchserve.transports.queued_future import QueuedFuture

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
    futures = [QueuedFuture(queue.submit_pending(i)) for i in range(queued)]
    seen = []
    while True:
        batch = native.collect(queue)
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
            queue.submit_pending(next_id)  # a submitted request (its future dropped)
            expected.append(next_id)
            next_id += 1
        # A blocking caller that gives up at once (timeout 0) is withdrawn.
        try:
            queue.call(-1, 0.0)
        except TimeoutError:
            pass
    seen = []
    while (batch := native.collect(queue)) is not None:
        assert 1 <= len(batch) <= max_batch_size
        seen.extend(batch.items)
        batch.resolve(batch.items)
    assert seen == expected


# ---------------------------------------------------------------------------
# Timing: the policy on a real clock, with a submitter thread shaping an
# arrival schedule and a server thread that collects, "runs" each batch for a
# given forward duration (a sleep) and resolves it.
#
# Every assertion is either exact or a lower bound on when a batch may leave
# (scheduling noise only ever makes things later), except the wait bound,
# an upper bound that is given WAIT_SLACK_NS of room for a loaded machine.
# The arrival schedules are made so that the bugs it is there to catch (a
# deadline that later arrivals extend, a min_batch_size waited for forever)
# overshoot it by far more than that slack.

# Room in the wait bound for a loaded machine: threads descheduled between a
# request's arrival stamp and its push, a server woken late, the GIL taken
# back late. An upper bound only; nothing else depends on it.
WAIT_SLACK_NS = 500_000_000
# A request whose submit() returned this long before a collect began was in
# the ring when that collect took what was ready (the stamp is taken after
# the push; the margin only covers cross-core clock and store ordering).
PUSHED_MARGIN_NS = 1_000_000


def _timeout_ns(timeout_s: float) -> int:
    # What the core makes of it (seconds_to_ns: seconds * 1e9, truncated).
    return int(timeout_s * 1e9)


@dataclass
class _Collect:
    """One q.collect() call of the server: when it began and returned (the
    dispatch time of its batch), and what it returned."""

    start_ns: int
    end_ns: int
    items: list | None = None
    submitted_ns: list | None = None


@dataclass
class _Run:
    collects: list  # every collect() call, in order
    submitted_ns: list  # per request: its arrival stamp, from the batch
    pushed_ns: list  # per request: after its submit() returned
    futures: list


def _run_schedule(gaps_s, max_batch_size, min_batch_size, timeout_s, forward_s, capacity=64):
    """Submits len(gaps_s) requests (request i after sleeping gaps_s[i]) to a
    queue that a server thread collects from, each batch taking forward_s
    to "run"; returns what happened once every request was dispatched."""
    n = len(gaps_s)
    queue = _core.RequestQueue(capacity)
    queue.configure(max_batch_size, min_batch_size, timeout_s)
    futures = [None] * n
    pushed_ns = [None] * n
    collects: list[_Collect] = []
    all_dispatched = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []

    def submitter():
        try:
            for i, gap in enumerate(gaps_s):
                if gap > 0:
                    time.sleep(gap)  # shapes the arrival schedule
                futures[i] = QueuedFuture(queue.submit_pending(i))
                pushed_ns[i] = _core.monotonic_ns()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def server():
        try:
            dispatched = 0
            while not stop.is_set():
                call = _Collect(_core.monotonic_ns(), 0)
                batch = native.collect(queue)
                call.end_ns = _core.monotonic_ns()
                collects.append(call)
                if batch is None:
                    continue
                call.items = list(batch.items)
                call.submitted_ns = list(batch.submitted_ns)
                if forward_s > 0:
                    time.sleep(forward_s)  # the model's forward
                batch.resolve(call.items)
                dispatched += len(call.items)
                if dispatched >= n:
                    all_dispatched.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    # A hang guard only: a policy that waits for min_batch_size forever never
    # dispatches everything.
    guard_s = 10 + sum(gaps_s) + n * (timeout_s + forward_s) * 2
    threads = [threading.Thread(target=server, daemon=True),
               threading.Thread(target=submitter, daemon=True)]
    for t in threads:
        t.start()
    finished = all_dispatched.wait(guard_s)
    stop.set()
    queue.close()  # a collect() in progress returns at once
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "server or submitter thread hung"
    assert not errors, errors
    assert finished, (
        f"only {sum(len(c.items) for c in collects if c.items)} of {n} requests "
        f"dispatched within {guard_s:.1f} s")
    submitted = [None] * n
    for c in collects:
        for item, t in zip(c.items or [], c.submitted_ns or []):
            submitted[item] = t
    return _Run(collects, submitted, pushed_ns, futures)


def _check_timing(run: _Run, n, max_batch_size, min_batch_size, timeout_s):
    timeout_ns = _timeout_ns(timeout_s)
    batches = [c for c in run.collects if c.items is not None]
    effective_min = min(min_batch_size, max_batch_size)

    # (d) Every request dispatched exactly once, in arrival (FIFO) order, and
    # resolved with its own result.
    order = [item for c in batches for item in c.items]
    assert order == list(range(n))
    assert [f.result(timeout=0) for f in run.futures] == list(range(n))
    assert run.submitted_ns == sorted(run.submitted_ns)

    # (a) Batch sizes within [1, max_batch_size].
    for c in batches:
        assert 1 <= len(c.items) <= max_batch_size

    # (b) min_batch_size is honoured until the deadline: a batch smaller than
    # min(min_batch_size, max_batch_size) leaves no earlier than its oldest
    # request's arrival + timeout. A lower bound: exact, no slack (the core
    # returns only once monotonic_ns() >= deadline, on the clock of these
    # stamps, and the dispatch stamp is taken after collect() returned).
    # This also holds for a first request pushed as the idle wait times out:
    # collect_batch then collects toward min_batch_size as for any other.
    for c in batches:
        if len(c.items) < effective_min:
            oldest = min(c.submitted_ns)
            assert c.end_ns >= oldest + timeout_ns, (
                f"batch of {len(c.items)} < min {effective_min} left "
                f"{(oldest + timeout_ns - c.end_ns) / 1e6:.3f} ms before its deadline")

    # (e) What is ready is taken, up to max_batch_size: a batch that leaves
    # behind a request which was already in the queue when its collect()
    # began is full. So every forward a request sits through carries older
    # requests that could not fit, and the wait bound below cannot be met by
    # splitting batches needlessly. Exact (the margin orders the stamps).
    dispatched_in = {}
    for k, c in enumerate(batches):
        for item in c.items:
            dispatched_in[item] = k
    for k, c in enumerate(batches):
        left_behind = [
            r for r in range(n)
            if dispatched_in[r] > k and run.pushed_ns[r] + PUSHED_MARGIN_NS < c.start_ns
        ]
        if left_behind:
            assert len(c.items) == max_batch_size, (
                f"batch of {len(c.items)} < max {max_batch_size} left queued "
                f"requests {left_behind} behind")

    # (c) The wait bound. A request r arriving at a and dispatched at D waits
    #     D - a <= timeout + F(r) + WAIT_SLACK_NS,
    # where F(r) is the time within [a, D] the server spent outside collect()
    # -- running forwards (each measured, dispatch to next collect() call).
    # Equivalently: of r's wait, at most `timeout` is spent collecting.
    # Why: the collect() that takes r returns by max(its start, oldest + timeout)
    # with oldest <= a (FIFO), so by a + timeout if it began before that; each
    # other collect() during r's wait returns at once, as it either left r
    # behind because it was full (it began with r queued, see (e)) or was
    # already returning when r arrived. So r waits at most `timeout` plus the
    # forwards: at most the one in progress when it arrived, then one per
    # full batch of older requests ahead of it (ceil(ahead / max_batch_size)
    # when more than max_batch_size requests queue up), all inside F(r).
    # With an idle server F(r) = 0: no request waits longer than `timeout`.
    # A deadline that later arrivals extend, or a min_batch_size waited for
    # past the deadline, spends that time collecting and breaks it.
    collecting = [(c.start_ns, c.end_ns) for c in run.collects]
    for r in range(n):
        a = run.submitted_ns[r]
        d = batches[dispatched_in[r]].end_ns
        in_collect = sum(max(0, min(e, d) - max(s, a)) for s, e in collecting)
        forwarding = (d - a) - in_collect
        assert d - a <= timeout_ns + forwarding + WAIT_SLACK_NS, (
            f"request {r} waited {(d - a) / 1e6:.1f} ms, {in_collect / 1e6:.1f} ms of it "
            f"while the server was collecting (timeout {timeout_ns / 1e6:.1f} ms)")


@pytest.mark.timeout(120)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    timeout_ms=st.integers(min_value=5, max_value=30),
    max_batch_size=st.integers(min_value=1, max_value=8),
    # 1 (the default: dispatch what is ready) drawn more often.
    min_batch_size=st.one_of(st.just(1), st.integers(min_value=1, max_value=10)),
    forward_ms=st.integers(min_value=0, max_value=10),
    # Each gap in tenths of the timeout: 0 (a burst, drawn more often, so that
    # more than max_batch_size requests queue up behind a forward) to
    # 2 * timeout (idle waits that time out). The first is the delay before
    # the first request.
    gaps=st.lists(st.one_of(st.just(0), st.integers(min_value=0, max_value=20)),
                  min_size=1, max_size=12),
)
def test_batch_timing(timeout_ms, max_batch_size, min_batch_size, forward_ms, gaps):
    """Real-time arrival schedules: batch sizes within [1, max_batch_size],
    short batches only after their deadline, no request waits longer than
    the timeout plus the forwards it had to wait for, FIFO."""
    timeout_s = timeout_ms / 1000
    gaps_s = [g * timeout_s / 10 for g in gaps]
    run = _run_schedule(gaps_s, max_batch_size, min_batch_size, timeout_s, forward_ms / 1000)
    _check_timing(run, len(gaps), max_batch_size, min_batch_size, timeout_s)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("forward_ms", [0, 3])
def test_trickle_below_min_batch_size_never_extends_the_deadline(forward_ms):
    """Requests keep coming every timeout / 2 for 2 s and min_batch_size is
    never reached. Each batch must still leave at its oldest request's
    deadline: a policy that let later arrivals extend the deadline would keep
    the first batch open for the whole trickle, ~2 s, far past the wait bound
    (timeout + 0.5 s slack); one that waited for min_batch_size would never
    dispatch (the hang guard)."""
    timeout_s = 0.02
    n = 200
    run = _run_schedule([timeout_s / 2] * n, 1024, 1024, timeout_s, forward_ms / 1000,
                        capacity=1024)
    _check_timing(run, n, 1024, 1024, timeout_s)
    # Every batch was short, so every one went by (b) at or after its deadline.
    assert all(len(c.items) < 1024 for c in run.collects if c.items)

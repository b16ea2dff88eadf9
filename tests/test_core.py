"""The bindings of the C++ core (batchserve._core) used directly, with the
Python layer that notifies the QueuedFutures of their requests
(batchserve.batching.native): reference ownership across the boundary and
the exactly-once rule for a batch."""

from __future__ import annotations

import sys
import threading

import pytest

from batchserve import _core
from batchserve.batching import native
from batchserve.transports.queued_future import QueuedFuture


def make_queue(max_batch_size=8, min_batch_size=1, timeout=0.01, capacity=16):
    queue = _core.RequestQueue(capacity)
    queue.configure(max_batch_size, min_batch_size, timeout)
    return queue


def submit(queue, payload) -> QueuedFuture:
    """What ThreadingTransport.submit does: the request's future."""
    return QueuedFuture(queue.submit_pending(payload))


def submit_payloads(queue, n):
    """Submits n plain objects; returns them, their futures and their
    reference counts before submission."""
    payloads = [object() for _ in range(n)]
    before = [sys.getrefcount(p) for p in payloads]
    futures = [submit(queue, payload) for payload in payloads]
    return payloads, futures, before


def test_references_return_after_resolve():
    queue = make_queue()
    payloads, futures, before = submit_payloads(queue, 3)
    batch = native.collect(queue)
    assert batch.items == payloads
    results = [object() for _ in range(3)]
    batch.resolve(results)
    assert [f.result(timeout=0) for f in futures] == results
    del batch
    assert [sys.getrefcount(p) for p in payloads] == before


def test_a_batch_ends_each_request_once_even_when_failed_concurrently():
    """fail_some runs Python callbacks (the GIL may switch); a concurrent
    fail() of the same batch must not end those requests again."""
    queue = make_queue()
    payloads = [object() for _ in range(3)]
    in_callback, leave_callback = threading.Event(), threading.Event()

    def slow_callback(_):
        in_callback.set()
        leave_callback.wait(10)

    before = [sys.getrefcount(p) for p in payloads]
    futures = [submit(queue, p) for p in payloads]
    futures[0].add_done_callback(slow_callback)
    batch = native.collect(queue)
    worker = threading.Thread(target=batch.fail_some, args=([0], ValueError("bad input")))
    worker.start()
    assert in_callback.wait(10)
    batch.fail(RuntimeError("shutdown"))  # while fail_some sits in a callback
    leave_callback.set()
    worker.join(10)
    batch.resolve([object()])  # late: nothing left to resolve
    del batch
    assert isinstance(futures[0].exception(), ValueError)
    assert all(isinstance(f.exception(), RuntimeError) for f in futures[1:])
    assert [sys.getrefcount(p) for p in payloads] == before


def test_dropped_batch_fails_its_requests():
    queue = make_queue()
    future = submit(queue, object())
    batch = native.collect(queue)
    del batch
    with pytest.raises(RuntimeError, match="dropped"):
        future.result(timeout=0)


def test_drain_hands_out_tickets_for_blocking_callers():
    queue = make_queue()
    payload = object()
    outcome = []
    caller = threading.Thread(target=lambda: outcome.append(queue.call(payload, 10)))
    caller.start()
    items, handles, submitted = [], [], []
    while not handles:
        queue.wait_for_work(0.1)
        items, handles, submitted = queue.drain(4)
    assert items == [payload] and len(submitted) == 1
    (ticket,) = handles
    assert not ticket.done()
    result = object()
    ticket.set_result(result)
    ticket.set_result(object())  # a second outcome is ignored
    caller.join(10)
    assert ticket.done() and outcome == [result]


def test_non_exception_error_outcome_still_raises():
    queue = make_queue()
    errors = []

    def call():
        try:
            queue.call(object(), 10)
        except BaseException as exc:  # what the caller sees
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    handles = []
    while not handles:
        queue.wait_for_work(0.1)
        _, handles, _ = queue.drain(1)
    handles[0].set_exception("not an exception")
    caller.join(10)
    assert isinstance(errors[0], RuntimeError)


def test_withdrawn_request_releases_its_payload():
    queue = make_queue()
    payload = object()
    before = sys.getrefcount(payload)
    with pytest.raises(TimeoutError, match="withdrawn"):
        queue.call(payload, 0.01)
    assert queue.collect() is None  # the withdrawn request is dropped
    assert sys.getrefcount(payload) == before


def test_the_blocking_call_entry_is_the_queue_s_call():
    """RequestQueue.blocking_call (entered without pybind11's dispatcher)
    returns, raises and releases what call does, and keeps its queue alive."""
    queue = make_queue()
    call = queue.blocking_call
    outcome = []
    payload = object()
    caller = threading.Thread(target=lambda: outcome.append(call(payload)))
    caller.start()
    handles = []
    while not handles:
        queue.wait_for_work(0.1)
        _, handles, _ = queue.drain(1)
    result = object()
    handles[0].set_result(result)
    caller.join(10)
    assert outcome == [result]

    before = sys.getrefcount(payload)
    with pytest.raises(TimeoutError, match="withdrawn"):
        call(payload, 0.01)
    assert queue.collect() is None and sys.getrefcount(payload) == before
    with pytest.raises(TimeoutError, match="withdrawn"):
        call(payload, 0)  # an int timeout, as call takes it
    with pytest.raises(TypeError):
        call(payload, "soon")
    with pytest.raises(TypeError):
        call()
    with pytest.raises(TypeError):
        call(payload, None, None)
    with pytest.raises(TypeError):
        call(payload, timeout=1.0)  # positional only
    queue.close()
    with pytest.raises(_core.ServerClosedError):
        call(payload, 1.0)

    kept = make_queue().blocking_call  # its queue has no other reference
    with pytest.raises(TimeoutError):
        kept(object(), 0.0)


def test_a_pending_result_takes_and_refuses_what_the_bound_class_did():
    """_core.PendingResult (a plain CPython type, its methods entered without
    pybind11's dispatcher): made only by submit_pending; wait, result and
    exception take timeout=None by position or keyword; it ends, raises and
    releases its request as before."""
    from concurrent.futures import CancelledError
    from concurrent.futures import TimeoutError as FutureTimeoutError

    with pytest.raises(TypeError):
        _core.PendingResult()
    queue = make_queue()
    payload = object()
    before = sys.getrefcount(payload)
    pending = queue.submit_pending(payload)
    assert type(pending) is _core.PendingResult
    assert pending.state == 0 and not pending.done()
    assert pending.wait(0.0) is False and pending.wait(timeout=0) is False
    with pytest.raises(FutureTimeoutError, match="still in flight"):
        pending.result(0.001)
    with pytest.raises(FutureTimeoutError):
        pending.exception(timeout=0.0)
    for method, args, kwargs in (("wait", ("soon",), {}), ("result", (0.0, 0.0), {}),
                                 ("result", (), {"timeout": 0.0, "other": 1}),
                                 ("exception", (), {"deadline": 0.0}), ("done", (1,), {}),
                                 ("watch", (), {})):
        with pytest.raises(TypeError):
            getattr(pending, method)(*args, **kwargs)
    _, handles, _ = queue.drain(1)
    result = object()
    handles[0].set_result(result)
    queue.wake_resolved()
    assert pending.done() and pending.wait() is True
    assert pending.result() is result and pending.result(timeout=None) is result
    assert pending.exception() is None
    del pending, handles
    assert sys.getrefcount(payload) == before

    failing = queue.submit_pending(payload)
    _, handles, _ = queue.drain(1)
    handles[0].set_exception(ValueError("from the model"))
    queue.wake_resolved()
    assert isinstance(failing.exception(1.0), ValueError)
    with pytest.raises(ValueError, match="from the model"):
        failing.result(timeout=1.0)

    withdrawn = queue.submit_pending(payload)
    assert withdrawn.withdraw() and withdrawn.done()
    with pytest.raises(CancelledError):
        withdrawn.result()
    del failing, withdrawn, handles
    assert queue.collect() is None and sys.getrefcount(payload) == before

    orphan = queue.submit_pending(payload)  # dropped unread: served all the same
    del orphan
    _, handles, _ = queue.drain(1)
    handles[0].set_result(object())
    queue.wake_resolved()
    del handles
    assert sys.getrefcount(payload) == before


def test_the_pending_result_type_outlives_the_module_attribute(monkeypatch):
    """The module keeps no sole reference to the type submit_pending makes
    its objects of: a test that patches the attribute away cannot free it."""
    import gc
    import inspect

    assert list(inspect.signature(_core.PendingResult.result).parameters) == ["self", "timeout"]
    monkeypatch.delattr(_core, "PendingResult")
    gc.collect()
    queue = make_queue()
    pending = queue.submit_pending(object())
    assert type(pending).__name__ == "PendingResult" and not pending.done()


def test_an_inline_runner_is_withdrawn_only_by_its_own():
    """withdraw_inline_runner: an ending server's worker takes its runners
    off the queue, never a later server's."""
    queue = make_queue()

    def earlier(batch):
        return None

    def later(batch):
        return None

    assert not queue.withdraw_inline_runner(earlier)  # none set
    queue.set_inline_runner(later, lambda *args: None)
    assert not queue.withdraw_inline_runner(earlier) and queue.inline_runner_set
    assert queue.withdraw_inline_runner(later) and not queue.inline_runner_set
    refs = sys.getrefcount(later)
    queue.set_inline_runner(later)
    queue.withdraw_inline_runner(later)
    assert sys.getrefcount(later) == refs  # the queue holds no reference to it


def test_fail_pending_and_closed_queue():
    queue = make_queue()
    futures = [submit(queue, object()) for _ in range(3)]
    queue.close()
    assert queue.closed
    with pytest.raises(_core.ServerClosedError):
        submit(queue, object())
    assert native.fail_pending(queue, RuntimeError("closed")) == 3
    assert all(isinstance(f.exception(timeout=0), RuntimeError) for f in futures)
    queue.reopen()
    submit(queue, object())
    assert len(queue) == 1


def test_a_cancelled_future_is_withdrawn_and_releases_its_payload():
    queue = make_queue()
    payloads, futures, before = submit_payloads(queue, 3)
    assert futures[1].cancel()
    batch = native.collect(queue)
    assert batch.items == [payloads[0], payloads[2]]
    assert not futures[0].cancel() and not futures[2].cancel()  # taken: too late
    batch.resolve(["a", "c"])
    assert [futures[0].result(timeout=0), futures[2].result(timeout=0)] == ["a", "c"]
    del batch
    assert [sys.getrefcount(p) for p in payloads] == before


def test_a_batch_of_cancelled_futures_only_is_no_batch():
    queue = make_queue()
    future = submit(queue, object())
    assert future.cancel()
    assert native.collect(queue) is None
    assert len(queue) == 0


def test_a_callback_raising_systemexit_does_not_keep_others_waiting():
    """Watched futures are notified in Python after the batch gave them up:
    one callback's BaseException must not leave the later callers
    unanswered."""
    queue = make_queue()
    futures = [submit(queue, i) for i in range(3)]

    def exiting_callback(_):
        raise SystemExit("from a callback")

    futures[0].add_done_callback(exiting_callback)
    batch = native.collect(queue)
    with pytest.raises(SystemExit):
        batch.resolve(["r0", "r1", "r2"])
    assert [f.result(timeout=0) for f in futures] == ["r0", "r1", "r2"]
    assert len(batch) == 0


def test_drain_drops_the_cancelled_and_hands_out_tickets():
    from batchserve import ThreadingTransport

    transport = ThreadingTransport()
    kept, cancelled = transport.submit("kept"), transport.submit("cancelled")
    assert cancelled.cancel()
    items, callbacks = transport.drain(8)
    assert items == ["kept"] and type(callbacks[0]) is _core.Ticket
    assert not kept.cancel()  # taken: its caller can no longer cancel it
    transport.resolve(callbacks[0], "done")
    assert kept.result(timeout=0) == "done"

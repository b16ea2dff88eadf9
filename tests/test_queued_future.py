"""ThreadingTransport.submit's QueuedFuture: a concurrent.futures.Future
whose request the server ends in C++ (see
python/batchserve/transports/queued_future.py)."""

import asyncio
import concurrent.futures as cf
import gc
import threading

import pytest
from conftest import BlockingModel, echo_model, echoes, request

from batchserve import InferenceServer, ServerClosedError, ThreadingTransport
from batchserve.transports.queued_future import QueuedFuture


def test_it_is_a_future_that_resolves(echo_server, transport):
    future = transport.submit(request(7))
    assert isinstance(future, QueuedFuture) and isinstance(future, cf.Future)
    assert future.result(timeout=30)["echo"].item() == 7
    assert future.done() and not future.running() and not future.cancelled()
    assert future.exception(timeout=0) is None


def test_the_server_s_exception_is_raised_and_returned(transport):
    def failing(td):
        raise ValueError("bad batch")

    with InferenceServer(failing, transport):
        future = transport.submit(request(1))
        with pytest.raises(ValueError, match="bad batch"):
            future.result(timeout=30)
        assert isinstance(future.exception(timeout=0), ValueError)


def test_callbacks_run_once_on_the_server_thread_or_at_once_when_done(transport):
    model = BlockingModel()
    calls, called = [], threading.Event()

    def callback(future):
        calls.append((future, threading.current_thread().name))
        called.set()

    with InferenceServer(model, transport):
        future = transport.submit(request(1))
        assert model.entered.wait(30)
        future.add_done_callback(callback)  # while served: run by the server
        assert future.running() and not future.cancel()
        model.release.set()
        assert future.result(timeout=30)["echo"].item() == 1
        assert called.wait(30)  # the server notifies after publishing the result
        finished = threading.Event()
        future.add_done_callback(lambda f: finished.set())  # after: runs now
        assert finished.is_set()
        assert cf.wait([transport.submit(request(2))], timeout=30).done  # a later batch ran
    assert len(calls) == 1 and calls[0][0] is future
    assert calls[0][1] != threading.current_thread().name


def test_a_callback_that_raises_is_logged_and_the_others_run(echo_server, transport, caplog):
    ran = threading.Event()

    def bad(_):
        raise RuntimeError("callback failure")

    future = transport.submit(request(3))
    future.add_done_callback(bad)
    future.add_done_callback(lambda f: ran.set())
    assert future.result(timeout=30)["echo"].item() == 3
    assert ran.wait(30)


def _count_callbacks_of_one_round(transport, lock) -> None:
    futures = [transport.submit(request(i)) for i in range(64)]
    counts = [0] * len(futures)
    all_counted = threading.Event()

    def count(i):
        with lock:
            counts[i] += 1
            if all(counts):
                all_counted.set()

    for i, future in enumerate(futures):  # racing the server, which ends them meanwhile
        future.add_done_callback(lambda f, i=i: count(i))
    assert echoes(futures, timeout=30) == list(range(64))
    assert all_counted.wait(30)
    # The server runs a batch's callbacks before it serves the next one:
    # once a later request's callback ran, no earlier one is on its way.
    later, later_ran = transport.submit(request(64)), threading.Event()
    later.add_done_callback(lambda f: later_ran.set())
    assert later_ran.wait(30)
    with lock:
        assert counts == [1] * len(futures)


def test_callbacks_added_while_requests_end_run_exactly_once(echo_server, transport):
    lock = threading.Lock()
    for _ in range(5):
        _count_callbacks_of_one_round(transport, lock)


def test_wait_and_as_completed(echo_server, transport):
    futures = [transport.submit(request(i)) for i in range(20)]
    done, not_done = cf.wait(futures, timeout=30)
    assert len(done) == 20 and not not_done
    later = [transport.submit(request(i)) for i in range(10)]
    assert sorted(f.result()["echo"].item() for f in cf.as_completed(later, timeout=30)) == list(
        range(10)
    )
    first = transport.submit(request(99))
    done, _ = cf.wait([first], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert done == {first}


def test_asyncio_wraps_it(echo_server, transport):
    async def main():
        return await asyncio.wrap_future(transport.submit(request(5)))

    assert asyncio.run(main())["echo"].item() == 5


def test_cancel_withdraws_a_queued_request_and_wakes_its_waiters(transport):
    future = transport.submit(request(1))  # no server yet: it stays queued
    outcome = []
    waiting = threading.Thread(target=lambda: outcome.append(_result_or_error(future)))
    waiting.start()
    callback_ran = threading.Event()
    future.add_done_callback(lambda f: callback_ran.set())
    assert future.cancel() and future.cancelled() and future.done()
    waiting.join(30)
    assert outcome and isinstance(outcome[0], cf.CancelledError)
    assert callback_ran.is_set()
    with InferenceServer(echo_model, transport) as server:
        assert echoes([transport.submit(request(2))]) == [2]
        assert server.stats()["requests"] == 1  # the cancelled one was never served


def _result_or_error(future):
    try:
        return future.result(timeout=30)
    except BaseException as exc:  # noqa: BLE001 (the outcome under test)
        return exc


def test_result_timeout_leaves_the_request_in_flight(transport):
    future = transport.submit(request(4))
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.01)
    assert not future.done()
    with InferenceServer(echo_model, transport):
        assert future.result(timeout=30)["echo"].item() == 4


def test_a_dropped_future_s_request_is_served(transport):
    model = BlockingModel()
    with InferenceServer(model, transport) as server:
        transport.submit(request(0))  # dropped at once
        gc.collect()
        assert model.entered.wait(30)
        model.release.set()
        assert echoes([transport.submit(request(1))]) == [1]
        assert server.stats()["requests"] == 2


def test_shutdown_ends_queued_futures_and_runs_their_callbacks(transport):
    model = BlockingModel()
    server = InferenceServer(model, transport).start()
    first = transport.submit(request(0))
    assert model.entered.wait(30)
    queued = transport.submit(request(1))
    ended = threading.Event()
    queued.add_done_callback(lambda f: ended.set())
    model.release.set()
    server.shutdown()
    first.result(timeout=30)
    # The queued request was either served before the shutdown or failed by it.
    assert ended.wait(30)
    assert queued.done()
    error = queued.exception(timeout=0)
    assert error is None or isinstance(error, ServerClosedError)


def test_torchrl_s_server_notifies_it_through_a_ticket():
    torchrl_server = pytest.importorskip("torchrl.modules.inference_server")
    transport = ThreadingTransport()
    with torchrl_server.InferenceServer(echo_model, transport, max_batch_size=4):
        future = transport.submit(request(6))
        ran = threading.Event()
        future.add_done_callback(lambda f: ran.set())
        assert future.result(timeout=30)["echo"].item() == 6
        assert ran.wait(30)


def test_a_cancelled_watched_future_is_freed_when_a_shutdown_fails_the_queue():
    import weakref

    transport = ThreadingTransport()
    future = transport.submit(request(1))  # no server: it stays queued
    future.add_done_callback(lambda f: None)  # watched: the request holds it
    assert future.cancel()
    alive = weakref.ref(future)
    del future
    with InferenceServer(echo_model, transport):  # its start and stop drain the queue
        assert echoes([transport.submit(request(2))]) == [2]
    gc.collect()
    assert alive() is None

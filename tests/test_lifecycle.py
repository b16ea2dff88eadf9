"""Start, shutdown, context manager, clients: torchrl's lifecycle semantics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest
import torch
from conftest import BlockingModel, echo_model, echoes, make_policy, request
from tensordict import TensorDict

import batchserve
from batchserve import InferenceClient, InferenceServer, InferenceTransport, ThreadingTransport


def test_transport_abc_cannot_be_instantiated():
    with pytest.raises(TypeError):
        InferenceTransport()


def test_start_returns_self_and_shutdown_stops(transport):
    server = InferenceServer(make_policy(), transport, max_batch_size=4)
    assert not server.is_alive
    assert server.start() is server
    assert server.is_alive
    server.shutdown()
    assert not server.is_alive


def test_double_start_raises(transport):
    server = InferenceServer(make_policy(), transport).start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
    finally:
        server.shutdown()


def test_context_manager(transport):
    with InferenceServer(make_policy(), transport) as server:
        assert server.is_alive
        result = transport.client()(TensorDict({"observation": torch.randn(4)}))
        assert result["action"].shape == (2,)
    assert not server.is_alive


def test_clients(echo_server, transport):
    client = echo_server.client()
    assert isinstance(client, InferenceClient)
    clients = echo_server.clients(3)
    assert len(clients) == 3
    assert [c(request(i))["echo"].item() for i, c in enumerate(clients)] == [0, 1, 2]
    with pytest.raises(ValueError):
        echo_server.clients(0)
    with pytest.raises(TypeError):
        echo_server.clients(True)


def test_submit_returns_a_future(echo_server, transport):
    future = transport.client().submit(request(7))
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=10)["echo"].item() == 7


def test_blocking_call_allocates_no_future(echo_server, transport, monkeypatch):
    import batchserve.transports.threading as threading_module

    def no_future(pending):
        raise AssertionError("the blocking path must not create a Future")

    monkeypatch.setattr(threading_module, "QueuedFuture", no_future)
    assert transport.client()(request(3))["echo"].item() == 3
    with pytest.raises(AssertionError):
        transport.client().submit(request(4))


def test_acall_from_asyncio(echo_server, transport):
    client = transport.client()

    async def main():
        results = await asyncio.gather(*(client.acall(request(i)) for i in range(20)))
        return [r["echo"].item() for r in results]

    assert asyncio.run(main()) == list(range(20))


def test_requests_submitted_before_start_are_served(transport):
    futures = [transport.submit(request(i)) for i in range(20)]
    with InferenceServer(echo_model, transport, max_batch_size=4):
        assert echoes(futures) == list(range(20))


def test_cancelled_future_is_not_served(transport):
    seen = []

    def recording_model(td):
        seen.extend(td["id"].tolist())
        return echo_model(td)

    cancelled = transport.submit(request(1))
    assert cancelled.cancel()
    kept = transport.submit(request(2))
    with InferenceServer(recording_model, transport):
        assert kept.result(timeout=10)["echo"].item() == 2
    assert seen == [2]


def test_queue_full_choice():
    transport = ThreadingTransport(max_queue_size=2)
    transport.submit(request(0))
    transport.submit(request(1))
    with pytest.raises(batchserve.QueueFull):
        transport.submit(request(2), block=False)
    with pytest.raises(batchserve.QueueFull):
        transport.submit(request(2), timeout=0.01)
    with pytest.raises(TimeoutError):
        transport.client()(request(2), timeout=0.01)
    with InferenceServer(echo_model, transport):
        assert transport.client()(request(3))["echo"].item() == 3


def test_invalid_settings(transport):
    with pytest.raises(ValueError):
        InferenceServer(echo_model, transport, max_batch_size=0)
    with pytest.raises(ValueError):
        InferenceServer(echo_model, transport, min_batch_size=0)
    with pytest.raises(ValueError):
        InferenceServer(echo_model, transport, timeout=-1)
    with pytest.raises(ValueError):
        InferenceServer(echo_model, transport, timeout=float("nan"))
    with pytest.raises(TypeError):
        InferenceServer(echo_model, object())
    with pytest.raises(ValueError):
        ThreadingTransport(max_queue_size=0)


def test_full_queue_blocks_the_caller_until_room_frees():
    transport = ThreadingTransport(max_queue_size=2)
    futures = [transport.submit(request(i)) for i in range(2)]
    blocked = []
    caller = threading.Thread(target=lambda: blocked.append(transport.client()(request(2))))
    caller.start()
    caller.join(0.2)
    assert caller.is_alive()  # no room: the caller waits (GIL released)
    with InferenceServer(echo_model, transport):
        caller.join(10)
        assert echoes(futures) == [0, 1]
    assert blocked[0]["echo"].item() == 2


def test_waiting_threads_sleep_instead_of_spinning():
    """Callers waiting for results and an idle server burn no CPU."""
    transport = ThreadingTransport()
    model = BlockingModel()
    server = InferenceServer(model, transport, timeout=0.01).start()
    transport.submit(request(0))
    assert model.entered.wait(10)  # the worker is now parked in the model
    callers = [
        threading.Thread(target=_call_quietly, args=(transport, request(i)))
        for i in range(1, 5)
    ]
    for c in callers:
        c.start()
    deadline = time.monotonic() + 10
    while len(transport) < 4 and time.monotonic() < deadline:
        time.sleep(0.001)  # until all four requests are queued
    assert len(transport) == 4
    cpu0, wall0 = time.process_time(), time.monotonic()
    time.sleep(1.0)
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - wall0
    model.release.set()
    for c in callers:
        c.join(10)
    # Then an idle server: it wakes every `timeout` only to poll.
    cpu1 = time.process_time()
    time.sleep(1.0)
    idle_cpu = time.process_time() - cpu1
    server.shutdown()
    assert cpu < 0.25 * wall, f"waiting callers used {cpu:.2f} s of CPU in {wall:.2f} s"
    assert idle_cpu < 0.25, f"an idle server used {idle_cpu:.2f} s of CPU in 1 s"


def _call_quietly(transport, td):
    try:
        transport.client()(td)
    except Exception:
        pass


def test_default_transport_like_torchrl():
    with InferenceServer(echo_model, max_batch_size=8) as server:
        assert isinstance(server.transport, ThreadingTransport)
        assert server.client()(request(5))["echo"].item() == 5
    with InferenceServer(echo_model, "thread") as server:
        assert server.client()(request(6))["echo"].item() == 6
    with pytest.raises(ValueError, match="incompatible with service_backend"):
        InferenceServer(echo_model, "ray")


def test_service_backend_and_transport_kind():
    with InferenceServer(echo_model, transport="auto") as server:
        assert server.service_backend == "thread"
        assert server.transport_kind == "thread"
    assert InferenceServer(echo_model, _MinimalTransport()).transport_kind == "custom"


class _MinimalTransport(InferenceTransport):
    def submit(self, td):
        raise NotImplementedError("never called")

    def drain(self, max_items):
        return [], []

    def wait_for_work(self, timeout):
        pass

    def resolve(self, callback, result):
        callback.set_result(result)

    def resolve_exception(self, callback, exc):
        callback.set_exception(exc)

"""The fault-injection matrix of docs/guarantees.md: one test per row.

Each row's test runs on the in-process ThreadingTransport and on the
SharedMemoryTransport (its slot path, driven from threads of this process;
the rows about killed processes are in test_shared_memory.py, which needs
child processes). The last test checks that every test the table names
exists, so the table and the suite cannot drift apart.
"""

from __future__ import annotations

import gc
import importlib
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch
from conftest import BlockingModel, echo_model, echo_shared_memory_transport, echoes, request
from tensordict import TensorDict, lazy_stack

import batchserve.batching.fast_path as fast_path
from batchserve import (
    InferenceServer,
    ServerClosedError,
    SharedMemoryTransport,
    ThreadingTransport,
)

pytestmark = pytest.mark.timeout(120)

GUARANTEES = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "guarantees.md")


@pytest.fixture(params=["threads", "shared_memory"])
def transport(request):
    """Each row on both transports; a shared-memory transport declares the
    keys of conftest's request() and echo_model()."""
    if request.param == "threads":
        yield ThreadingTransport()
        return
    shm = echo_shared_memory_transport(num_slots=16)
    yield shm
    shm.close()


def outcome(call):
    """What `call()` returned or raised."""
    try:
        return call()
    except BaseException as exc:
        return exc


def echo_of(result) -> int:
    return result["echo"].item()


def only_the_poisoned_batch_fails(server, transport, match: str) -> None:
    """A request with a negative id raises `match`; the next is served."""
    client = transport.client()
    with pytest.raises(ValueError, match=match):
        client(request(-1))
    assert echo_of(client(request(5))) == 5
    assert server.is_alive
    assert server.stats()["failed_batches"] == 1


# -- the model, collate_fn and weight sync fail -------------------------------------


def test_model_raises_an_exception(transport):
    def model(td):
        if (td["id"] < 0).any():
            raise ValueError("poisoned batch")
        return echo_model(td)

    with InferenceServer(model, transport, max_batch_size=1) as server:
        only_the_poisoned_batch_fails(server, transport, "poisoned batch")


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_model_raises_a_base_exception(transport, exc_type):
    def model(td):
        raise exc_type("stop now")

    server = InferenceServer(model, transport, max_batch_size=1).start()
    client = transport.client()
    failed = client.submit(request(0))
    with pytest.raises(ServerClosedError, match=exc_type.__name__) as info:
        failed.result(timeout=30)
    if isinstance(transport, ThreadingTransport):  # a pickled copy has no __cause__
        assert isinstance(info.value.__cause__, exc_type)
    server._worker.join(30)  # the worker exits right after failing the batch
    assert not server.is_alive
    with pytest.raises(ServerClosedError):  # later requests: at once, not a hang
        client(request(1), timeout=30)
    server.shutdown()
    server.model = echo_model  # and the server can be started again
    with server:
        assert echo_of(client(request(2))) == 2


def test_collate_fn_raises(transport):
    def fragile_collate(items):
        if any(item["id"].item() < 0 for item in items):
            raise ValueError("cannot collate a poisoned batch")
        return lazy_stack(items)

    with InferenceServer(
        echo_model, transport, max_batch_size=1, collate_fn=fragile_collate
    ) as server:
        only_the_poisoned_batch_fails(server, transport, "poisoned")


class _FailingReceive:
    """A weight-sync receiver whose set-up works and whose receive() raises."""

    initialized_on_receiver = True
    synchronized_on_receiver = True

    def __init__(self):
        self.calls = 0

    def receive(self, timeout=None):
        self.calls += 1
        raise RuntimeError("corrupt weights")


def test_weight_sync_receive_raises(transport):
    weights = _FailingReceive()
    with InferenceServer(echo_model, transport, weight_sync=weights, timeout=0.01) as server:
        client = transport.client()
        for i in range(5):
            assert echo_of(client(request(i))) == i
        assert weights.calls >= 5  # polled between batches, failing each time
        assert server.is_alive
    stats = server.stats()  # the worker has stopped: every failure is counted
    assert stats["weight_sync_errors"] == weights.calls
    assert stats["weight_updates"] == 0 and server.policy_version == 0


# -- callers give up ------------------------------------------------------------------


def test_caller_times_out_and_the_result_arrives_later(transport):
    seen = []

    def recording(td):
        seen.extend(td["id"].tolist())
        return echo_model(td)

    client = transport.client()
    # Before any server: the request is withdrawn and never reaches a model.
    with pytest.raises(TimeoutError, match="withdrawn"):
        client(request(1), timeout=0.05)
    model = BlockingModel(then=recording)
    with InferenceServer(model, transport, max_batch_size=1) as server:
        # Taken into a forward, then abandoned: its result arrives later.
        # (A loaded machine may not take it within the caller's second: that
        # one is withdrawn, and the next try is taken.)
        for abandoned in range(2, 7):
            with pytest.raises(TimeoutError) as info:
                client(request(abandoned), timeout=1.0)
            if "already being served" in str(info.value):
                break
            assert "withdrawn" in str(info.value)
        assert model.entered.is_set()
        model.release.set()
        # The same client's next calls get their own results, never the late one.
        assert [echo_of(client(request(i))) for i in range(10, 15)] == [10, 11, 12, 13, 14]
        assert server.is_alive
        if isinstance(transport, SharedMemoryTransport):
            segment = transport._segment
            deadline = time.monotonic() + 30  # hang guard
            while segment.owned_slots and time.monotonic() < deadline:
                time.sleep(0.01)
            assert segment.owned_slots == 0  # the abandoned slot came back
    assert seen == [abandoned, 10, 11, 12, 13, 14]  # 1 (and any withdrawn) never reached it


# -- lifecycle ------------------------------------------------------------------------


def test_shutdown_during_a_forward(transport):
    # Within the shutdown timeout: the forward in progress finishes and its
    # caller gets the result; the rest get ServerClosedError.
    model = BlockingModel()
    server = InferenceServer(model, transport, max_batch_size=1).start()
    client = transport.client()
    first = client.submit(request(0))
    assert model.entered.wait(30)
    pending = [client.submit(request(i)) for i in range(1, 6)]
    blocked = []
    caller = threading.Thread(target=lambda: blocked.append(outcome(lambda: client(request(9)))))
    caller.start()
    stopping = threading.Thread(target=server.shutdown, kwargs={"timeout": 30})
    stopping.start()
    model.release.set()
    stopping.join(60)
    caller.join(60)
    assert not stopping.is_alive() and not caller.is_alive()
    assert echo_of(first.result(timeout=30)) == 0
    for future in pending:
        with pytest.raises(ServerClosedError, match="shutting down"):
            future.result(timeout=30)
    assert isinstance(blocked[0], ServerClosedError)

    # Past the timeout: the stuck forward's caller gets the error too, and
    # the forward's late end changes nothing.
    model = BlockingModel()
    server = InferenceServer(model, transport, max_batch_size=1).start()
    stuck = client.submit(request(10))
    assert model.entered.wait(30)
    server.shutdown(timeout=0.1)
    with pytest.raises(ServerClosedError):
        stuck.result(timeout=30)
    model.release.set()
    server.shutdown(timeout=None)  # waits for the old worker
    with server:
        assert echo_of(client(request(11))) == 11


def test_double_shutdown(transport):
    server = InferenceServer(echo_model, transport).start()
    assert echo_of(transport.client()(request(1))) == 1
    server.shutdown()
    server.shutdown()
    assert not server.is_alive
    never_started = InferenceServer(echo_model, ThreadingTransport())
    never_started.shutdown()
    never_started.shutdown()


def test_start_after_shutdown(transport):
    server = InferenceServer(echo_model, transport)
    client = transport.client()  # attached before the first shutdown
    for round_ in range(3):
        server.start()
        assert echo_of(client(request(round_))) == round_
        server.shutdown()
    with pytest.raises(ServerClosedError):
        client(request(9), timeout=30)


def test_submit_after_shutdown(transport):
    server = InferenceServer(echo_model, transport).start()
    client = transport.client()
    server.shutdown()
    with pytest.raises(ServerClosedError):
        client.submit(request(0))  # refused at submit(), not through a future
    with pytest.raises(ServerClosedError):
        client(request(1), timeout=30)
    with pytest.raises(RuntimeError):  # ServerClosedError is a RuntimeError
        client(request(2), timeout=30)
    if isinstance(transport, SharedMemoryTransport):
        assert transport._segment.owned_slots == 0  # no slot kept by the refusals


def test_server_garbage_collected_while_running(transport):
    server = InferenceServer(echo_model, transport).start()
    alive = weakref.ref(server)
    del server
    gc.collect()
    # Its worker thread holds it (as a threading.Thread holds its target):
    # it keeps serving until shut down or until the interpreter exits.
    assert alive() is not None and alive().is_alive
    assert echo_of(transport.client()(request(3))) == 3
    alive().shutdown()
    if isinstance(transport, SharedMemoryTransport):
        return  # the exit below is the server's, whatever its transport

    # A process that dropped its running server exits cleanly; a caller
    # blocked on it at exit gets ServerClosedError.
    script = textwrap.dedent(
        """
        import gc, threading, torch
        from tensordict import TensorDict
        from batchserve import InferenceServer, ThreadingTransport

        transport = ThreadingTransport()
        # Batches of exactly two: a lone request waits for a partner.
        InferenceServer(lambda td: td, transport, min_batch_size=2, max_batch_size=2,
                        timeout=600).start()
        gc.collect()
        pair = [transport.submit(TensorDict({"x": torch.ones(1) * i})) for i in (1, 2)]
        print("served", [f.result(timeout=60)["x"].item() for f in pair], flush=True)

        def caller():
            try:
                transport.client()(TensorDict({"x": torch.ones(1)}))
                print("caller: served", flush=True)
            except Exception as exc:
                print("caller:", type(exc).__name__, flush=True)

        threading.Thread(target=caller).start()  # still waiting at exit
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    assert "served [1.0, 2.0]" in done.stdout
    assert "caller: ServerClosedError" in done.stdout, done.stdout + done.stderr


class _StagingOutOfMemory(fast_path.StagingBuffer):
    """A StagingBuffer whose allocation fails `failures` times, as
    torch.empty does when the allocator is out of memory."""

    failures = 0

    def __init__(self, schema, rows, pin):
        if type(self).failures > 0:
            type(self).failures -= 1
            raise RuntimeError(
                "DefaultCPUAllocator: not enough memory: you tried to allocate "
                f"{rows * sum(schema.leaf_bytes)} bytes."
            )
        super().__init__(schema, rows, pin)


def test_out_of_memory_allocating_staging(transport, monkeypatch):
    monkeypatch.setattr(fast_path, "StagingBuffer", _StagingOutOfMemory)
    _StagingOutOfMemory.failures = 1
    with InferenceServer(echo_model, transport, max_batch_size=4) as server:
        client = transport.client()
        # The first batch that needs staging fails with the allocator's error
        # (on a ThreadingTransport the very first request is served by the
        # general path, which learns the schema).
        outcomes = [outcome(lambda i=i: client(request(i))) for i in range(3)]
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(failed) == 1 and isinstance(failed[0], RuntimeError), outcomes
        assert "not enough memory" in str(failed[0])
        assert all(echo_of(o) == i for i, o in enumerate(outcomes) if o is not failed[0])
        assert server.is_alive
        assert server.stats()["failed_batches"] == 1
        # The next batch allocates again, and is served on the fast path.
        assert echoes([client.submit(request(i)) for i in range(1, 9)], timeout=30) == list(
            range(1, 9)
        )
        assert server.stats()["fast_path_requests"] >= 8
        if isinstance(transport, SharedMemoryTransport):
            return
        # A new request schema whose staging cannot be allocated: its batch
        # fails, and the staging of the old, smaller schema is never used
        # for the new one (that would write past it).
        _StagingOutOfMemory.failures = 1
        big = [TensorDict({"id": torch.tensor(i), "observation": torch.full((4096,), float(i))})
               for i in range(20, 40)]
        outcomes = [outcome(lambda td=td: client(td)) for td in big]
        assert sum(isinstance(o, RuntimeError) for o in outcomes) >= 1
        served = [(td, o) for td, o in zip(big, outcomes) if not isinstance(o, BaseException)]
        assert served and all(echo_of(o) == td["id"].item() for td, o in served)
        assert server.is_alive


# -- the table --------------------------------------------------------------------------


def test_every_row_of_the_table_names_a_test_that_exists():
    with open(GUARANTEES, encoding="utf-8") as f:
        table = [line for line in f if line.startswith("|") and "tests/" in line]
    named = [re.search(r"`tests/(\w+)\.py::(\w+)`", line) for line in table]
    assert len(table) >= 12 and all(named), "every row names its test as `tests/FILE.py::TEST`"
    for match in named:
        module = importlib.import_module(match.group(1))
        assert callable(getattr(module, match.group(2), None)), match.group(0)

"""Drop-in compatibility with torchrl's inference server.

Transports written against torchrl's protocol (torchrl's own included) run
under batchserve.InferenceServer, and torchrl's seed example runs with only
its import swapped. Skipped where torchrl is not installed.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import threading

import pytest
import torch
import torch.nn as nn
from conftest import echo_model, echoes, make_policy, request
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

import batchserve

torchrl_inference_server = pytest.importorskip(
    "torchrl.modules.inference_server", reason="torchrl is not installed"
)


class HandWrittenTransport(batchserve.InferenceTransport):
    """A minimal user transport: list + lock + Event, Futures for results."""

    def __init__(self):
        self._queue, self._futures = [], []
        self._lock = threading.Lock()
        self._event = threading.Event()

    def submit(self, td):
        future = concurrent.futures.Future()
        with self._lock:
            self._queue.append(td)
            self._futures.append(future)
        self._event.set()
        return future

    def drain(self, max_items):
        with self._lock:
            items, futures = self._queue[:max_items], self._futures[:max_items]
            del self._queue[:max_items], self._futures[:max_items]
        return items, futures

    def wait_for_work(self, timeout):
        self._event.wait(timeout=timeout)
        self._event.clear()

    def resolve(self, callback, result):
        callback.set_result(result)

    def resolve_exception(self, callback, exc):
        callback.set_exception(exc)


def _routing_round(transport, threads=8, per_thread=50):
    wrong = []

    def actor(index):
        client = transport.client()
        for k in range(per_thread):
            rid = index * 1000 + k
            got = client(request(rid))["echo"].item()
            if got != rid:
                wrong.append((rid, got))

    workers = [threading.Thread(target=actor, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    return wrong


@pytest.mark.parametrize(
    "make_transport",
    [HandWrittenTransport, lambda: torchrl_inference_server.ThreadingTransport()],
    ids=["hand_written", "torchrl_threading"],
)
def test_protocol_transports_under_batchserve(make_transport):
    transport = make_transport()
    with batchserve.InferenceServer(
        echo_model, transport, max_batch_size=8, timeout=0.002
    ) as server:
        assert _routing_round(transport) == []
        stats = server.stats()
    assert stats["requests"] == 8 * 50
    assert max(stats["batch_size_histogram"]) <= 8


def test_protocol_transport_min_batch_and_errors():
    transport = HandWrittenTransport()
    sizes = []

    def model(td):
        sizes.append(td.batch_size[0])
        if (td["id"] < 0).any():
            raise ValueError("bad id")
        return echo_model(td)

    with batchserve.InferenceServer(
        model, transport, max_batch_size=8, min_batch_size=3, timeout=5
    ) as server:
        futures = [transport.submit(request(i)) for i in range(3)]
        assert echoes(futures) == [0, 1, 2]
        server.min_batch_size = 1
        with pytest.raises(ValueError, match="bad id"):
            transport.submit(request(-1)).result(timeout=10)
        assert server.is_alive
    assert sizes[0] == 3
    # Shutdown fails what is still queued.
    late = transport.submit(request(9))
    server.shutdown()
    with pytest.raises(RuntimeError):
        late.result(timeout=10)


def _mp_actor(client, n, out):
    ok = all(client(request(i))["echo"].item() == i for i in range(n))
    out.put(ok)


def test_torchrl_mptransport_under_batchserve():
    ctx = mp.get_context("spawn")
    transport = torchrl_inference_server.MPTransport(ctx=ctx)
    parent_client = transport.client()
    child_client = transport.client()
    out = ctx.Queue()
    with batchserve.InferenceServer(echo_model, transport, max_batch_size=8):
        assert parent_client(request(41))["echo"].item() == 41
        child = ctx.Process(target=_mp_actor, args=(child_client, 10, out))
        child.start()
        child.join(60)
        assert child.exitcode == 0
    assert out.get(timeout=5) is True


def test_seed_example_with_swapped_import():
    # torchrl's documented example, with `from batchserve import ...` only.
    from batchserve import InferenceServer, ThreadingTransport

    policy = TensorDictModule(nn.Linear(4, 2), in_keys=["obs"], out_keys=["act"])
    transport = ThreadingTransport()
    server = InferenceServer(policy, transport, max_batch_size=8)
    server.start()
    client = transport.client()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(lambda _: client(TensorDict({"obs": torch.randn(4)})), range(200))
        )
    server.shutdown()
    assert all(r["act"].shape == (2,) for r in results)


def test_torchrl_names_resolve_through_batchserve():
    assert batchserve.MPTransport is torchrl_inference_server.MPTransport
    with pytest.raises(AttributeError):
        _ = batchserve.NoSuchThing  # the attribute access itself is what must raise


def test_torchrl_config_objects():
    server_config = batchserve.InferenceServerConfig(max_batch_size=2, timeout=0.001)
    device_config = batchserve.InferenceDeviceConfig(policy_device="cpu", output_device="cpu")
    transport = batchserve.ThreadingTransport()
    with batchserve.InferenceServer(
        make_policy(), transport, server_config=server_config, device_config=device_config
    ) as server:
        assert server.max_batch_size == 2 and server.timeout == 0.001
        assert server.policy_device == torch.device("cpu")
        assert server.output_device == torch.device("cpu")
        result = transport.client()(TensorDict({"observation": torch.randn(4)}))
    assert result["action"].device.type == "cpu"
    with pytest.raises(ValueError, match="mutually exclusive"):
        batchserve.InferenceServer(
            make_policy(), transport, max_batch_size=64, server_config=server_config
        )


def test_policy_client_module_interaction_type():
    from tensordict.nn.probabilistic import InteractionType, interaction_type, set_interaction_type

    class InteractionPolicy(nn.Module):
        def forward(self, td):
            value = 1 if interaction_type() is InteractionType.RANDOM else 0
            return TensorDict({"action": torch.full(td.batch_size, value)},
                              batch_size=td.batch_size)

    transport = batchserve.ThreadingTransport()
    with batchserve.InferenceServer(InteractionPolicy(), transport, max_batch_size=4):
        client = batchserve.PolicyClientModule(transport, out_keys=["action"])
        with set_interaction_type(InteractionType.RANDOM):
            assert client(TensorDict({}, batch_size=[1]))["action"].item() == 1
        assert client(TensorDict({}, batch_size=[1]))["action"].item() == 0

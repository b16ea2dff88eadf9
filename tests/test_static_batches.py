"""static_batch_size: torchrl's checks, buckets, padding, capture, weight
updates (batchserve.server.static_batches).

On a CPU-only machine the graphs are replaced by the eager model (the
``eager_graphs`` fixture): everything but the capture itself is exercised,
the bucket choice, the padding, the interaction-type rule, the storage
check, the server's use of the graphs and its stats. The CUDA tests at the
end capture real graphs and skip without a GPU.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import InteractionType, TensorDictModule, set_interaction_type

import batchserve
from batchserve.server import static_batches
from batchserve.server.static_batches import (
    OTHER_INTERACTION,
    STORAGE_REPLACED,
    WARMUP,
    StaticBatches,
    pad_rows,
    static_batch_sizes,
)

pytestmark = pytest.mark.timeout(120)

CUDA = torch.cuda.is_available()


def make_policy() -> TensorDictModule:
    torch.manual_seed(0)
    return TensorDictModule(nn.Linear(4, 2), in_keys=["observation"], out_keys=["action"])


def spec() -> TensorDict:
    return TensorDict({"observation": torch.zeros(4)})


class CountingCapture:
    """An eager stand-in for CudaGraphModule: each bucket's "graph" runs
    the model and records the batch sizes it was called with."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, model, device):
        seen: list[int] = []
        self.calls.append(seen)

        def graph(batch):
            seen.append(batch.batch_size[0])
            return model(batch)

        return graph


@pytest.fixture
def eager_graphs(monkeypatch):
    """The server's graphs run eagerly on the CPU (the CUDA rule lifted)."""
    capture = CountingCapture()
    monkeypatch.setattr(static_batches, "require_cuda", lambda device: None)
    monkeypatch.setattr(static_batches, "capture_cuda_graph", capture)
    return capture


# -- torchrl's checks -------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(static_batch_size=4, max_batch_size=8), ValueError, "at least max_batch_size"),
    (dict(static_batch_size=True), TypeError, "must be an integer or None"),
    (dict(static_batch_size=8.0), TypeError, "must be an integer or None"),
    (dict(static_batch_size=64), ValueError, "requires an explicit CUDA policy_device"),
    (dict(static_batch_size=64, device="cpu"), ValueError,
     "requires an explicit CUDA policy_device"),
])
def test_static_batch_size_is_checked_as_torchrl_checks_it(kwargs, error, message):
    with pytest.raises(error, match=message):
        batchserve.InferenceServer(make_policy(), batchserve.ThreadingTransport(), **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(static_batch_size=4, max_batch_size=8),
    dict(static_batch_size=True),
    dict(static_batch_size=64, device="cpu"),
])
def test_the_errors_are_torchrls(kwargs):
    """Same exception type and message as torchrl 0.14.1's server."""
    server_module = pytest.importorskip("torchrl.modules.inference_server")
    with pytest.raises(Exception) as theirs:
        server_module.InferenceServer(make_policy(), server_module.ThreadingTransport(), **kwargs)
    with pytest.raises(Exception) as ours:
        batchserve.InferenceServer(make_policy(), batchserve.ThreadingTransport(), **kwargs)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


def test_a_process_server_checks_it_before_starting_a_child():
    """As torchrl's process server: the check is made at construction."""
    with pytest.raises(ValueError, match="requires an explicit CUDA policy_device"):
        batchserve.InferenceServer(policy_factory=make_policy, service_backend="process",
                                   static_batch_size=64)
    with pytest.raises(ValueError, match="at least max_batch_size"):
        batchserve.InferenceServer(policy_factory=make_policy, service_backend="process",
                                   static_batch_size=8, max_batch_size=16, device="cuda")


@pytest.mark.parametrize("value, expected", [
    (None, None), (64, (64,)), ([64, 8, 16, 8], (8, 16, 64)), ((32, 64), (32, 64)),
])
def test_bucket_sizes_are_sorted_and_unique(value, expected):
    assert static_batch_sizes(value, max_batch_size=64) == expected


@pytest.mark.parametrize("value, error", [
    ([], TypeError), ([8, "16"], TypeError), ([0, 64], ValueError), ([8, 16], ValueError),
])
def test_bad_bucket_sizes_are_refused(value, error):
    with pytest.raises(error):
        static_batch_sizes(value, max_batch_size=64)


def test_prepare_cudagraph_without_a_static_batch_size_does_nothing():
    server = batchserve.InferenceServer(make_policy(), batchserve.ThreadingTransport())
    assert server.prepare_cudagraph(spec()) is None
    assert server.static_batch_size is None


# -- the graphs, eagerly ------------------------------------------------------


def test_padding_repeats_the_last_request():
    batch = TensorDict({"x": torch.arange(3.0).unsqueeze(1)}, batch_size=[3])
    padded = pad_rows(batch, 3, 8)
    assert padded.batch_size == (8,)
    assert padded["x"].squeeze(1).tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    assert pad_rows(batch, 3, 3) is batch


def test_a_batch_goes_to_the_smallest_bucket_that_holds_it():
    graphs = StaticBatches(make_policy(), (8, 16, 32), "cpu")
    assert [graphs.bucket(n) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    with pytest.raises(RuntimeError, match="33 requests for static_batch_size=32"):
        graphs.bucket(33)


def test_every_bucket_is_captured_and_warmed_up_before_serving():
    capture, padding = CountingCapture(), []
    policy = make_policy()
    graphs = StaticBatches(policy, (4, 8), "cpu", capture=capture,
                           record_padding=lambda n, size: padding.append((n, size)))
    assert not graphs.captured
    graphs.prepare(spec())
    assert graphs.captured
    assert capture.calls == [[4] * (WARMUP + 1), [8] * (WARMUP + 1)]
    batch = TensorDict({"observation": torch.randn(5, 4)}, batch_size=[5])
    with torch.no_grad():
        out = graphs(batch)
        expected = policy(batch.clone())
    assert out.batch_size == (5,)
    torch.testing.assert_close(out["action"], expected["action"])
    assert capture.calls[1][-1] == 8 and padding == [(5, 8)]


def test_requests_must_carry_the_captured_interaction_type():
    graphs = StaticBatches(make_policy(), (4,), "cpu", capture=CountingCapture())
    with set_interaction_type(InteractionType.RANDOM):
        graphs.prepare(spec())
    batch = TensorDict({"observation": torch.randn(2, 4)}, batch_size=[2])
    with set_interaction_type(InteractionType.DETERMINISTIC), pytest.raises(
            RuntimeError, match=OTHER_INTERACTION):
        graphs(batch)
    with set_interaction_type(InteractionType.RANDOM):
        assert graphs(batch).batch_size == (2,)


def test_the_first_request_must_have_the_policy_inputs():
    graphs = StaticBatches(make_policy(), (4,), "cpu", capture=CountingCapture())
    graphs.prepare(spec())
    with pytest.raises(RuntimeError, match="missing policy input keys"):
        graphs(TensorDict({"other": torch.randn(2, 4)}, batch_size=[2]))


def test_in_place_updates_keep_the_graphs_and_replaced_storage_drops_them():
    policy = make_policy()
    graphs = StaticBatches(policy, (4,), "cpu", capture=CountingCapture())
    graphs.prepare(spec())
    with torch.no_grad():
        policy.module.weight.mul_(2.0)
    graphs.check_storage()
    assert graphs.captured
    policy.module.weight = nn.Parameter(torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="fallen back to eager inference"):
        graphs.check_storage()
    assert not graphs.captured
    graphs.check_storage()  # nothing left to check


# -- the server with graphs (eager stand-ins) ---------------------------------


def call_from_threads(transport, observations):
    results = [None] * len(observations)

    def actor(i):
        results[i] = transport.client()(TensorDict({"observation": observations[i]}))

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(len(observations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_the_server_serves_through_its_buckets(eager_graphs):
    policy = make_policy()
    transport = batchserve.ThreadingTransport()
    server = batchserve.InferenceServer(
        policy, transport, max_batch_size=8, static_batch_size=[2, 8], device="cpu",
        request_spec=spec())
    assert server.static_batch_size == [2, 8]
    with server:
        assert len(eager_graphs.calls) == 2  # captured at start
        observations = [torch.randn(4) for _ in range(6)]
        results = call_from_threads(transport, observations)
        stats = server.stats()
    for obs, result in zip(observations, results):
        with torch.no_grad():
            torch.testing.assert_close(result["action"], policy.module(obs))
    assert set(stats["padded_batch_histogram"]) <= {2, 8}
    graphed = sum(size * count for size, count in stats["padded_batch_histogram"].items())
    assert graphed - stats["padding_rows"] == stats["requests"] == 6
    assert 0.0 <= stats["padding_fraction"] < 1.0


def test_a_replaced_parameter_falls_back_to_eager_forwards(eager_graphs):
    policy = make_policy()
    transport = batchserve.ThreadingTransport()
    server = batchserve.InferenceServer(
        policy, transport, max_batch_size=4, static_batch_size=4, device="cpu")
    server.prepare_cudagraph(spec())
    with server:
        with pytest.raises(RuntimeError, match="Graph must be prepared|must be prepared"):
            server.prepare_cudagraph(spec())
        server.update_weights({"module.weight": torch.ones(2, 4), "module.bias": torch.zeros(2)})
        obs = torch.ones(4)
        assert transport.client()(TensorDict({"observation": obs}))["action"].tolist() == [4, 4]
        graphed = server.stats()["padded_batch_histogram"][4]

        def replace(model):
            model.module.weight = nn.Parameter(torch.full((2, 4), 2.0))

        with pytest.raises(RuntimeError, match=STORAGE_REPLACED[:40]):
            server.update_model(replace)
        out = transport.client()(TensorDict({"observation": obs}))
        assert out["action"].tolist() == [8, 8]  # the new weights, eagerly
        assert server.stats()["padded_batch_histogram"][4] == graphed


def test_a_recapture_keeps_the_interaction_type(eager_graphs):
    """Graphs dropped by an update are captured again at the next start,
    under the interaction type given to prepare_cudagraph, not the ambient one."""
    policy = make_policy()
    transport = batchserve.ThreadingTransport()
    server = batchserve.InferenceServer(
        policy, transport, max_batch_size=4, static_batch_size=4, device="cpu")
    server.prepare_cudagraph(spec(), interaction_type=InteractionType.RANDOM)

    def replace(model):
        model.module.weight = nn.Parameter(torch.zeros(2, 4))

    with server, pytest.raises(RuntimeError, match="fallen back to eager"):
        server.update_model(replace)
    captures = len(eager_graphs.calls)
    with server:  # captured again, under RANDOM
        assert len(eager_graphs.calls) == captures + 1
        client = transport.client()
        with pytest.raises(RuntimeError, match=OTHER_INTERACTION):
            client(TensorDict({"observation": torch.ones(4)}))  # no interaction type
        with set_interaction_type(InteractionType.RANDOM):
            assert client(TensorDict({"observation": torch.ones(4)})).batch_size == ()


def test_max_batch_size_cannot_outgrow_the_largest_graph(eager_graphs):
    server = batchserve.InferenceServer(
        make_policy(), batchserve.ThreadingTransport(), max_batch_size=8,
        static_batch_size=[4, 16], device="cpu")
    server.max_batch_size = 16
    with pytest.raises(ValueError, match="at least max_batch_size, got 16 and 17"):
        server.max_batch_size = 17
    assert server.max_batch_size == 16


def test_an_update_from_weight_sync_that_replaces_storage_drops_the_graphs(eager_graphs):
    """A receiver polled between batches that assigns new parameters: the
    graphs are dropped (counted as a weight-sync error) and forwards go on
    eagerly with the new weights."""
    policy = make_policy()
    received = threading.Event()

    class ReplacingReceiver:
        def init_on_receiver(self, **kwargs):
            pass

        def connect(self, **kwargs):
            pass

        def receive(self, timeout=0.0):
            if received.is_set():
                return None
            policy.module.weight = nn.Parameter(torch.full((2, 4), 3.0))
            policy.module.bias = nn.Parameter(torch.zeros(2))
            received.set()
            return {"weights": True}

    transport = batchserve.ThreadingTransport()
    server = batchserve.InferenceServer(
        policy, transport, max_batch_size=4, static_batch_size=4, device="cpu",
        request_spec=spec(), weight_sync=ReplacingReceiver(), timeout=0.001)
    with server:
        assert received.wait(30)
        client = transport.client()
        out = client(TensorDict({"observation": torch.ones(4)}))
        assert out["action"].tolist() == [12, 12]
        stats = server.stats()
    assert stats["weight_sync_errors"] == 1
    assert sum(stats["padded_batch_histogram"].values()) == 0  # no graphed forward since


def test_start_needs_a_request_spec_or_a_prepared_graph(eager_graphs):
    server = batchserve.InferenceServer(
        make_policy(), batchserve.ThreadingTransport(), max_batch_size=4,
        static_batch_size=4, device="cpu")
    with pytest.raises(RuntimeError, match="static_batch_size requires request_spec"):
        server.start()
    assert not server.is_alive


# -- real CUDA graphs -----------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_buckets_replay_the_eager_results():
    policy = make_policy().cuda()
    transport = batchserve.ThreadingTransport()
    server = batchserve.InferenceServer(
        policy, transport, max_batch_size=16, static_batch_size=[4, 16], device="cuda",
        output_device="cpu", request_spec=spec())
    with server:
        observations = [torch.randn(4) for _ in range(12)]
        results = call_from_threads(transport, observations)
        stats = server.stats()
    for obs, result in zip(observations, results):
        with torch.no_grad():
            expected = policy.module(obs.cuda()).cpu()
        torch.testing.assert_close(result["action"], expected)
    assert set(stats["padded_batch_histogram"]) <= {4, 16}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graphs_see_in_place_weight_updates():
    policy = make_policy().cuda()
    transport = batchserve.ThreadingTransport()
    server = batchserve.InferenceServer(
        policy, transport, max_batch_size=4, static_batch_size=4, device="cuda",
        output_device="cpu", request_spec=spec())
    with server:
        server.update_weights({"module.weight": torch.ones(2, 4), "module.bias": torch.zeros(2)})
        out = transport.client()(TensorDict({"observation": torch.ones(4)}))
        assert out["action"].tolist() == [4, 4]
        assert server.stats()["padded_batch_histogram"] == {4: 1}

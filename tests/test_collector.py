"""batchserve's AsyncBatchedCollector, and batchserve's transports under
torchrl's collector."""

import warnings

import pytest

torchrl = pytest.importorskip("torchrl")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from tensordict.nn import TensorDictModule  # noqa: E402
from torchrl.collectors import AsyncBatchedCollector as TorchrlAsyncBatchedCollector  # noqa: E402
from torchrl.modules.inference_server._transport import (  # noqa: E402
    InferenceTransport as TorchrlInferenceTransport,
)
from torchrl.testing.mocking_classes import CountingEnv  # noqa: E402

import batchserve  # noqa: E402
from batchserve import AsyncBatchedCollector, SharedMemoryTransport, ThreadingTransport  # noqa: E402

NUM_ENVS = 3


class _ConstantAction(nn.Module):
    """Acts ``bias`` on every step, so a weight update shows in the actions."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.bias = nn.Parameter(torch.full((1,), value))

    def forward(self, observation):
        return (torch.zeros_like(observation) + self.bias.detach()).to(observation.dtype)


def _policy(value: float = 1.0):
    return TensorDictModule(_ConstantAction(value), in_keys=["observation"], out_keys=["action"])


def _envs():
    return [lambda: CountingEnv(max_steps=1000)] * NUM_ENVS


def _collector(cls=AsyncBatchedCollector, **kwargs):
    kwargs.setdefault("frames_per_batch", 12)
    kwargs.setdefault("total_frames", 36)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchrl's default-change notice
        return cls(_envs(), policy=_policy(), env_backend="threading", **kwargs)


def test_batchserve_transports_are_torchrl_transports():
    assert isinstance(ThreadingTransport(), TorchrlInferenceTransport)
    assert issubclass(SharedMemoryTransport, TorchrlInferenceTransport)
    assert issubclass(batchserve.RayTransport, TorchrlInferenceTransport)


@pytest.mark.timeout(120)
def test_torchrl_collector_takes_a_batchserve_transport():
    collector = _collector(TorchrlAsyncBatchedCollector, transport=ThreadingTransport())
    try:
        frames = sum(batch.numel() for batch in collector)
    finally:
        collector.shutdown()
    assert frames == 36


@pytest.mark.timeout(120)
def test_collects_the_frames_on_batchserve_server():
    collector = _collector()
    try:
        assert isinstance(collector._server, batchserve.InferenceServer)
        batches = list(collector)
        stats = collector.server_stats()
    finally:
        collector.shutdown()
    assert [batch.numel() for batch in batches] == [12, 12, 12]
    assert stats["requests"] >= 36
    assert (batches[0]["action"] == 1).all()


@pytest.mark.timeout(120)
def test_serves_a_given_batchserve_transport():
    transport = ThreadingTransport()
    collector = _collector(transport=transport)
    try:
        assert collector._server.transport is transport
        frames = sum(batch.numel() for batch in collector)
    finally:
        collector.shutdown()
    assert frames == 36


@pytest.mark.timeout(120)
def test_weight_update_reaches_the_policy_and_its_version():
    collector = _collector(total_frames=-1, policy_version=3)
    try:
        assert collector.policy_version == 3
        iterator = iter(collector)
        next(iterator)
        collector.update_policy_weights_(_policy(5.0))
        assert collector.policy_version == 4
        # Requests already queued may still see the old weights; a later batch
        # is served after the update.
        for batch in iterator:
            if (batch["action"] == 5).all():
                break
        assert (batch["policy_version"] == 4).all()
    finally:
        collector.shutdown()


@pytest.mark.timeout(120)
def test_shutdown_stops_the_server():
    collector = _collector()
    for _ in collector:
        pass
    server = collector._server
    collector.shutdown()
    assert not server.is_alive


def test_signature_is_torchrl_s():
    import inspect

    assert inspect.signature(AsyncBatchedCollector) == inspect.signature(
        TorchrlAsyncBatchedCollector
    )
    with pytest.raises(TypeError):
        AsyncBatchedCollector(_envs(), policy=_policy(), frames_per_batch=4, not_an_argument=1)

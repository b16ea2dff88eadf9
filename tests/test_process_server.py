"""ProcessInferenceServer: batchserve's server in a child process (spawn).

Results arrive through each transport it serves (batchserve's
SharedMemoryTransport, torchrl's MPTransport and distributed transport);
stats, health, policy_version and update_model_weights round trips; a
SIGKILLed server process makes a blocked caller raise ServerClosedError;
start failures surface the child's error.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import threading

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

import batchserve
from batchserve import ProcessInferenceServer, ServerClosedError, SharedMemoryTransport

pytestmark = pytest.mark.timeout(300)

SPAWN = mp.get_context("spawn")


def make_policy():
    return TensorDictModule(nn.Linear(4, 2), in_keys=["observation"], out_keys=["action"])


class BlockingPolicy(nn.Module):
    """Sets `entered` in its forward, then never returns."""

    def __init__(self, entered):
        super().__init__()
        self.entered = entered

    def forward(self, td):
        self.entered.set()
        threading.Event().wait()


def make_blocking_policy(entered):
    return BlockingPolicy(entered)


def make_failing_policy():
    raise ValueError("no checkpoint here")


def request() -> TensorDict:
    return TensorDict({"observation": torch.ones(4)})


def specs():
    request_spec = TensorDict({"observation": torch.zeros(4)})
    response_spec = TensorDict(
        {"action": torch.zeros(2), "policy_version": torch.zeros((), dtype=torch.long)}
    )
    return request_spec, response_spec


def shared_memory_transport():
    return SharedMemoryTransport(*specs(), num_slots=4)


def mp_transport():
    torchrl = pytest.importorskip("torchrl.modules.inference_server")
    return torchrl.MPTransport(ctx=SPAWN, use_manager=True)


def distributed_transport():
    pytest.importorskip("torchrl")
    from torchrl.modules.inference_server._distributed import _DistributedInferenceTransport

    return _DistributedInferenceTransport(*specs(), backend="gloo", timeout=60.0)


TRANSPORTS = {
    "shared_memory": shared_memory_transport,
    "process": mp_transport,
    "distributed": distributed_transport,
}


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
def test_a_result_arrives_through_each_transport(kind):
    transport = TRANSPORTS[kind]()
    server = ProcessInferenceServer(
        policy_factory=make_policy, transport=transport, mp_context="spawn", max_batch_size=4
    )
    try:
        assert server.service_backend == "process"
        assert server.transport_kind == kind
        with server:
            result = server.client()(request(), timeout=60)
            assert result["action"].shape == (2,)
            assert result["policy_version"].item() == 0
    finally:
        server.shutdown()
        close = getattr(transport, "close", None)
        if close is not None:
            close()
    assert not server.is_alive


def test_control_plane_round_trips():
    transport = shared_memory_transport()
    with ProcessInferenceServer(
        policy_factory=make_policy, transport=transport, mp_context=SPAWN, policy_version=3
    ) as server:
        client = server.client()
        client(request(), timeout=60)
        assert server.stats(reset=True)["requests"] == 1
        assert server.stats()["requests"] == 0
        health = server.health()
        assert health["process_alive"] and health["alive"] and health["policy_version"] == 3
        weights = TensorDict.from_module(make_policy()).data.zero_()
        assert server.update_model_weights(weights) == {"accepted": True}
        assert server.policy_version == 4
        result = client(request(), timeout=60)
        assert torch.equal(result["action"], torch.zeros(2))
        assert result["policy_version"].item() == 4
        server.update_model_weights(weights, mark_weight_update=False)
        assert server.policy_version == 4
        bad = TensorDict({"nope": torch.zeros(1)})
        with pytest.raises(RuntimeError, match="update_model_weights"):
            server.update_model_weights(bad)
    with pytest.raises(RuntimeError, match="not running"):
        server.stats()
    assert not server.health()["process_alive"]


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
def test_a_killed_server_process_fails_a_blocked_caller(kind):
    transport = TRANSPORTS[kind]()
    entered = SPAWN.Event()
    server = ProcessInferenceServer(
        policy_factory=functools.partial(make_blocking_policy, entered),
        transport=transport,
        mp_context=SPAWN,
        max_batch_size=1,
    )
    errors = []
    try:
        server.start()
        client = server.client()

        def call():
            try:
                client(request())
            except BaseException as exc:
                errors.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        assert entered.wait(120)  # the request is in the forward
        os.kill(server._process.pid, signal.SIGKILL)
        caller.join(60)  # hang guard: the caller must come back
        assert not caller.is_alive()
    finally:
        server.shutdown(timeout=1.0)
        close = getattr(transport, "close", None)
        if close is not None:
            close()
    assert len(errors) == 1 and isinstance(errors[0], ServerClosedError), errors


def test_start_surfaces_the_childs_error():
    server = ProcessInferenceServer(
        policy_factory=make_failing_policy, transport=shared_memory_transport(), mp_context=SPAWN
    )
    with pytest.raises(RuntimeError, match="failed to start.*no checkpoint here") as info:
        server.start()
    assert isinstance(info.value.__cause__, ValueError)
    assert not server.is_alive


def test_an_unpicklable_policy_factory_raises_at_start():
    server = ProcessInferenceServer(
        policy_factory=lambda: make_policy(),
        transport=shared_memory_transport(),
        mp_context=SPAWN,
    )
    with pytest.raises(TypeError, match="policy_factory"):
        server.start()
    assert not server.is_alive


def test_bad_arguments_raise_at_construction():
    with pytest.raises(ValueError, match="crosses processes"):
        ProcessInferenceServer(
            policy_factory=make_policy, transport=batchserve.ThreadingTransport()
        )
    with pytest.raises(TypeError, match="multiprocessing Event"):
        ProcessInferenceServer(
            policy_factory=make_policy,
            transport=shared_memory_transport(),
            shutdown_event=threading.Event(),
        )
    with pytest.raises(ValueError, match="max_batch_size"):
        ProcessInferenceServer(
            policy_factory=make_policy, transport=shared_memory_transport(), max_batch_size=0
        )


def test_the_shutdown_event_stops_the_server():
    stop = SPAWN.Event()
    server = ProcessInferenceServer(
        policy_factory=make_policy,
        transport=shared_memory_transport(),
        mp_context=SPAWN,
        shutdown_event=stop,
    )
    server.start()
    try:
        process = server._process
        stop.set()
        process.join(60)  # hang guard
        assert not server.is_alive
    finally:
        server.shutdown()


def test_library_exports_it():
    assert batchserve.ProcessInferenceServer is ProcessInferenceServer

"""The InferenceServer front door: service backends, transport selectors and
the keywords torchrl users pass, each honoured or refused by name."""

import threading

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from batchserve import InferenceServer, ServerClosedError, SharedMemoryTransport, ThreadingTransport


def _policy():
    return TensorDictModule(nn.Linear(4, 2), in_keys=["observation"], out_keys=["action"])


def _request():
    return TensorDict({"observation": torch.randn(4)}, batch_size=[])


def test_policy_factory_builds_a_thread_server():
    server = InferenceServer(policy_factory=_policy)
    with server:
        assert server.client()(_request())["action"].shape == (2,)
    assert server.service_backend == "thread"
    assert server.transport_kind == "thread"


@pytest.mark.parametrize("selector", ["auto", "thread", "queue", None])
def test_thread_selectors_give_batchserve_s_threading_transport(selector):
    server = InferenceServer(_policy(), selector)
    assert isinstance(server.transport, ThreadingTransport)


def test_transport_options_reach_the_transport():
    server = InferenceServer(_policy(), "thread", transport_options={"max_queue_size": 3})
    assert isinstance(server.transport, ThreadingTransport)
    with pytest.raises(ValueError, match="explicit transport instance"):
        InferenceServer(_policy(), ThreadingTransport(), transport_options={"max_queue_size": 3})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"transport": "shared_memory"}, "incompatible"),
        ({"transport": "ray"}, "incompatible"),
        ({"transport": "nonsense"}, "incompatible"),
        ({"service_backend": "nonsense"}, "must be 'thread', 'process', or 'ray'"),
        ({"policy_factory": _policy}, "mutually exclusive"),
        ({"service_backend_options": {"mp_context": "spawn"}}, "only valid for process or Ray"),
        ({"num_clients": 4}, "num_clients"),
        ({"static_batch_size": 64}, "static_batch_size"),
        ({"response_spec": _request()}, "response_spec"),
    ],
)
def test_what_a_thread_server_cannot_honour_raises_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InferenceServer(_policy(), **kwargs)


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_remote_backends_need_a_policy_factory(backend):
    with pytest.raises(ValueError, match="policy_factory"):
        InferenceServer(_policy(), service_backend=backend)
    with pytest.raises(ValueError, match="policy_factory is required"):
        InferenceServer(service_backend=backend)


def test_process_backend_options_are_checked_before_a_child_starts():
    with pytest.raises(ValueError, match="Unsupported process service_backend_options"):
        InferenceServer(
            policy_factory=_policy,
            service_backend="process",
            service_backend_options={"num_cpus": 1},
        )
    with pytest.raises(ValueError, match="requires request_spec and response_spec"):
        InferenceServer(
            policy_factory=_policy, service_backend="process", transport="shared_memory"
        )


@pytest.mark.timeout(180)
def test_process_backend_with_shared_memory_serves_on_batchserve_s_transport():
    response = TensorDict({"action": torch.zeros(2)}, batch_size=[])
    server = InferenceServer(
        policy_factory=_policy,
        service_backend="process",
        service_backend_options={"mp_context": "spawn"},
        transport="shared_memory",
        request_spec=_request(),
        response_spec=response,
        num_clients=2,
        policy_version_key=None,
    )
    assert isinstance(server.transport, SharedMemoryTransport)
    with server:
        assert server.client()(_request())["action"].shape == (2,)
        assert server.health()["process_alive"]
    assert server.service_backend == "process"
    assert server.transport_kind == "shared_memory"


def test_torchrl_contexts_choose_the_backend_and_name_themselves_in_errors():
    torchrl = pytest.importorskip("torchrl")
    with torchrl.service_backend("thread"), torchrl.transport_backend("queue"):
        server = InferenceServer(_policy())
    assert isinstance(server.transport, ThreadingTransport)
    with torchrl.transport_backend("shared_memory"):
        with pytest.raises(ValueError, match="enclosing torchrl.transport_backend context"):
            InferenceServer(_policy())
    with torchrl.service_backend("distributed"):
        with pytest.raises(ValueError, match="enclosing torchrl.service_backend context"):
            InferenceServer(_policy())


def test_direct_is_torchrl_s_slot_transport_sized_by_num_clients():
    pytest.importorskip("torchrl")
    server = InferenceServer(_policy(), "direct", num_clients=2)
    assert server.transport_kind == "direct"
    with server:
        first, second = server.clients(2)
        assert first(_request())["action"].shape == (2,)
        assert second(_request())["action"].shape == (2,)
    with pytest.raises(ValueError, match="requires num_clients"):
        InferenceServer(_policy(), "direct")


@pytest.mark.timeout(60)
def test_setting_the_shutdown_event_stops_the_server():
    event = threading.Event()
    event.set()  # start() clears it
    server = InferenceServer(_policy(), shutdown_event=event)
    server.start()
    assert not event.is_set()
    client = server.client()
    assert client(_request())["action"].shape == (2,)
    event.set()
    server._last_worker.join(30)
    assert not server.is_alive
    with pytest.raises(ServerClosedError):
        client(_request(), timeout=30)
    server.shutdown()
    assert event.is_set()


def test_health_and_update_model_weights():
    policy = _policy()
    with InferenceServer(policy) as server:
        server.client()(_request())
        health = server.health()
        assert health["alive"] and health["requests"] == 1
        weights = TensorDict.from_module(policy).clone().zero_()
        server.update_model_weights(weights)
        assert server.policy_version == 1
        assert torch.count_nonzero(server.client()(_request())["action"]) == 0
        server.update_model_weights(weights, mark_weight_update=False)
        assert server.policy_version == 1
        with pytest.raises(ValueError):
            server.update_model_weights(TensorDict({"bogus": torch.zeros(1)}))
    assert not server.health()["alive"]

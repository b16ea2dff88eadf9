"""InferenceServer.update_weights: in-process weight updates applied between
batches, exact policy-version stamping, and bad updates refused whole."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from conftest import make_policy
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from batchserve import InferenceServer, SharedMemoryTransport, ThreadingTransport

pytestmark = pytest.mark.timeout(120)


def observation() -> TensorDict:
    return TensorDict({"observation": torch.ones(4)})


def test_a_tensordict_of_parameters_is_copied_in_and_bumps_the_version():
    policy, other = make_policy(), make_policy()
    transport = ThreadingTransport()
    with InferenceServer(policy, transport) as server:
        client = transport.client()
        before = client(observation())["action"]
        assert server.update_weights(TensorDict.from_module(other)) == 1
        after = client(observation())
        assert torch.allclose(after["action"], other(observation())["action"])
        assert not torch.allclose(after["action"], before)
        assert after["policy_version"].item() == 1
        assert server.update_weights(TensorDict.from_module(policy), version=41) == 41
        assert client(observation())["policy_version"].item() == 41
        assert server.stats()["weight_updates"] == 2


def test_a_state_dict_works_too_and_may_live_on_another_device_or_be_shared():
    policy, other = make_policy(), make_policy()
    transport = ThreadingTransport()
    with InferenceServer(policy, transport) as server:
        server.update_weights({k: v.clone().share_memory_() for k, v in other.state_dict().items()})
        expected = other(observation())["action"]
        assert torch.allclose(transport.client()(observation())["action"], expected)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda sd: sd.pop("module.bias"), r"missing 'module.bias'"),
        (lambda sd: sd.update(extra=torch.zeros(1)), r"unexpected 'extra'"),
        (
            lambda sd: sd.update({"module.weight": torch.zeros(3, 4)}),
            r"'module.weight' is torch.float32 \[3, 4\]",
        ),
        (
            lambda sd: sd.update({"module.bias": torch.zeros(2, dtype=torch.float64)}),
            r"'module.bias' is torch.float64",
        ),
        (lambda sd: sd.update({"module.bias": [0.0, 0.0]}), r"'module.bias' is a list"),
        (
            lambda sd: sd.update({"module.bias": torch.zeros(2, device="meta")}),
            r"'module.bias' is a meta tensor",
        ),
        (
            lambda sd: sd.update({"module.bias": torch.zeros(2).to_sparse()}),
            r"'module.bias' is a torch.sparse_coo tensor",
        ),
    ],
    ids=["missing", "unexpected", "shape", "dtype", "not-a-tensor", "meta", "sparse"],
)
def test_a_bad_update_is_refused_naming_the_parameter_and_changes_nothing(change, match):
    policy = make_policy()
    transport = ThreadingTransport()
    with InferenceServer(policy, transport) as server:
        client = transport.client()
        before = client(observation())["action"]
        weights = {k: torch.randn_like(v) for k, v in policy.state_dict().items()}
        weights["module.weight"] = torch.full((2, 4), 7.0)  # applied first, were it applied at all
        change(weights)
        with pytest.raises(ValueError, match=match):
            server.update_weights(weights)
        assert torch.equal(client(observation())["action"], before)
        assert server.policy_version == 0 and server.stats()["weight_updates"] == 0


def test_weights_for_a_model_that_is_not_a_module_are_refused():
    with InferenceServer(lambda td: td, ThreadingTransport()) as server:
        with pytest.raises(TypeError, match="nn.Module"):
            server.update_weights({})
        with pytest.raises(TypeError, match="state_dict"):
            server.update_weights([1, 2])


def _shared_memory_transport():
    return SharedMemoryTransport(
        TensorDict({"observation": torch.zeros(1)}),
        TensorDict({"action": torch.zeros(1), "policy_version": torch.zeros((), dtype=torch.long)}),
        num_slots=16,
    )


@pytest.mark.parametrize("make_transport", [ThreadingTransport, _shared_memory_transport],
                         ids=["threads", "shared_memory"])
def test_every_result_carries_the_version_that_computed_it(make_transport):
    """Version v sets the weight to v, so a result's action is the version
    that computed it; updates stream while 8 actors call."""
    policy = TensorDictModule(nn.Linear(1, 1, bias=False), in_keys=["observation"],
                              out_keys=["action"])
    nn.init.zeros_(policy.module.weight)
    transport = make_transport()
    updates = 200
    stop = threading.Event()
    problems: list = []
    seen = threading.Condition()
    newest = [0]  # the newest version any actor got back

    def actor(index: int) -> None:
        client = transport.client()
        last = -1
        try:
            while not stop.is_set():
                out = client(TensorDict({"observation": torch.ones(1)}), timeout=60)
                version = out["policy_version"].item()
                if out["action"].item() != float(version):
                    problems.append(("action of another version", version, out["action"].item()))
                if version < last:
                    problems.append(("version went back", last, version))
                last = version
                with seen:
                    if version > newest[0]:
                        newest[0] = version
                        seen.notify_all()
        except BaseException as exc:
            problems.append(exc)

    with InferenceServer(policy, transport, max_batch_size=8, timeout=0.0005) as server:
        actors = [threading.Thread(target=actor, args=(i,)) for i in range(8)]
        for t in actors:
            t.start()
        for v in range(1, updates + 1):
            server.update_weights({"module.weight": torch.full((1, 1), float(v))}, version=v)
            with seen:  # each version serves before the next lands (hang guard: 30 s)
                assert seen.wait_for(lambda v=v: newest[0] >= v or problems, timeout=30)
        stop.set()
        for t in actors:
            t.join(60)
        assert not any(t.is_alive() for t in actors)
        assert server.policy_version == updates
    assert problems == []
    if isinstance(transport, SharedMemoryTransport):
        transport.close()


class TiedPolicy(nn.Module):
    """Two layers sharing one weight, a persistent and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(4), persistent=False)

    def forward(self, observation):
        return self.b(self.a(observation)) * self.scale + self.cache


def test_tied_parameters_and_non_persistent_buffers_in_every_form():
    """A state_dict or TensorDict.from_module names a tied weight twice and
    (from_module) carries non-persistent buffers: both are accepted, the
    weight is copied once, and the server's non-persistent buffers stay."""
    policy = TensorDictModule(TiedPolicy(), in_keys=["observation"], out_keys=["action"])
    transport = ThreadingTransport()
    with InferenceServer(policy, transport) as server:
        for source in (lambda m: m.state_dict(), TensorDict.from_module):
            other = TensorDictModule(TiedPolicy(), in_keys=["observation"], out_keys=["action"])
            other.module.cache.fill_(5.0)  # not the server's to take
            server.update_weights(source(other))
            assert torch.equal(policy.module.a.weight, other.module.a.weight)
            assert policy.module.b.weight is policy.module.a.weight  # still tied
            assert policy.module.cache.eq(0.0).all()
    assert server.policy_version == 2


class _Strategy:
    def apply_weights(self, destination, weights, inplace=True):
        pass


def test_a_torchrl_strategy_wrapped_by_a_server_pickles_as_itself():
    """A scheme whose strategy the server wrapped (to apply under its model
    lock) can still be sent to a new trainer process: the wrapper pickles as
    the plain strategy, without the server."""
    import pickle

    from batchserve.weights.schemes import _ApplyUnderModelLock

    with InferenceServer(make_policy(), ThreadingTransport()) as server:
        wrapped = _ApplyUnderModelLock(_Strategy(), server)
        assert type(pickle.loads(pickle.dumps(wrapped))) is _Strategy

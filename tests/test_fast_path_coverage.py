"""What real users send takes the fast path: stacking collates (torchrl's
``maybe_dense_stack`` among them), TensorDictSequential and probabilistic
policies, requests stamped with an interaction type, nested keys; and
``stats()`` says which requests missed it and why."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from tensordict import LazyStackedTensorDict, TensorDict, lazy_stack, maybe_dense_stack
from tensordict.nn import (
    InteractionType,
    NormalParamExtractor,
    ProbabilisticTensorDictModule,
    TensorDictModule,
    TensorDictSequential,
)

from batchserve import InferenceServer, ThreadingTransport
from batchserve.batching.collate import INTERACTION_TYPE_KEY, default_collate, stacks_requests

_CODES = {InteractionType.MODE: 0, InteractionType.RANDOM: 3, InteractionType.DETERMINISTIC: 4}


def torchrl_style_policy() -> TensorDictSequential:
    """An MLP to a Normal's parameters, then the probabilistic head."""
    torch.manual_seed(0)
    return TensorDictSequential(
        TensorDictModule(
            nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4), NormalParamExtractor()),
            in_keys=["obs"], out_keys=["loc", "scale"],
        ),
        ProbabilisticTensorDictModule(
            in_keys=["loc", "scale"], out_keys=["action"],
            distribution_class=torch.distributions.Normal, return_log_prob=True,
        ),
    )


def stamped(obs: torch.Tensor, mode) -> TensorDict:
    td = TensorDict({"obs": obs})
    td.set(INTERACTION_TYPE_KEY, torch.tensor(_CODES[mode], dtype=torch.int8))
    return td


def torchrl_default_collate():
    server = pytest.importorskip("torchrl.modules.inference_server._server")
    return server._default_collate


@pytest.mark.parametrize(
    "collate",
    [default_collate, lazy_stack, maybe_dense_stack, torch.stack, TensorDict.stack,
     LazyStackedTensorDict.lazy_stack, "torchrl"],
    ids=["default", "lazy_stack", "maybe_dense_stack", "torch.stack", "TensorDict.stack",
         "LazyStackedTensorDict.lazy_stack", "torchrl_default"],
)
def test_stacking_collates_take_the_fast_path(collate):
    if collate == "torchrl":
        collate = torchrl_default_collate()
    assert stacks_requests(collate)
    model = TensorDictModule(nn.Linear(4, 2), in_keys=["obs"], out_keys=["out"])
    transport = ThreadingTransport()
    requests = [TensorDict({"obs": torch.randn(4)}) for _ in range(6)]
    with InferenceServer(model, transport, max_batch_size=4, collate_fn=collate) as server:
        client = transport.client()
        results = [client(td) for td in requests]
        stats = server.stats()
    for td, result in zip(requests, results):
        torch.testing.assert_close(result["out"], model(td.clone())["out"])
    # The first request teaches the schema on the general path; the rest are fast.
    assert stats["fast_path_requests"] == 5
    assert stats["fast_path_fraction"] == pytest.approx(5 / 6)
    (reason,) = stats["fast_path_refusals"]
    assert "first request of its schema" in reason


def test_a_collate_that_transforms_is_not_a_stack():
    assert not stacks_requests(lambda items: torch.stack(items))
    assert not stacks_requests(None)


def test_a_custom_collate_is_named_as_the_reason():
    def my_collate(items):
        return torch.stack(items) * 1

    transport = ThreadingTransport()
    with InferenceServer(lambda td: td.clone(), transport, collate_fn=my_collate) as server:
        for _ in range(3):
            transport.client()(TensorDict({"obs": torch.randn(4)}))
        stats = server.stats()
    assert stats["fast_path_fraction"] == 0.0
    (reason,) = stats["fast_path_refusals"]
    assert "collate_fn" in reason and "my_collate" in reason
    assert stats["fast_path_refusals"][reason] == 3


def test_a_torchrl_transport_is_named_as_the_reason():
    torchrl_server = pytest.importorskip("torchrl.modules.inference_server")
    transport = torchrl_server.ThreadingTransport()
    with InferenceServer(lambda td: td.clone(), transport) as server:
        transport.client()(TensorDict({"obs": torch.randn(4)}))
        (reason,) = server.stats()["fast_path_refusals"]
    assert "ThreadingTransport" in reason and "request queue" in reason


def test_request_kinds_are_counted_apart():
    transport = ThreadingTransport()
    with InferenceServer(lambda td: td.clone(), transport) as server:
        fresh = server.stats()
        client = transport.client()
        for _ in range(3):
            client(TensorDict({"obs": torch.randn(4)}))
        client(TensorDict({"obs": torch.randn(4, 2).t()[0]}))  # a strided view
        client(TensorDict({"obs": torch.randn(5)}))
        stats = server.stats()
    assert math.isnan(fresh["fast_path_fraction"]) and fresh["fast_path_refusals"] == {}
    reasons = stats["fast_path_refusals"]
    assert sum(reasons.values()) == stats["requests"] - stats["fast_path_requests"] == 3
    assert any("not a contiguous" in r for r in reasons)
    assert any("shape [5], served [4]" in r for r in reasons)


@pytest.mark.timeout(60)
def test_a_torchrl_style_policy_serves_stamped_requests_on_the_fast_path():
    policy = torchrl_style_policy()
    transport = ThreadingTransport()
    observations = [torch.randn(4) for _ in range(8)]
    modes = [InteractionType.DETERMINISTIC, InteractionType.RANDOM] * 4
    with InferenceServer(policy, transport, max_batch_size=8, collate_fn=maybe_dense_stack,
                         timeout=30) as server:
        # One request teaches the schema, then a batch of 8 mixing two modes.
        transport.client()(stamped(torch.randn(4), InteractionType.MODE))
        server.min_batch_size = 8
        futures = [transport.submit(stamped(o, m)) for o, m in zip(observations, modes)]
        results = [f.result(timeout=30) for f in futures]
        stats = server.stats()
    assert stats["fast_path_requests"] == 8
    assert stats["interaction_split_batches"] == 1
    for obs, mode, result in zip(observations, modes, results):
        assert INTERACTION_TYPE_KEY not in result.keys()
        expected = policy.module[0](TensorDict({"obs": obs}))
        torch.testing.assert_close(result["loc"], expected["loc"])
        if mode is InteractionType.DETERMINISTIC:
            torch.testing.assert_close(result["action"], result["loc"])
        else:  # sampled: a Normal draw equals its mean with probability 0
            assert not torch.equal(result["action"], result["loc"])
        assert result["action_log_prob"].shape == result["action"].shape


@pytest.mark.timeout(60)
def test_policy_client_module_requests_take_the_fast_path():
    pytest.importorskip("torchrl")
    from torchrl.modules.inference_server import PolicyClientModule

    transport = ThreadingTransport()
    with InferenceServer(torchrl_style_policy(), transport, max_batch_size=4,
                         collate_fn=maybe_dense_stack) as server:
        actor = PolicyClientModule(transport, interaction_type=InteractionType.DETERMINISTIC)
        for _ in range(5):
            out = actor(TensorDict({"obs": torch.randn(4)}))
            torch.testing.assert_close(out["action"], out["loc"])
        stats = server.stats()
    assert stats["fast_path_requests"] == 4


@pytest.mark.timeout(60)
def test_nested_keys_take_the_fast_path():
    def model(td):
        return TensorDict({"sum": td["obs", "a"].sum(-1) + td["obs", "b", "c"].sum(-1)},
                          batch_size=td.batch_size)

    transport = ThreadingTransport()

    def nested(i: int, extra: bool = False) -> TensorDict:
        obs = {"a": torch.full((3,), float(i)), "b": {"c": torch.ones(2)}}
        if extra:
            obs["b"]["d"] = torch.zeros(1)  # a leaf the schema lacks
        return TensorDict({"obs": obs})

    with InferenceServer(model, transport, max_batch_size=4) as server:
        client = transport.client()
        sums = [client(nested(i))["sum"].item() for i in range(5)]
        with_extra = client(nested(1, extra=True))
        stats = server.stats()
    assert sums == [3 * i + 2 for i in range(5)]
    assert with_extra["sum"].item() == 5
    assert stats["fast_path_requests"] == 4
    assert any("extra keys [('obs', 'b', 'd')]" in r for r in stats["fast_path_refusals"])


@pytest.mark.timeout(60)
def test_non_tensor_metadata_travels_beside_the_rows():
    seen = []

    def model(td):
        seen.append(list(td["env_index"]))  # the data, stacked: a list either way
        out = TensorDict({"out": td["obs"] * 2}, batch_size=td.batch_size)
        out.set("env_index", td.get("env_index"))
        return out

    transport = ThreadingTransport()

    def request_of(i: int) -> TensorDict:
        td = TensorDict({"obs": torch.full((2,), float(i))})
        td.set_non_tensor("env_index", i)
        td.set_non_tensor(("meta", "name"), f"env-{i}")
        return td

    with InferenceServer(model, transport, max_batch_size=8, timeout=30) as server:
        transport.client()(request_of(0))  # teaches the schema
        server.min_batch_size = 4
        futures = [transport.submit(request_of(i)) for i in range(1, 5)]
        results = [f.result(timeout=30) for f in futures]
        stats = server.stats()
    assert stats["fast_path_requests"] == 4
    assert sorted(seen[-1]) == [1, 2, 3, 4]  # the model saw them stacked
    for i, result in zip(range(1, 5), results):
        assert result["env_index"] == i
        assert result["out"].tolist() == [2.0 * i, 2.0 * i]


@pytest.mark.timeout(60)
def test_metadata_on_the_fast_path_matches_the_general_path():
    from tensordict.nn import TensorDictModule

    policy = TensorDictModule(nn.Linear(2, 1), in_keys=["obs"], out_keys=["act"])

    def request_of(i: int) -> TensorDict:
        td = TensorDict({"obs": torch.full((2,), float(i))})
        td.set_non_tensor("env_index", i)
        return td

    results = {}
    for name, collate in (("fast", maybe_dense_stack), ("general", lambda xs: lazy_stack(xs))):
        transport = ThreadingTransport()
        with InferenceServer(policy, transport, collate_fn=collate) as server:
            client = transport.client()
            results[name] = [client(request_of(i)) for i in range(4)]
            assert (server.stats()["fast_path_requests"] > 0) is (name == "fast")
    for fast, general in zip(results["fast"], results["general"]):
        assert set(fast.keys()) == set(general.keys())
        assert fast["env_index"] == general["env_index"]
        torch.testing.assert_close(fast["act"], general["act"])


def test_refusal_reasons_are_bounded():
    from batchserve.server.stats import MAX_REFUSAL_REASONS, OTHER_REFUSALS, ServerStats

    stats = ServerStats()
    stats.record_refusals([f"shape [{i}]" for i in range(MAX_REFUSAL_REASONS + 10)])
    stats.record_refusals(["shape [0]"])
    refusals = stats.snapshot(0)["fast_path_refusals"]
    assert len(refusals) == MAX_REFUSAL_REASONS + 1
    assert refusals[OTHER_REFUSALS] == 10 and refusals["shape [0]"] == 2


@pytest.mark.timeout(60)
def test_metadata_is_taken_when_the_request_is_submitted():
    from tensordict.nn import TensorDictModule

    policy = TensorDictModule(nn.Linear(2, 1), in_keys=["obs"], out_keys=["act"])
    transport = ThreadingTransport()

    def request_of(step: int) -> TensorDict:
        td = TensorDict({"obs": torch.zeros(2)})
        td.set_non_tensor("step", step)
        return td

    with InferenceServer(policy, transport, timeout=30) as server:
        transport.client()(request_of(0))  # teaches the schema
        server.min_batch_size = 2
        td = request_of(0)
        first = transport.submit(td)
        td.set_non_tensor("step", 1)  # the caller reuses its TensorDict at once
        second = transport.submit(td)
        results = [first.result(timeout=30), second.result(timeout=30)]
        assert server.stats()["fast_path_requests"] == 2
    assert [r["step"] for r in results] == [0, 1]

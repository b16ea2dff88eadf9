"""The general path: nested keys, non-tensor entries, custom collation,
devices, policy-version stamps, model updates, weight sync."""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from conftest import make_policy, request
from tensordict import NonTensorData, TensorDict
from tensordict.nn import TensorDictModule

from batchserve import InferenceServer


def test_nested_keys(transport):
    policy = TensorDictModule(
        nn.Linear(4, 2), in_keys=[("agents", "observation")], out_keys=[("agents", "action")]
    )
    with InferenceServer(policy, transport, max_batch_size=4):
        obs = torch.randn(4)
        result = transport.client()(TensorDict({("agents", "observation"): obs}))
    expected = policy.module(obs)
    torch.testing.assert_close(result["agents", "action"], expected)


def test_non_tensor_entries_travel_with_their_request(transport):
    def model(td):
        names = td.get("name").tolist()
        return TensorDict(
            {"length": torch.tensor([len(n) for n in names])}, batch_size=td.batch_size
        )

    with InferenceServer(model, transport, max_batch_size=8, min_batch_size=3, timeout=5):
        futures = [
            transport.submit(TensorDict({"name": NonTensorData(name), "x": torch.zeros(1)}))
            for name in ("a", "bbb", "cc")
        ]
        assert [f.result(timeout=10)["length"].item() for f in futures] == [1, 3, 2]


def test_custom_collate_fn_is_used(transport):
    calls = []

    def stacking_collate(items):
        calls.append(len(items))
        return torch.stack(items)  # dense stack instead of lazy_stack

    policy = make_policy()
    with InferenceServer(policy, transport, max_batch_size=16, collate_fn=stacking_collate):
        futures = [transport.submit(request(i)) for i in range(4)]
        for f in futures:
            assert f.result(timeout=10)["action"].shape == (2,)
    assert sum(calls) == 4


def test_results_match_a_direct_model_call(transport):
    policy = make_policy()
    observations = torch.randn(10, 4)
    with InferenceServer(policy, transport, max_batch_size=4):
        futures = [
            transport.submit(TensorDict({"observation": observations[i]})) for i in range(10)
        ]
        actions = torch.stack([f.result(timeout=10)["action"] for f in futures])
    with torch.no_grad():
        torch.testing.assert_close(actions, policy.module(observations))


def test_device_and_output_device(transport):
    seen = []

    class Recording(nn.Module):
        def forward(self, td):
            seen.append(td.device)
            return td.set("action", td["observation"] * 2)

    with InferenceServer(Recording(), transport, device="cpu", output_device="cpu") as server:
        assert server.device == torch.device("cpu") and server.policy_device == server.device
        result = transport.client()(TensorDict({"observation": torch.ones(4)}))
    assert result["action"].device.type == "cpu"
    assert seen == [torch.device("cpu")]


def test_policy_version_stamp_nested_key_and_start_value(transport):
    with InferenceServer(
        make_policy(), transport, policy_version=12, policy_version_key=("meta", "policy_version")
    ) as server:
        result = transport.client()(TensorDict({"observation": torch.randn(4)}))
        assert server.policy_version == 12
    assert result["meta", "policy_version"].item() == 12


def test_policy_version_key_none_disables_stamp(transport):
    with InferenceServer(make_policy(), transport, policy_version_key=None):
        result = transport.client()(TensorDict({"observation": torch.randn(4)}))
    assert "policy_version" not in result.keys()


def test_update_model_bumps_version(transport):
    policy = make_policy()
    with InferenceServer(policy, transport) as server:
        client = transport.client()
        obs = torch.randn(4)
        before = client(TensorDict({"observation": obs.clone()}))

        def zero(model):
            with torch.no_grad():
                model.module.weight.zero_()
                model.module.bias.fill_(1.0)
            return "applied"

        assert server.update_model(zero) == "applied"
        after = client(TensorDict({"observation": obs.clone()}))
        server.update_model(lambda m: None, mark_weight_update=False)
        stats = server.stats()
    assert before["policy_version"].item() == 0
    assert after["policy_version"].item() == 1
    assert stats["policy_version"] == 1 and stats["weight_updates"] == 1
    torch.testing.assert_close(after["action"], torch.ones(2))


def test_update_policy_weights_cascade_hook(transport):
    server = InferenceServer(make_policy(), transport, policy_version=3)
    server.update_policy_weights_()
    assert server.policy_version == 4


class _QueueWeightSync:
    """torchrl's receiver interface: weights applied by receive()."""

    def __init__(self):
        self.pending = []
        self.model = None
        self.initialized_on_receiver = False
        self.synchronized_on_receiver = False

    def init_on_receiver(self, *, model_id, model=None, worker_idx=0, **kwargs):
        assert model_id == "policy" and worker_idx == 0
        self.model = model
        self.initialized_on_receiver = True

    def connect(self, *, worker_idx=0):
        self.synchronized_on_receiver = True

    def receive(self, timeout=None):
        if not self.pending:
            return None
        weights = self.pending.pop(0)
        weights.to_module(self.model)
        return weights


def test_weight_sync_setup_and_updates(transport):
    policy = make_policy()
    ws = _QueueWeightSync()
    with InferenceServer(policy, transport, weight_sync=ws, timeout=0.01) as server:
        assert ws.initialized_on_receiver and ws.synchronized_on_receiver  # before start() returned
        client = transport.client()
        td = TensorDict({"observation": torch.ones(4)})
        client(td.clone())
        zeros = TensorDict.from_module(policy).apply(torch.zeros_like)
        ws.pending.append(zeros)
        deadline = time.monotonic() + 10
        while ws.pending and time.monotonic() < deadline:
            time.sleep(0.005)  # the idle server polls every `timeout`
        result = client(td.clone())
    torch.testing.assert_close(result["action"], torch.zeros(2))
    assert result["policy_version"].item() == 1
    assert server.stats()["weight_updates"] == 1


def test_lazy_stacked_requests_of_different_shapes(transport):
    """Ragged requests stack lazily; the model sees each one's own shape."""

    def model(td):
        lengths = [t["seq"].shape[0] for t in td.tensordicts]
        return TensorDict({"n": torch.tensor(lengths)}, batch_size=td.batch_size)

    with InferenceServer(model, transport, max_batch_size=8, min_batch_size=3, timeout=5):
        futures = [transport.submit(TensorDict({"seq": torch.zeros(k)})) for k in (1, 5, 3)]
        assert [f.result(timeout=10)["n"].item() for f in futures] == [1, 5, 3]


def test_requests_with_and_without_device_metadata_batch_together(transport):
    policy = make_policy()
    with_device = TensorDict(
        {"observation": torch.randn(4), "next": TensorDict({}, [])}, [], device="cpu"
    )
    without_device = TensorDict({"observation": torch.randn(4), "next": TensorDict({}, [])}, [])
    with InferenceServer(policy, transport, max_batch_size=2, min_batch_size=2, timeout=5):
        futures = [transport.submit(with_device), transport.submit(without_device)]
        results = [f.result(timeout=10) for f in futures]
    assert all(r["action"].shape == (2,) for r in results)

"""SharedMemoryTransport with the specs torchrl's takes beyond flat single
requests: nested keys, a batched request_spec, many leaves; and the limit."""

from __future__ import annotations

import pytest
import torch
from tensordict import NonTensorData, TensorDict
from tensordict.nn import TensorDictModule

from batchserve import InferenceServer, SharedMemoryTransport, _core


class Doubler(torch.nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.timeout(120)
def test_nested_keys_round_trip_on_both_paths():
    transport = SharedMemoryTransport(
        TensorDict(
            {"agent": {"observation": torch.zeros(4)}, "step": torch.zeros((), dtype=torch.long)}
        ),
        TensorDict(
            {"agent": {"action": torch.zeros(4)}, "step": torch.zeros((), dtype=torch.long)}
        ),
        num_slots=4,
    )
    client = transport.client()
    model = TensorDictModule(
        Doubler(), in_keys=[("agent", "observation")], out_keys=[("agent", "action")]
    )
    with InferenceServer(model, transport, max_batch_size=4):
        for i in range(3):
            obs = torch.arange(4, dtype=torch.float32) + i
            td = TensorDict({"agent": {"observation": obs}, "step": torch.tensor(i)})
            result = client(td)
            assert torch.equal(result["agent", "action"], obs * 2)
            assert result["step"].item() == i
        futures = [
            client.submit(
                TensorDict(
                    {"agent": {"observation": torch.full((4,), float(i))}, "step": torch.tensor(i)}
                )
            )
            for i in range(4)
        ]
        for i, future in enumerate(futures):
            assert torch.equal(
                future.result(timeout=60)["agent", "action"], torch.full((4,), 2.0 * i)
            )
        with pytest.raises(KeyError, match="'agent', 'observation'"):
            client(TensorDict({"agent": {"other": torch.zeros(4)}, "step": torch.tensor(0)}))


@pytest.mark.timeout(120)
def test_a_batched_request_is_one_request_of_the_spec_batch_size():
    spec = TensorDict({"observation": torch.zeros(3, 4)}, batch_size=[3])
    transport = SharedMemoryTransport(
        spec, TensorDict({"action": torch.zeros(3, 4)}, batch_size=[3]), num_slots=4
    )
    client = transport.client()
    model = TensorDictModule(Doubler(), in_keys=["observation"], out_keys=["action"])
    with InferenceServer(model, transport, max_batch_size=4):
        obs = torch.randn(3, 4)
        result = client(TensorDict({"observation": obs}, batch_size=[3]))
        assert result.batch_size == torch.Size([3])
        assert torch.equal(result["action"], obs * 2)
        futures = [
            client.submit(TensorDict({"observation": obs + i}, batch_size=[3])) for i in range(4)
        ]
        for i, future in enumerate(futures):
            assert torch.equal(future.result(timeout=60)["action"], (obs + i) * 2)
        with pytest.raises(ValueError, match="batch size"):
            client(TensorDict({"observation": obs[0]}))
        with pytest.raises(ValueError, match="shape"):
            client(TensorDict({"observation": torch.zeros(3, 5)}, batch_size=[3]))


@pytest.mark.timeout(120)
def test_more_leaves_than_eight_up_to_the_limit():
    n = _core.MAX_LEAVES
    assert n == _core.MAX_SLOT_LEAVES and n > 8
    keys = [f"k{i}" for i in range(n)]

    def total(td):
        return td.set("total", sum(td[k] for k in keys))

    transport = SharedMemoryTransport(
        TensorDict({k: torch.zeros(2) for k in keys}),
        TensorDict({k: torch.zeros(2) for k in keys[: n - 1]} | {"total": torch.zeros(2)}),
        num_slots=2,
    )
    client = transport.client()
    with InferenceServer(total, transport, max_batch_size=2):
        result = client(TensorDict({k: torch.full((2,), float(i)) for i, k in enumerate(keys)}))
        assert torch.equal(result["total"], torch.full((2,), float(sum(range(n)))))
        assert torch.equal(result[keys[5]], torch.full((2,), 5.0))


def test_specs_beyond_the_limit_or_without_tensors_raise_at_construction():
    response = TensorDict({"action": torch.zeros(2)})
    too_many = TensorDict({f"k{i}": torch.zeros(1) for i in range(_core.MAX_LEAVES + 1)})
    with pytest.raises(ValueError, match=f"at most {_core.MAX_LEAVES}.*MAX_LEAVES"):
        SharedMemoryTransport(too_many, response, num_slots=1)
    with pytest.raises(ValueError, match="response_spec has .* at most"):
        SharedMemoryTransport(response, too_many, num_slots=1)
    with pytest.raises(ValueError, match="at least one tensor leaf"):
        SharedMemoryTransport(TensorDict({"nested": {}}), response, num_slots=1)
    with pytest.raises(TypeError, match=r"tensor leaves.*NonTensorData"):
        SharedMemoryTransport(
            TensorDict({"x": torch.zeros(1), "meta": {"tag": NonTensorData("a")}}),
            response,
            num_slots=1,
        )

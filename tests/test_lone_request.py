"""A lone caller's inline call served without staging
(``batchserve.batching.lone_request``, ``WorkerLoop.serve_one``): the
caller gets what the staged path hands back, keys, values, dtypes, devices
and memory ownership alike; what it declines is served as a batch of one."""

from __future__ import annotations

import pytest
import torch
from tensordict import NonTensorData, TensorDict
from tensordict.nn.probabilistic import InteractionType, interaction_type

from batchserve import InferenceServer, ThreadingTransport
from batchserve.batching.collate import INTERACTION_TYPE_KEY
from batchserve.server.loop import WorkerLoop

MAX_CALLS = 2000  # calls at most before one is served inline (see test_inline_calls)


def passthrough(td):
    """A TensorDictModule's way: the input, with the output added."""
    return td.set("action", td["observation"] * 2)


def view_of_input(td):
    """A new key that is a view of the input's memory."""
    return td.set("head", td["observation"][:, :2])


def fresh_output(td):
    """A new TensorDict holding only the model's own tensors."""
    return TensorDict({"action": td["observation"].sum(-1, keepdim=True)},
                      batch_size=td.batch_size)


def nested_output(td):
    out = TensorDict({"action": td["observation"] + 1}, batch_size=td.batch_size)
    out["extra", "score"] = td["observation"].mean(-1)
    return out


def more_batch_dims(td):
    n = td.batch_size[0]
    return TensorDict({"steps": td["observation"][:, :2].clone()}, batch_size=[n, 2])


def interaction_code(td):
    """Writes the exploration mode the forward ran under."""
    mode = interaction_type()
    code = -1 if mode is None else list(InteractionType).index(mode)
    return td.set("mode", torch.full(td.batch_size, code))


def request(i: float) -> TensorDict:
    return TensorDict({"observation": torch.arange(4.0) + i})


class _Counting:
    """Counts the inline calls served as a batch of one (declined by serve_one)."""

    def __init__(self, monkeypatch):
        self.batches_of_one = 0
        serve_inline = WorkerLoop.serve_inline

        def counted(loop, run, batch):
            self.batches_of_one += 1
            return serve_inline(loop, run, batch)

        monkeypatch.setattr(WorkerLoop, "serve_inline", counted)


def next_inline(server, client, td: TensorDict) -> TensorDict:
    """The result of the next call of ``td`` that is served inline."""
    for _ in range(MAX_CALLS):
        before = server.stats()["inline_requests"]
        result = client(td)
        if server.stats()["inline_requests"] > before:
            return result
    pytest.fail(f"no call of {MAX_CALLS} was served inline")


def inline_result(model, make_request, **server_kwargs) -> TensorDict:
    """The result of the first call of this thread that was served inline."""
    transport = ThreadingTransport()
    with InferenceServer(model, transport, **server_kwargs) as server:
        client = transport.client()
        for i in range(MAX_CALLS):
            before = server.stats()["inline_requests"]
            result = client(make_request(i % 3))
            if server.stats()["inline_requests"] > before:
                return result, make_request(i % 3)
    pytest.fail(f"no call of {MAX_CALLS} was served inline")


def staged_result(model, make_request, i: int, **server_kwargs) -> TensorDict:
    """The server thread's result for request ``i`` (after one that teaches the schema)."""
    transport = ThreadingTransport()
    with InferenceServer(model, transport, inline_calls=False, **server_kwargs):
        client = transport.client()
        client(make_request(i))
        return client(make_request(i))


def assert_same_result(a: TensorDict, b: TensorDict) -> None:
    assert a.batch_size == b.batch_size
    assert a.device == b.device
    keys = set(a.keys(include_nested=True, leaves_only=True))
    assert keys == set(b.keys(include_nested=True, leaves_only=True))
    for key in keys:
        x, y = a.get(key), b.get(key)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x, y), key
        else:
            assert x == y, key


CASES = {
    "passthrough": (passthrough, {}),
    "view_of_input": (view_of_input, {}),
    "fresh_output": (fresh_output, {}),
    "nested_output": (nested_output, {}),
    "more_batch_dims": (more_batch_dims, {}),
    "no_version": (passthrough, {"policy_version_key": None}),
    "nested_version": (fresh_output, {"policy_version_key": ("meta", "version")}),
    "output_device": (passthrough, {"output_device": "cpu", "device": "cpu"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_inline_result_is_the_staged_result(case, monkeypatch):
    model, kwargs = CASES[case]
    counting = _Counting(monkeypatch)
    inline, sent = inline_result(model, request, **kwargs)
    assert counting.batches_of_one == 0  # served without staging
    i = int(sent["observation"][0])
    assert_same_result(inline, staged_result(model, request, i, **kwargs))


@pytest.mark.parametrize("model", [passthrough, view_of_input], ids=["passthrough", "view"])
def test_an_inline_result_holds_none_of_the_callers_memory(model):
    transport = ThreadingTransport()
    with InferenceServer(model, transport) as server:
        client = transport.client()
        sent = request(3)
        result = next_inline(server, client, sent)
        kept = result.clone()
        sent["observation"].fill_(-7)  # the caller refills its tensor
    assert_same_result(result, kept)


def test_requests_declaring_a_device_keep_it(monkeypatch):
    def on_cpu(i):
        return TensorDict({"observation": torch.arange(4.0) + i}, device="cpu")

    counting = _Counting(monkeypatch)
    inline, _ = inline_result(passthrough, on_cpu)
    assert counting.batches_of_one == 0
    assert inline.device == torch.device("cpu")
    assert_same_result(inline, staged_result(passthrough, on_cpu, int(inline["observation"][0])))


def test_nested_request_keys_are_served_inline(monkeypatch):
    def nested(i):
        td = TensorDict({"observation": torch.arange(4.0) + i})
        td["state", "hidden"] = torch.ones(2) * i
        return td

    def model(td):
        return td.set("action", td["observation"] + td["state", "hidden"].sum(-1, keepdim=True))

    counting = _Counting(monkeypatch)
    inline, _ = inline_result(model, nested)
    assert counting.batches_of_one == 0
    i = int(inline["observation"][0])
    assert_same_result(inline, staged_result(model, nested, i))


@pytest.mark.parametrize("mode", [InteractionType.DETERMINISTIC, InteractionType.RANDOM])
def test_a_stamped_interaction_type_is_honoured_inline(mode, monkeypatch):
    code = {InteractionType.MODE: 0, InteractionType.MEDIAN: 1, InteractionType.MEAN: 2,
            InteractionType.RANDOM: 3, InteractionType.DETERMINISTIC: 4}[mode]

    def stamped(i):
        return TensorDict({"observation": torch.arange(4.0) + i,
                           INTERACTION_TYPE_KEY: torch.tensor(code)})

    counting = _Counting(monkeypatch)
    inline, _ = inline_result(interaction_code, stamped)
    assert counting.batches_of_one == 0
    assert int(inline["mode"]) == list(InteractionType).index(mode)
    i = int(inline["observation"][0])
    assert_same_result(inline, staged_result(interaction_code, stamped, i))


def test_non_tensor_metadata_is_served_as_a_batch_of_one(monkeypatch):
    def with_metadata(i):
        return TensorDict({"observation": torch.arange(4.0) + i,
                           "env_name": NonTensorData(f"env-{i}")})

    counting = _Counting(monkeypatch)
    inline, sent = inline_result(passthrough, with_metadata)
    assert counting.batches_of_one >= 1  # declined: the staged path stacks metadata
    assert inline["env_name"] == sent["env_name"]
    torch.testing.assert_close(inline["action"], sent["observation"] * 2)


def test_a_negated_view_is_read_by_its_values_inline_and_staged():
    """Its bytes are not its values: inline its leaf goes through torch ops,
    staged it takes the general path (match_schema's RawBytes)."""
    leaf = torch.tensor([3 + 5j, 1 - 2j, 2j, 4 + 0j]).conj().imag  # [-5, 2, -2, -0], negated lazily
    assert leaf.is_neg()
    for inline in (True, False):
        transport = ThreadingTransport()
        with InferenceServer(passthrough, transport, inline_calls=inline) as server:
            client = transport.client()
            client(request(0))  # the schema
            results = [client(TensorDict({"observation": leaf})) for _ in range(20)]
            if inline:
                results.append(next_inline(server, client, TensorDict({"observation": leaf})))
            else:
                assert server.stats()["inline_requests"] == 0
            results.append(client.submit(TensorDict({"observation": leaf})).result(timeout=30))
        for result in results:
            torch.testing.assert_close(result["action"], leaf * 2)
            torch.testing.assert_close(result["observation"], leaf.resolve_neg())


def test_inline_calls_are_counted_like_batches_of_one():
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport) as server:
        client = transport.client()
        for i in range(300):
            client(request(i % 3))
        stats = server.stats()
    assert stats["requests"] == 300
    assert stats["inline_requests"] > 0
    assert stats["batch_size_histogram"][1] == stats["batches"]
    assert stats["fast_path_requests"] == stats["requests"] - 1  # the first taught the schema
    assert stats["p50_forward_ms"] > 0 and stats["p50_server_ms"] > 0
    assert stats["p50_client_gap_ms"] > 0


def test_an_inline_result_carries_the_version_of_its_weights():
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport) as server:
        client = transport.client()
        result = next_inline(server, client, request(0))
        assert int(result["policy_version"]) == server.policy_version
        server._versions.mark_update(41)
        result = next_inline(server, client, request(0))
        assert int(result["policy_version"]) == 41
        result["policy_version"].fill_(0)  # a caller may write to its result
        assert int(next_inline(server, client, request(0))["policy_version"]) == 41


def test_a_schema_replaced_meanwhile_is_served_as_a_batch_of_one():
    """serve_one is offered leaves matched against a schema the transport no
    longer serves: it declines them."""
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport) as server:
        transport.client()(request(0))
        loop = server._loop
        declined = loop.serve_one(None, request(1), (torch.zeros(4),),
                                  transport.schema_id + 1, 0)
    assert declined is None

"""Requests stamped with different interaction types (torchrl's
``PolicyClientModule``) never share a forward; server-time statistics."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn.probabilistic import InteractionType, interaction_type

from batchserve import InferenceServer, ThreadingTransport
from batchserve.batching.collate import INTERACTION_TYPE_KEY, forward_by_interaction
from batchserve.batching.fast_path import StagingBuffer, schema_from_spec

_CODES = {None: -1, InteractionType.MODE: 0, InteractionType.RANDOM: 3,
          InteractionType.DETERMINISTIC: 4}


class ModeRecorder:
    """Answers each row with the code of the interaction type its forward ran
    under, and records each forward's batch size."""

    def __init__(self):
        self.forward_sizes = []

    def __call__(self, td):
        self.forward_sizes.append(td.batch_size[0])
        assert INTERACTION_TYPE_KEY not in td.keys()  # the stamp is the server's, not the model's
        code = _CODES[interaction_type()]
        return TensorDict(
            {"mode": torch.full(td.batch_size, code), "x": td["x"]}, batch_size=td.batch_size
        )


def stamped(x: float, mode) -> TensorDict:
    td = TensorDict({"x": torch.tensor([x])})
    td.set(INTERACTION_TYPE_KEY, torch.tensor(_CODES[mode], dtype=torch.int8))
    return td


def protocol_transport():
    torchrl_server = pytest.importorskip("torchrl.modules.inference_server")
    return torchrl_server.ThreadingTransport()


@pytest.fixture(params=["batchserve", "protocol"])
def any_transport(request):
    return ThreadingTransport() if request.param == "batchserve" else protocol_transport()


@pytest.mark.timeout(60)
def test_mixed_interaction_batch_runs_one_forward_per_type(any_transport):
    modes = [InteractionType.RANDOM, InteractionType.DETERMINISTIC, InteractionType.RANDOM,
             None, InteractionType.MODE, InteractionType.DETERMINISTIC]
    model = ModeRecorder()
    # min_batch_size: the six requests are one collected batch.
    with InferenceServer(model, any_transport, max_batch_size=6, min_batch_size=6,
                         timeout=30) as server:
        futures = [any_transport.submit(stamped(i, mode)) for i, mode in enumerate(modes)]
        results = [f.result(timeout=30) for f in futures]
        stats = server.stats()
    for i, (mode, result) in enumerate(zip(modes, results)):
        assert result["mode"].item() == _CODES[mode]
        assert result["x"].item() == i
    assert sorted(model.forward_sizes) == [1, 1, 2, 2]
    assert stats["interaction_split_batches"] == 1
    assert stats["batches"] == 4 and stats["requests"] == 6 and stats["failed_batches"] == 0


@pytest.mark.timeout(60)
def test_stamped_and_unstamped_requests_do_not_share_a_forward(any_transport):
    model = ModeRecorder()
    with InferenceServer(model, any_transport, max_batch_size=3, min_batch_size=3, timeout=30):
        futures = [
            any_transport.submit(stamped(0, InteractionType.RANDOM)),
            any_transport.submit(TensorDict({"x": torch.tensor([1.0])})),
            any_transport.submit(stamped(2, InteractionType.RANDOM)),
        ]
        results = [f.result(timeout=30) for f in futures]
    assert [r["x"].item() for r in results] == [0, 1, 2]
    assert results[0]["mode"].item() == results[2]["mode"].item() == _CODES[InteractionType.RANDOM]
    assert sorted(model.forward_sizes) == [1, 2]


@pytest.mark.timeout(60)
def test_homogeneous_stamped_batch_is_one_forward(any_transport):
    model = ModeRecorder()
    with InferenceServer(model, any_transport, max_batch_size=4, min_batch_size=4,
                         timeout=30) as server:
        futures = [any_transport.submit(stamped(i, InteractionType.MODE)) for i in range(4)]
        assert all(f.result(timeout=30)["mode"].item() == 0 for f in futures)
        assert server.stats()["interaction_split_batches"] == 0
    assert model.forward_sizes == [4]


@pytest.mark.timeout(60)
def test_request_mixing_types_in_its_rows_fails_alone():
    transport = ThreadingTransport()
    model = ModeRecorder()
    mixed = TensorDict({"x": torch.tensor([[0.0], [0.0]])}, batch_size=[2])
    mixed.set(INTERACTION_TYPE_KEY, torch.tensor([0, 3], dtype=torch.int8))
    plain = TensorDict({"x": torch.tensor([[1.0], [1.0]])}, batch_size=[2])
    plain.set(INTERACTION_TYPE_KEY, torch.tensor([3, 3], dtype=torch.int8))
    with InferenceServer(model, transport, max_batch_size=2, min_batch_size=2, timeout=30):
        bad, good = transport.submit(mixed), transport.submit(plain)
        with pytest.raises(RuntimeError, match="mix"):
            bad.result(timeout=30)
        assert good.result(timeout=30)["mode"].tolist() == [3, 3]


@pytest.mark.timeout(60)
def test_policy_client_modules_under_different_modes_share_a_server():
    pytest.importorskip("torchrl")
    from torchrl.modules.inference_server import PolicyClientModule

    transport = ThreadingTransport()
    model = ModeRecorder()
    with InferenceServer(model, transport, max_batch_size=2, min_batch_size=2, timeout=30):
        explore = PolicyClientModule(transport, interaction_type=InteractionType.RANDOM,
                                     out_keys=["mode"])
        exploit = PolicyClientModule(transport, interaction_type=InteractionType.DETERMINISTIC,
                                     out_keys=["mode"])
        futures = [explore.submit(TensorDict({"x": torch.tensor([0.0])})),
                   exploit.submit(TensorDict({"x": torch.tensor([1.0])}))]
        results = [f.result(timeout=30) for f in futures]
    assert results[0]["mode"].item() == _CODES[InteractionType.RANDOM]
    assert results[1]["mode"].item() == _CODES[InteractionType.DETERMINISTIC]
    assert model.forward_sizes == [1, 1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fast", [True, False])
def test_server_time_stats(fast):
    transport = ThreadingTransport()
    spec = {"request_spec": TensorDict({"x": torch.zeros(1)})} if fast else {}
    with InferenceServer(lambda td: td.clone(), transport, max_batch_size=4, **spec) as server:
        client = transport.client()
        for i in range(5):
            client(TensorDict({"x": torch.tensor([float(i)])}))
        stats = server.stats()
    assert stats["requests"] == 5
    assert (stats["fast_path_requests"] == 5) is fast
    assert 0.0 <= stats["p50_server_ms"] <= stats["p95_server_ms"]
    assert stats["mean_server_ms"] >= 0.0
    # A request's time in the server includes its queue wait.
    assert stats["p50_server_ms"] >= stats["p50_queue_ms"]
    assert stats["p95_server_ms"] >= stats["p95_queue_ms"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fast", [True, False])
def test_client_gap_stats_follow_each_calling_thread(fast):
    transport = ThreadingTransport()
    spec = {"request_spec": TensorDict({"x": torch.zeros(1)})} if fast else {}
    with InferenceServer(lambda td: td.clone(), transport, max_batch_size=4, **spec) as server:
        fresh = server.stats()
        assert math.isnan(fresh["inference_bound_fraction"])
        assert fresh["mean_client_gap_ms"] == 0.0

        def actor():
            client = transport.client()
            for i in range(4):  # one request at a time: a gap before each but the first
                client(TensorDict({"x": torch.tensor([float(i)])}))

        threads = [threading.Thread(target=actor) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = server.stats()
    assert stats["requests"] == 8
    assert 0.0 <= stats["p50_client_gap_ms"]
    assert stats["mean_client_gap_ms"] >= 0.0
    fraction = stats["inference_bound_fraction"]
    assert not math.isnan(fraction) and 0.0 <= fraction <= 1.0


def test_a_torchrl_transport_reports_no_client_gap():
    transport = protocol_transport()
    with InferenceServer(lambda td: td.clone(), transport) as server:
        client = transport.client()
        for i in range(3):
            client(TensorDict({"x": torch.tensor([float(i)])}))
        stats = server.stats()
    assert stats["requests"] == 3
    assert math.isnan(stats["inference_bound_fraction"])


def _staged_stamps(codes: list) -> StagingBuffer:
    """A staging buffer of a stamped schema whose first rows hold ``codes``
    (one row per request, or a list per request for a batched one)."""
    per_row = [c if isinstance(c, list) else [c] for c in codes]
    spec = TensorDict({"x": torch.zeros(1)})
    spec.set(INTERACTION_TYPE_KEY, torch.zeros(len(per_row[0]), dtype=torch.int8))
    buffer = StagingBuffer(schema_from_spec(spec), rows=8, pin=False)
    stamp = buffer.keys.index(INTERACTION_TYPE_KEY)
    buffer.columns[stamp][: len(per_row)] = torch.tensor(per_row, dtype=torch.int8)
    return buffer


def test_a_batch_of_one_stamp_reads_as_its_code():
    assert _staged_stamps([3, 3, 3]).interaction_codes(3) == 3
    assert _staged_stamps([-1, -1]).interaction_codes(2) == -1  # "no type", signed
    assert type(_staged_stamps([4]).interaction_codes(1)) is int
    assert _staged_stamps([0, 0, 7]).interaction_codes(2) == 0  # rows past n are not read


def test_a_batch_of_several_stamps_reads_as_each_row_s_code():
    codes = _staged_stamps([3, 4, 3]).interaction_codes(3)
    assert isinstance(codes, torch.Tensor) and codes.tolist() == [3, 4, 3]
    batched = _staged_stamps([[0, 0], [3, 3]]).interaction_codes(2)  # one code per request
    assert batched.tolist() == [0, 3]
    with pytest.raises(RuntimeError, match="mix"):
        _staged_stamps([[0, 3], [3, 3]]).interaction_codes(2)


def test_one_code_runs_one_forward_under_its_mode():
    model = ModeRecorder()
    batch = TensorDict({"x": torch.zeros(3, 1)}, batch_size=[3])
    output, forwards = forward_by_interaction(model, batch, _CODES[InteractionType.MODE])
    assert forwards == [3] and output["mode"].tolist() == [0, 0, 0]
    output, forwards = forward_by_interaction(model, batch, torch.tensor([3, 4, 3]))
    assert forwards == [2, 1] and output["mode"].tolist() == [3, 4, 3]

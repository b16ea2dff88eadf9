"""Every result reaches the caller that asked for it: id-echo stress."""

from __future__ import annotations

import threading

import pytest
from conftest import echo_model, request

from batchserve import InferenceServer, ThreadingTransport


@pytest.mark.parametrize("threads,per_thread", [(8, 500), (32, 120)])
def test_id_echo_routing_under_many_threads(threads, per_thread):
    transport = ThreadingTransport()
    wrong: list[tuple[int, int]] = []
    counts = [0] * threads
    errors: list[BaseException] = []

    def actor(index: int) -> None:
        client = transport.client()
        try:
            for k in range(per_thread):
                rid = index * 1_000_000 + k
                if k % 5 == 0:  # mix the Future path in
                    got = client.submit(request(rid)).result(timeout=30)["echo"].item()
                else:
                    got = client(request(rid))["echo"].item()
                if got != rid:
                    wrong.append((rid, got))
                counts[index] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    with InferenceServer(echo_model, transport, max_batch_size=16, timeout=0.002) as server:
        workers = [threading.Thread(target=actor, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        stats = server.stats()
    assert not errors
    assert wrong == []
    assert counts == [per_thread] * threads
    assert stats["requests"] == threads * per_thread
    assert max(stats["batch_size_histogram"]) <= 16

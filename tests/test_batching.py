"""The batching policy seen from Python: max/min batch size, deadlines,
settings changed on a running server, statistics."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import BlockingModel, echo_model, echoes, request
from tensordict import lazy_stack

from batchserve import InferenceServer


def recording_collate(sizes):
    def collate(items):
        sizes.append(len(items))
        return lazy_stack(items)

    return collate


@pytest.mark.parametrize("max_batch_size", [1, 4, 7])
def test_max_batch_size_is_never_exceeded(transport, max_batch_size):
    sizes = []
    futures = [transport.submit(request(i)) for i in range(40)]
    with InferenceServer(
        echo_model, transport, max_batch_size=max_batch_size,
        collate_fn=recording_collate(sizes),
    ):
        assert echoes(futures) == list(range(40))
    assert sum(sizes) == 40
    assert max(sizes) == max_batch_size
    assert all(1 <= s <= max_batch_size for s in sizes)


def test_min_batch_size_collects_until_reached(transport):
    sizes = []
    with InferenceServer(
        echo_model, transport, max_batch_size=8, min_batch_size=4, timeout=30,
        collate_fn=recording_collate(sizes),
    ):
        futures = []
        for i in range(4):
            futures.append(transport.submit(request(i)))
        assert echoes(futures) == [0, 1, 2, 3]
    assert sizes == [4]


def test_partial_batch_dispatched_after_timeout(transport):
    """Fewer than min_batch_size requests still go once the deadline passes."""
    sizes = []
    with InferenceServer(
        echo_model, transport, max_batch_size=64, min_batch_size=8, timeout=0.05,
        collate_fn=recording_collate(sizes),
    ):
        futures = [transport.submit(request(i)) for i in range(3)]
        assert echoes(futures) == [0, 1, 2]
    assert sizes == [3]


def test_deadline_counts_from_oldest_request(transport):
    """A request that already waited longer than `timeout` is dispatched at
    once, even though min_batch_size is not reached."""
    future = transport.submit(request(0))
    time.sleep(0.2)  # the request ages in the queue before the server starts
    with InferenceServer(
        echo_model, transport, max_batch_size=64, min_batch_size=1000, timeout=0.1
    ):
        t0 = time.monotonic()
        assert future.result(timeout=10)["echo"].item() == 0
        # Served by the first collection, long before another 0.1 s deadline
        # plus the idle wait could pass; a generous hang guard only.
        assert time.monotonic() - t0 < 10


def test_later_arrivals_do_not_extend_the_deadline(transport):
    """Steady trickle below min_batch_size: every batch still goes out."""
    sizes = []
    with InferenceServer(
        echo_model, transport, max_batch_size=64, min_batch_size=1000, timeout=0.05,
        collate_fn=recording_collate(sizes),
    ):
        futures = []
        for i in range(10):
            futures.append(transport.submit(request(i)))
            time.sleep(0.01)
        assert echoes(futures) == list(range(10))
    assert sum(sizes) == 10
    assert len(sizes) >= 2  # a deadline passed while requests kept arriving


def test_settings_change_on_a_running_server(transport):
    model = BlockingModel()
    model.release.set()
    with InferenceServer(
        model, transport, max_batch_size=2, min_batch_size=1, timeout=30,
    ) as server:
        futures = [transport.submit(request(i)) for i in range(6)]
        for f in futures:
            f.result(timeout=10)
        assert max(model.sizes) <= 2
        # The idle server sleeps in a 30 s wait; new settings wake it.
        server.max_batch_size = 8
        server.min_batch_size = 8
        server.timeout = 60
        assert (server.max_batch_size, server.min_batch_size, server.timeout) == (8, 8, 60)
        model.sizes.clear()
        futures = [transport.submit(request(i)) for i in range(8)]
        for f in futures:
            f.result(timeout=10)
        assert model.sizes == [8]
        # Now a short deadline replaces the 60 s one: a lone request goes out
        # long before the old deadline could pass.
        server.min_batch_size = 1000
        server.timeout = 0.05
        assert transport.submit(request(9)).result(timeout=30)["echo"].item() == 9
        with pytest.raises(ValueError):
            server.max_batch_size = 0


def test_stats_keys_and_accounting(transport):
    n = 8
    with InferenceServer(
        echo_model, transport, max_batch_size=n, min_batch_size=4, timeout=0.5
    ) as server:
        threads = [
            threading.Thread(target=lambda i=i: transport.client()(request(i)))
            for i in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        stats = server.stats()
        for key in (
            "requests", "batches", "requests_per_s", "avg_batch_size",
            "p50_queue_ms", "p95_queue_ms", "p99_queue_ms",
            "p50_forward_ms", "p95_forward_ms", "p99_forward_ms",
            "policy_version", "weight_updates", "batch_size_histogram",
        ):
            assert key in stats
        assert stats["requests"] == n
        assert stats["batches"] >= 1
        assert sum(size * count for size, count in stats["batch_size_histogram"].items()) == n
        assert sum(stats["batch_size_histogram"].values()) == stats["batches"]
        assert stats["avg_batch_size"] == n / stats["batches"]
        assert stats["p99_queue_ms"] >= stats["p50_queue_ms"] >= 0
        assert stats["policy_version"] == 0
        server.stats(reset=True)
        assert server.stats()["requests"] == 0


def test_collect_stats_off(transport):
    with InferenceServer(echo_model, transport, collect_stats=False) as server:
        transport.client()(request(1))
        assert server.stats()["requests"] == 0


def test_unbounded_timeout(transport):
    """timeout=inf: min_batch_size is waited for without a deadline, and a
    shutdown still ends the wait at once."""
    sizes = []
    server = InferenceServer(
        echo_model, transport, max_batch_size=8, min_batch_size=3, timeout=float("inf"),
        collate_fn=recording_collate(sizes),
    ).start()
    futures = [transport.submit(request(i)) for i in range(3)]
    assert echoes(futures) == [0, 1, 2]
    lonely = transport.submit(request(3))
    server.shutdown(timeout=10)
    assert not server.is_alive
    with pytest.raises(RuntimeError):
        lonely.result(timeout=10)
    assert sizes == [3]

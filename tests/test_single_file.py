"""ThreadingTransport(single_file=True): a blocking caller passes its batch's
wake-up on at its next call (csrc/core/single_file.h). Every caller still
gets its own result, and callers that stop calling (wait on an event or a
barrier, end, use futures) strand no one: the server wakes a caller the one
before did not wake in time. Behaviour only; the speed is in
docs/benchmarks.md."""

from __future__ import annotations

import threading

import pytest
import torch
from tensordict import TensorDict

from batchserve import InferenceServer, ThreadingTransport

pytestmark = pytest.mark.timeout(180)


def request(i: int) -> TensorDict:
    return TensorDict({"observation": torch.full((4,), float(i)), "id": torch.tensor(i)})


def double_model(td):
    """action = 2 * observation[:2]; the request's id comes back as "id"."""
    return TensorDict({"action": td["observation"][:, :2] * 2, "id": td["id"].clone()},
                      batch_size=td.batch_size)


def check(result: TensorDict, i: int) -> None:
    assert result["id"].item() == i
    assert torch.equal(result["action"], torch.full((2,), 2.0 * i))


def run_threads(targets) -> list[BaseException]:
    """Runs each (function, args) on a thread of its own; the errors raised."""
    errors: list[BaseException] = []

    def guarded(fn, args):
        try:
            fn(*args)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=target) for target in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    return errors


def test_single_file_is_off_by_default_and_reported():
    assert ThreadingTransport().single_file is False
    assert ThreadingTransport(single_file=True).single_file is True


def own_stack(items):
    """A collate_fn of the user's own: the server takes the general path."""
    return torch.stack(items)


@pytest.mark.parametrize("fast_path", [True, False])
def test_every_thread_gets_its_own_results(fast_path):
    transport = ThreadingTransport(single_file=True)
    client = transport.client()
    collate = {} if fast_path else {"collate_fn": own_stack}
    with InferenceServer(double_model, transport, max_batch_size=8, timeout=0.002,
                         **collate) as server:

        def calls(base, futures):
            for i in range(base, base + 150):
                if futures and i % 3 == 0:
                    check(client.submit(request(i)).result(timeout=60), i)
                else:
                    check(client(request(i)), i)

        errors = run_threads([(calls, (1000 * t, t % 4 == 3)) for t in range(12)])
        stats = server.stats()
    assert not errors, errors[0]
    assert stats["requests"] >= 12 * 150
    assert (stats["fast_path_requests"] > 0) is fast_path


def test_threads_that_stop_calling_strand_no_one():
    # One thread parks on an event holding the wake-up it was handed last;
    # others end after a few calls, or call through futures; the rest go on.
    transport = ThreadingTransport(single_file=True)
    client = transport.client()
    stop = threading.Event()

    def idler(base):
        for i in range(base, base + 30):
            check(client(request(i)), i)
        stop.wait(60)

    def worker(base, n, futures):
        for i in range(base, base + n):
            if futures:
                check(client.submit(request(i)).result(timeout=60), i)
            else:
                check(client(request(i)), i)
        if base == 0:  # the longest worker: the idlers may go now
            stop.set()

    with InferenceServer(double_model, transport, max_batch_size=8, timeout=0.002):
        errors = run_threads(
            [(idler, (100_000 * (t + 1),)) for t in range(2)]
            + [(worker, (1000 * t, 200 - 30 * t, t % 2 == 1)) for t in range(5)]
        )
    assert not errors, errors[0]


def test_callers_waiting_on_each_other_between_calls_go_on():
    # Each round every thread calls, then waits at a barrier for all the
    # others: a thread holding the next caller's wake-up waits for that very
    # caller there, and only the server's bound wakes it.
    transport = ThreadingTransport(single_file=True)
    client = transport.client()
    threads, rounds = 6, 20
    barrier = threading.Barrier(threads)

    def actor(t):
        for r in range(rounds):
            i = 1000 * t + r
            check(client(request(i)), i)
            barrier.wait(60)

    with InferenceServer(double_model, transport, max_batch_size=8, timeout=0.002):
        errors = run_threads([(actor, (t,)) for t in range(threads)])
    assert not errors, errors[0]


def test_a_lone_caller_is_served_inline_as_by_default():
    transport = ThreadingTransport(single_file=True)
    client = transport.client()
    with InferenceServer(double_model, transport, max_batch_size=8) as server:
        for i in range(50):
            check(client(request(i)), i)
        stats = server.stats()
    assert stats["requests"] == 50

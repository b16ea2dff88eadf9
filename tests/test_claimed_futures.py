"""A lone caller's submitted request, claimed by its caller when it waits
for the result (``RequestQueue::serve_claimed``): served on the caller's
thread as a blocking call is inline, from the bytes copied at submission;
the future ends as the server would end it (result, exception, callbacks,
other waiters). Which side serves a request is a race (the caller's claim
against the server's take): every test holds whichever side won, and the
ones about claims repeat until a claim happened."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import wait

import pytest
import torch
from tensordict import NonTensorData, TensorDict
from tensordict.nn import TensorDictModule
from tensordict.nn.probabilistic import InteractionType
from torchrl.modules.inference_server import PolicyClientModule

from batchserve import InferenceServer, ServerClosedError, ThreadingTransport
from batchserve.batching.lone_request import LoneRequests

MAX_CALLS = 2000  # submissions at most before one is claimed (see test_inline_calls)


def passthrough(td):
    return td.set("action", td["observation"] * 2)


def request(i: float) -> TensorDict:
    return TensorDict({"observation": torch.arange(4.0) + i})


def expected(i: float) -> torch.Tensor:
    return (torch.arange(4.0) + i) * 2


class Claims:
    """Counts the claimed requests served without staging (their leaves are
    made from the submission's bytes)."""

    def __init__(self, monkeypatch):
        self.count = 0
        copied_leaves = LoneRequests.copied_leaves

        def counted(lone, copies):
            self.count += 1
            return copied_leaves(lone, copies)

        monkeypatch.setattr(LoneRequests, "copied_leaves", counted)


@pytest.fixture
def claims(monkeypatch):
    return Claims(monkeypatch)


def next_claimed(claims: Claims, wait_for_result, make_future):
    """``wait_for_result(future)`` for the next future ``make_future(i)``
    that its caller served itself; its index, the future and what
    ``wait_for_result`` returned."""
    for i in range(MAX_CALLS):
        before = claims.count
        future = make_future(i)
        out = wait_for_result(future)
        if claims.count > before:
            return i, future, out
    pytest.fail(f"no future of {MAX_CALLS} was served by its caller")


def test_a_claimed_request_waited_in_the_queue_until_its_claim(claims):
    """stats(): a claimed request's queue wait runs from its submission to
    its claim (when its caller waits for it), not 0 as a blocking caller's
    inline call's, and no longer than the caller's own span around it.

    The caller waits for the result at once: a request left longer in the
    queue is the server's to take (it wakes within the quiet bound, or
    spins for a caller it expects back), so a wait of the test's own
    between submit() and result() would leave no claim to see."""
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport) as server:
        client = transport.client()
        spans = []

        def submitted(i):
            server.stats(reset=True)
            spans.append(time.perf_counter_ns())
            return client.submit(request(i))

        def result_and_span(future):
            out = future.result()
            spans[-1] = time.perf_counter_ns() - spans[-1]
            return out

        i, _, out = next_claimed(claims, result_and_span, submitted)
        stats = server.stats()
    torch.testing.assert_close(out["action"], expected(i))
    assert stats["requests"] == stats["inline_requests"] == 1
    assert 0.0 < stats["p50_queue_ms"] <= spans[-1] / 1e6


def test_a_lone_submitter_serves_its_own_request(claims):
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport) as server:
        client = transport.client()
        served_by_server = 0
        for i in range(50):  # either side serves each: the results agree
            before = server.stats()["inline_requests"]
            result = client.submit(request(i)).result()
            served_by_server += server.stats()["inline_requests"] == before
            assert torch.equal(result["action"], expected(i))
            assert torch.equal(result["observation"], torch.arange(4.0) + i)
            assert int(result["policy_version"]) == 0
        i, future, result = next_claimed(claims, lambda f: f.result(),
                                         lambda i: client.submit(request(i)))
        assert torch.equal(result["action"], expected(i))
        assert future.done() and not future.cancelled() and future.exception() is None
        assert served_by_server > 0  # the first ones: before the caller was known alone


def test_a_claimed_request_is_its_submission_not_the_tensors_refilled_since(claims):
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport):
        client = transport.client()

        def submit_then_refill(i):
            td = request(i)
            future = client.submit(td)
            td["observation"].fill_(-1.0)  # the caller reuses its buffer
            return future

        i, _, result = next_claimed(claims, lambda f: f.result(), submit_then_refill)
        assert torch.equal(result["action"], expected(i))
        assert torch.equal(result["observation"], torch.arange(4.0) + i)


def test_a_claimed_result_holds_none_of_the_submissions_memory(claims):
    transport = ThreadingTransport()
    with InferenceServer(lambda td: td, transport):
        client = transport.client()
        _, _, first = next_claimed(claims, lambda f: f.result(),
                                   lambda i: client.submit(request(1)))
        _, _, second = next_claimed(claims, lambda f: f.result(),
                                    lambda i: client.submit(request(2)))
        first["observation"].fill_(7.0)
        assert torch.equal(second["observation"], torch.arange(4.0) + 2)
        assert first["observation"].data_ptr() != second["observation"].data_ptr()


def test_callbacks_of_a_claimed_future_run_once_and_may_call_the_server(claims):
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport):
        client = transport.client()
        caller = threading.get_ident()
        calls = []

        def add_callback(i):
            future = client.submit(request(i))

            def callback(done):
                # On the caller's thread (it claimed the request, or the
                # request had ended), a callback may call the server: the
                # claim has let the server go.
                nested = client(request(100)) if threading.get_ident() == caller else None
                calls.append((done, nested))

            future.add_done_callback(callback)
            return future

        _, future, result = next_claimed(claims, lambda f: f.result(), add_callback)
        # (An earlier future's callback may still be running on the server's thread.)
        mine = [nested for done, nested in calls if done is future]
        assert len(mine) == 1  # once
        assert torch.equal(mine[0]["action"], expected(100))
        assert torch.equal(future.result()["action"], result["action"])


def test_a_model_error_ends_a_claimed_future_with_it(claims):
    def failing(td):
        if float(td["observation"][0, 0]) >= 5:
            raise ValueError("bad observation")
        return passthrough(td)

    transport = ThreadingTransport()
    with InferenceServer(failing, transport):
        client = transport.client()
        for _ in range(20):
            client.submit(request(0)).result()  # the server learns the caller is alone
        _, future, exc = next_claimed(claims, lambda f: f.exception(),
                                      lambda i: client.submit(request(5)))
        assert isinstance(exc, ValueError) and "bad observation" in str(exc)
        with pytest.raises(ValueError, match="bad observation"):
            future.result()
        # The server goes on serving.
        assert torch.equal(client.submit(request(1)).result()["action"], expected(1))


def test_other_waiters_of_a_claimed_future_get_its_result(claims):
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport):
        client = transport.client()
        futures, seen = queue.Queue(), queue.Queue()

        def second_waiter():
            # Waits as concurrent.futures.wait does (a waiter on the future's
            # condition): a result(timeout) here would wake the server at once.
            while (future := futures.get()) is not None:
                seen.put(wait([future], timeout=60).done.pop().result())

        # Started once, before the submissions: a thread started after one
        # can take long enough (a loaded machine) for the idle server's tick
        # to find the request before its caller claims it.
        waiter = threading.Thread(target=second_waiter)
        waiter.start()
        try:
            def with_a_second_waiter(i):
                future = client.submit(request(i))
                futures.put(future)
                return future

            _, future, (result, second) = next_claimed(
                claims, lambda f: (f.result(), seen.get(timeout=60)), with_a_second_waiter)
            assert second is result
            done, _ = wait([future], timeout=0)
            assert done == {future}
        finally:
            futures.put(None)
            waiter.join(timeout=60)
        assert not waiter.is_alive()


def test_requests_with_metadata_are_claimed_through_a_batch_of_one():
    def tagged(td):
        return td.set("action", td["observation"] * 2)

    transport = ThreadingTransport()
    with InferenceServer(tagged, transport) as server:
        client = transport.client()

        def with_tag(i):
            td = request(i)
            td["tag"] = NonTensorData("a tag")
            return client.submit(td)

        for i in range(MAX_CALLS):
            before = server.stats()["inline_requests"]
            result = with_tag(i).result()
            assert torch.equal(result["action"], expected(i))
            assert result["tag"] == "a tag"
            if server.stats()["inline_requests"] > before:
                break
        else:
            pytest.fail(f"no future of {MAX_CALLS} was served by its caller")
        assert server.stats()["fast_path_requests"] > 0


def test_no_claims_when_inline_calls_are_off():
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport, inline_calls=False) as server:
        client = transport.client()
        for i in range(200):
            assert torch.equal(client.submit(request(i)).result()["action"], expected(i))
        assert server.stats()["inline_requests"] == 0


def test_a_future_waited_on_after_shutdown_is_not_claimed():
    calls = []

    def counting(td):
        calls.append(1)
        return passthrough(td)

    transport = ThreadingTransport()
    server = InferenceServer(counting, transport).start()
    client = transport.client()
    for i in range(20):
        client.submit(request(i)).result()
    future = client.submit(request(1))
    server.shutdown()
    served = len(calls)
    try:
        result = future.result(timeout=60)  # served before the shutdown, or failed by it
    except ServerClosedError:
        pass
    else:
        assert torch.equal(result["action"], expected(1))
    assert len(calls) == served  # nothing ran the model after the shutdown
    with pytest.raises(ServerClosedError):
        client.submit(request(0)).result()


def test_policy_client_module_at_one_actor_is_served_by_its_caller(claims):
    """torchrl's road: PolicyClientModule calls submit(td).result() with a
    done callback, under a stamped interaction type."""
    policy = TensorDictModule(torch.nn.Linear(4, 2), in_keys=["observation"],
                              out_keys=["action"])
    transport = ThreadingTransport()
    with InferenceServer(policy, transport) as server:
        remote = PolicyClientModule(transport, interaction_type=InteractionType.DETERMINISTIC,
                                    max_inflight=1)
        i, _, result = next_claimed(claims, lambda td: td,
                                    lambda i: remote(request(i)))
        with torch.no_grad():
            want = policy(request(i).unsqueeze(0))["action"][0]
        assert torch.allclose(result["action"], want)
        assert server.stats()["fast_path_requests"] > 0


@pytest.mark.parametrize("wait_by", ["callback", "futures_wait", "done_polling", "timeout",
                                     "other_thread", "dropped"])
def test_a_future_nobody_claims_is_served_all_the_same(claims, wait_by):
    """Once its caller claims its requests, a submission no longer wakes the
    idle server (a quiet push): the server wakes by itself within the
    batching timeout, and a caller that waits without claiming (a timeout,
    another thread, polling done()) wakes it at once."""
    transport = ThreadingTransport()
    with InferenceServer(passthrough, transport, timeout=0.001) as server:
        client = transport.client()
        next_claimed(claims, lambda f: f.result(), lambda i: client.submit(request(i)))
        future = client.submit(request(3))
        if wait_by == "callback":
            ended = threading.Event()
            future.add_done_callback(lambda _: ended.set())
            assert ended.wait(timeout=60)
        elif wait_by == "futures_wait":
            done, _ = wait([future], timeout=60)
            assert done == {future}
        elif wait_by == "done_polling":
            ended = threading.Event()
            while not future.done():
                ended.wait(0.0001)
        elif wait_by == "timeout":
            future.result(timeout=60)
        elif wait_by == "other_thread":
            waiter = threading.Thread(target=future.result)
            waiter.start()
            waiter.join(timeout=60)
            assert not waiter.is_alive()
        else:
            served = server.stats()["requests"]
            del future
            while server.stats()["requests"] == served:  # served, its result dropped
                threading.Event().wait(0.001)
            future = None
        if future is not None:
            assert torch.equal(future.result(timeout=60)["action"], expected(3))

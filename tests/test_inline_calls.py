"""Inline calls: a lone caller that finds the server idle serves its own
request on its own thread (``inline_calls``, ``csrc/core/inline_gate.h``);
everything else is served by the server as before."""

from __future__ import annotations

import threading

import pytest
import torch
from tensordict import TensorDict

from batchserve import InferenceServer, ThreadingTransport, _core

# Calls a lone caller makes at most before one of them is served inline:
# the server must first learn the schema and reach its idle wait.
MAX_CALLS = 2000


class ThreadRecorder(torch.nn.Module):
    """Doubles the observation into "action" and records the thread and the
    grad mode of each forward; raises `fail` (once) when set."""

    def __init__(self):
        super().__init__()
        self.threads: list[int] = []
        self.grad_modes: list[bool] = []
        self.fail: BaseException | None = None

    def forward(self, td):
        self.threads.append(threading.get_ident())
        self.grad_modes.append(torch.is_grad_enabled())
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return td.set("action", td["observation"] * 2)


def obs(i: float) -> TensorDict:
    return TensorDict({"observation": torch.full((3,), float(i))})


def call_until_inline(server, client, model: ThreadRecorder) -> TensorDict:
    """Calls until a call is served inline (on this thread); returns its result."""
    me = threading.get_ident()
    for i in range(MAX_CALLS):
        before = server.stats()["inline_requests"]
        result = client(obs(i))
        torch.testing.assert_close(result["action"], torch.full((3,), 2.0 * i))
        if server.stats()["inline_requests"] > before:
            assert model.threads[-1] == me
            return result
    pytest.fail(f"no call of {MAX_CALLS} was served inline")


@pytest.fixture
def inline_served():
    """(model, server, client) of a running server whose lone caller (this
    thread) was just served inline."""
    model = ThreadRecorder()
    transport = ThreadingTransport()
    with InferenceServer(model, transport) as server:
        client = transport.client()
        call_until_inline(server, client, model)
        yield model, server, client


def test_a_lone_caller_is_served_on_its_own_thread():
    model = ThreadRecorder()
    transport = ThreadingTransport()
    with InferenceServer(model, transport, max_batch_size=8) as server:
        client = transport.client()
        result = call_until_inline(server, client, model)
        assert set(result.keys()) == {"observation", "action", "policy_version"}
        assert result.batch_size == torch.Size([])
        stats = server.stats()
    assert model.threads[0] != threading.get_ident()  # the first taught the schema
    assert stats["inline_requests"] >= 1
    assert stats["requests"] == stats["batches"] == len(model.threads)
    assert stats["fast_path_requests"] == stats["requests"] - 1


def test_an_inline_call_waits_in_no_queue(inline_served):
    """stats(): an inline call is counted as a batch of one whose queue wait
    is 0 (dispatched as it matched) and whose server time is measured."""
    model, server, client = inline_served
    for i in range(MAX_CALLS):
        server.stats(reset=True)
        client(obs(i))
        stats = server.stats()
        if stats["requests"] == stats["inline_requests"] == 1:
            break
    else:
        pytest.fail(f"no call of {MAX_CALLS} was served inline")
    assert stats["batches"] == 1 and stats["batch_size_histogram"] == {1: 1}
    assert stats["p50_queue_ms"] == stats["p99_queue_ms"] == 0.0
    # (a server_ms of the call before may land after the reset: its hand-back's)
    assert stats["p50_forward_ms"] > 0 and stats["p50_server_ms"] > 0


def test_an_inline_result_owns_its_memory(inline_served):
    """The result does not share memory with the request or staging."""
    model, server, client = inline_served
    sent = obs(5)
    result = client(sent)
    kept = result.clone()
    sent["observation"].fill_(-1)
    for i in range(20):
        client(obs(100 + i))
    torch.testing.assert_close(result["observation"], kept["observation"])
    torch.testing.assert_close(result["action"], kept["action"])


@pytest.mark.parametrize(
    "server_kwargs, call_kwargs",
    [({"inline_calls": False}, {}), ({}, {"timeout": 30})],
    ids=["inline_calls_false", "call_with_a_timeout"],
)
def test_every_forward_stays_on_the_server(server_kwargs, call_kwargs):
    """inline_calls=False, or a call with a timeout (it could not leave its
    own forward when the timeout passes): never served inline."""
    model = ThreadRecorder()
    transport = ThreadingTransport()
    with InferenceServer(model, transport, **server_kwargs) as server:
        client = transport.client()
        for i in range(50):
            client(obs(i), **call_kwargs)
        assert server.stats()["inline_requests"] == 0
    assert threading.get_ident() not in model.threads


def test_an_inline_forward_that_raises_fails_that_call_only(inline_served):
    model, server, client = inline_served
    model.fail = ValueError("bad forward")
    with pytest.raises(ValueError, match="bad forward"):
        client(obs(1))
    assert model.fail is None  # it was that call's forward, wherever it ran
    result = client(obs(2))
    torch.testing.assert_close(result["action"], torch.full((3,), 4.0))
    assert server.stats()["failed_batches"] == 1


@pytest.mark.parametrize("caller_grad", [True, False], ids=["grad_enabled", "no_grad"])
def test_an_inline_forward_runs_without_grad_and_leaves_the_callers_mode(inline_served,
                                                                         caller_grad):
    """As on the server's thread, the model runs with grad off; the
    caller's grad mode is as it was after the call, after a failed one too."""
    model, server, client = inline_served
    me = threading.get_ident()
    with torch.set_grad_enabled(caller_grad):
        for i in range(MAX_CALLS):
            client(obs(i))
            assert torch.is_grad_enabled() is caller_grad
            if model.threads[-1] == me:
                break
        else:
            pytest.fail("no call was served inline")
        assert model.grad_modes[-1] is False
        model.fail = ValueError("bad forward")
        with pytest.raises(ValueError, match="bad forward"):
            client(obs(1))
        assert torch.is_grad_enabled() is caller_grad
    assert not any(model.grad_modes)  # no forward, wherever it ran, had grad on


def test_a_keyboard_interrupt_in_an_inline_forward_reaches_the_caller(inline_served):
    model, server, client = inline_served
    # The next call is inline or not; only an inline one raises
    # KeyboardInterrupt itself (the server turns it into an error and
    # stops). Retry until an interrupt was raised inline.
    me = threading.get_ident()
    for _ in range(MAX_CALLS):
        model.fail = KeyboardInterrupt()
        try:
            client(obs(1))
        except KeyboardInterrupt:
            assert model.threads[-1] == me  # its forward ran on this thread
            break
        except Exception:  # served by the worker, which stopped: not this case
            pytest.skip("the interrupt hit the server's thread")
    else:
        pytest.fail("no inline interrupt")
    result = client(obs(3))  # the server serves on
    torch.testing.assert_close(result["action"], torch.full((3,), 6.0))


def test_callers_on_many_threads_get_their_own_results():
    model = ThreadRecorder()
    transport = ThreadingTransport()
    errors: list[BaseException] = []

    def actor(k: int) -> None:
        client = transport.client()
        try:
            for i in range(200):
                value = k * 1000 + i
                result = client(obs(value))
                expected = torch.full((3,), 2.0 * value)
                if not torch.equal(result["action"], expected):
                    errors.append(AssertionError(f"{k}: {result['action']} != {expected}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with InferenceServer(model, transport, max_batch_size=8) as server:
        threads = [threading.Thread(target=actor, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = server.stats()
    assert not errors, errors[:3]
    assert stats["requests"] == 6 * 200


def test_after_shutdown_a_call_raises_as_without_inline_calls():
    errors = {}
    for inline in (True, False):
        transport = ThreadingTransport()
        model = ThreadRecorder()
        server = InferenceServer(model, transport, inline_calls=inline).start()
        client = transport.client()
        for i in range(20):
            client(obs(i))
        server.shutdown()
        with pytest.raises(Exception) as raised:
            client(obs(0))
        errors[inline] = (type(raised.value), str(raised.value))
    assert errors[True] == errors[False]


def test_the_runner_does_not_keep_the_server_alive():
    import gc
    import weakref

    transport = ThreadingTransport()
    server = InferenceServer(ThreadRecorder(), transport).start()
    transport.client()(obs(1))
    server.shutdown()
    assert not transport.request_queue.inline_runner_set
    ref = weakref.ref(server)
    del server
    gc.collect()
    assert ref() is None


def test_a_queue_without_a_server_loop_serves_no_inline_call():
    queue = _core.RequestQueue(8)
    assert not queue.inline_runner_set


class _CountingPolls:
    """A weight_sync receiver (set up already) with nothing to send: counts
    the server's polls."""

    initialized_on_receiver = True
    synchronized_on_receiver = True

    def __init__(self):
        self.polls = 0
        self.polled_often = threading.Event()

    def receive(self, timeout=None):
        self.polls += 1
        if self.polls >= 20:
            self.polled_often.set()
        return None


def test_an_idle_server_polls_weight_sync_every_timeout():
    weights = _CountingPolls()
    with InferenceServer(ThreadRecorder(), ThreadingTransport(), timeout=0.001,
                         weight_sync=weights):
        assert weights.polled_often.wait(30)


@pytest.mark.parametrize("wake_for", [None, "weight_sync", "shutdown_event"])
def test_an_idle_server_waits_timeout_only_when_it_has_something_to_poll(wake_for):
    """With weight_sync or a shutdown_event, an idle server wakes every
    `timeout` to look at them; with neither, every IDLE_WAIT_S (a request,
    a settings change or a shutdown still wake it at once)."""
    from batchserve.server.server import IDLE_WAIT_S

    kwargs = {"weight_sync": _CountingPolls()} if wake_for == "weight_sync" else (
        {"shutdown_event": threading.Event()} if wake_for == "shutdown_event" else {})
    server = InferenceServer(ThreadRecorder(), ThreadingTransport(), timeout=0.001, **kwargs)
    configured = []
    server._batches.configure = lambda *args: configured.append(args)
    server.timeout = 0.002  # stores the settings again
    assert configured == [(server.max_batch_size, server.min_batch_size, 0.002,
                           0.002 if wake_for else IDLE_WAIT_S)]


def test_a_server_taking_the_transport_over_drops_the_earlier_runner():
    """Server B (inline_calls=False) takes over A's transport: A's runner
    must not serve B's callers, before or after A stops."""
    transport = ThreadingTransport()
    model_a, model_b = ThreadRecorder(), ThreadRecorder()
    server_a = InferenceServer(model_a, transport).start()
    client = transport.client()
    call_until_inline(server_a, client, model_a)
    server_b = InferenceServer(model_b, transport, inline_calls=False).start()
    try:
        assert not transport.request_queue.inline_runner_set
        server_a.shutdown()
        calls_on_a = len(model_a.threads)
        for i in range(40):
            result = client(obs(i))
            torch.testing.assert_close(result["action"], torch.full((3,), 2.0 * i))
        assert len(model_a.threads) == calls_on_a
        assert threading.get_ident() not in model_b.threads
        assert server_b.stats()["inline_requests"] == 0
    finally:
        server_b.shutdown()


def test_a_shutdown_from_an_inline_forward_does_not_wait_for_itself():
    """The model calls shutdown(timeout=None) during an inline forward: the
    worker waits for that forward, so shutdown must not wait for the worker."""
    model = ThreadRecorder()
    transport = ThreadingTransport()
    server = InferenceServer(model, transport).start()
    client = transport.client()
    call_until_inline(server, client, model)
    shut = threading.Event()
    inner = model.forward

    def forward(td):
        if threading.get_ident() == me and not shut.is_set():
            shut.set()
            server.shutdown(timeout=None)  # from inside the caller's own forward
        return inner(td)

    me = threading.get_ident()
    model.forward = forward
    try:
        for i in range(MAX_CALLS):
            before = server.stats()["inline_requests"]
            try:
                client(obs(i))
            except Exception:
                break  # the server is shut down
            if shut.is_set():
                assert server.stats()["inline_requests"] > before
                break
        assert shut.is_set()
    finally:
        model.forward = inner
        server.shutdown()
    assert not server.is_alive

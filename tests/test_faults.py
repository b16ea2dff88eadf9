"""Design §4: every accepted request ends exactly once; nothing hangs. Bad
model outputs and requests, weight-sync set-up, exits and transports that
fail. The rows of the fault matrix (docs/guarantees.md) are in
test_guarantees.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import BlockingModel, echo_model, echo_shared_memory_transport, request
from tensordict import TensorDict

from batchserve import (
    InferenceServer,
    ServerClosedError,
    SharedMemoryTransport,
    ThreadingTransport,
)


def test_shutdown_called_by_the_model_lets_its_forward_finish(transport):
    def model(td):
        if (td["id"] == 7).any():
            server.shutdown()  # on the worker thread: it cannot wait for itself
        return echo_model(td)

    server = InferenceServer(model, transport, max_batch_size=1).start()
    client = transport.client()
    assert client(request(7), timeout=30)["echo"].item() == 7  # its caller is served
    with pytest.raises(ServerClosedError):
        client(request(8), timeout=30)
    server._last_worker.join(30)
    assert not server._last_worker.is_alive()
    with server:  # and it starts again
        assert client(request(9), timeout=30)["echo"].item() == 9


def test_wrong_batch_size_from_model_is_a_clear_error(transport):
    def model(td):
        return TensorDict({"echo": td["id"][:1].clone()}, batch_size=[1])

    with InferenceServer(model, transport, max_batch_size=4, min_batch_size=2, timeout=5):
        futures = [transport.submit(request(i)) for i in range(2)]
        for f in futures:
            with pytest.raises(RuntimeError, match="batch size"):
                f.result(timeout=10)


def test_non_tensordict_model_output_is_a_clear_error(transport):
    with InferenceServer(lambda td: "nope", transport) as server:
        with pytest.raises(TypeError, match="str"):
            transport.client()(request(0))
        assert server.is_alive


def test_non_tensordict_request_fails_alone(transport):
    with InferenceServer(echo_model, transport, max_batch_size=4, min_batch_size=2, timeout=5):
        bad = transport.submit({"id": 1})
        good = transport.submit(request(2))
        with pytest.raises(TypeError, match="dict"):
            bad.result(timeout=10)
        assert good.result(timeout=10)["echo"].item() == 2


class _FailingSetup:
    initialized_on_receiver = False
    synchronized_on_receiver = False

    def init_on_receiver(self, *, model_id, model=None, worker_idx=0):
        raise OSError("cannot reach the trainer")

    def connect(self, *, worker_idx=0):
        pass

    def receive(self, timeout=None):
        return None


def test_failing_weight_sync_setup_makes_start_raise(transport):
    server = InferenceServer(echo_model, transport, weight_sync=_FailingSetup())
    with pytest.raises(RuntimeError, match="cannot reach the trainer"):
        server.start()
    assert not server.is_alive


def test_process_exits_promptly_with_a_running_server():
    script = textwrap.dedent(
        """
        import threading, torch
        from tensordict import TensorDict
        from batchserve import InferenceServer, ThreadingTransport

        never = threading.Event()

        def stuck_model(td):
            never.wait()

        transport = ThreadingTransport()
        server = InferenceServer(stuck_model, transport).start()

        def caller():
            try:
                transport.client()(TensorDict({"x": torch.zeros(1)}))
                outcome = "served"
            except Exception as exc:
                outcome = type(exc).__name__
            print("caller:", outcome, flush=True)

        for _ in range(3):
            threading.Thread(target=caller).start()  # non-daemon callers
        print("main done", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ServerClosedError") == 3, done.stdout


def test_restart_waits_for_a_worker_that_overran_its_shutdown(transport):
    model = BlockingModel()
    server = InferenceServer(model, transport).start()
    transport.submit(request(0))
    assert model.entered.wait(10)
    server.shutdown(timeout=0.05)  # the forward is still running
    with pytest.raises(RuntimeError, match="already running"):
        server.start()
    model.release.set()
    server.shutdown(timeout=None)  # waits for the old worker
    with server:
        assert transport.client()(request(1))["echo"].item() == 1


@pytest.mark.parametrize("make_transport", [ThreadingTransport, echo_shared_memory_transport],
                         ids=["threads", "shared_memory"])
def test_a_new_server_keeps_the_transport_an_old_one_let_go(make_transport):
    transport = make_transport()
    client = transport.client()
    model = BlockingModel()
    old = InferenceServer(model, transport, max_batch_size=1).start()
    stuck = client.submit(request(0))
    assert model.entered.wait(30)
    old.shutdown(timeout=0.05)  # overdue: its worker is still in the forward
    with pytest.raises(ServerClosedError):
        stuck.result(timeout=30)
    with InferenceServer(echo_model, transport, max_batch_size=4) as new:
        assert client(request(1), timeout=30)["echo"].item() == 1
        model.release.set()
        old._last_worker.join(30)  # the old worker ends: it leaves the queue open
        old.shutdown()  # and so does shutting the old server down again
        assert client(request(2), timeout=30)["echo"].item() == 2
        assert new.is_alive
    with pytest.raises(ServerClosedError):  # the new one's shutdown does close it
        client(request(3), timeout=30)
    if isinstance(transport, SharedMemoryTransport):
        transport.close()


class _SlowConnect(_FailingSetup):
    """connect() waits for the trainer, as torchrl's receivers do."""

    def __init__(self, fail: bool):
        self.fail = fail
        self.trainer_ready = threading.Event()

    def init_on_receiver(self, *, model_id, model=None, worker_idx=0):
        self.initialized_on_receiver = True

    def connect(self, *, worker_idx=0):
        assert self.trainer_ready.wait(30)
        if self.fail:
            raise ConnectionError("trainer went away")
        self.synchronized_on_receiver = True


def test_start_does_not_wait_forever_for_the_trainer(transport):
    ws = _SlowConnect(fail=False)
    server = InferenceServer(echo_model, transport, weight_sync=ws)
    server.start(setup_timeout=0.05)  # returns while connect() still waits
    assert server.is_alive
    queued = transport.submit(request(1))
    ws.trainer_ready.set()  # e.g. the trainer connects after start()
    assert queued.result(timeout=10)["echo"].item() == 1
    server.shutdown()


def test_a_late_weight_sync_setup_failure_fails_waiting_requests(transport):
    ws = _SlowConnect(fail=True)
    server = InferenceServer(echo_model, transport, weight_sync=ws)
    server.start(setup_timeout=0.05)
    queued = transport.submit(request(1))
    ws.trainer_ready.set()
    with pytest.raises(ServerClosedError, match="trainer went away"):
        queued.result(timeout=10)
    server._worker.join(10)
    assert not server.is_alive
    with pytest.raises(ServerClosedError):
        transport.submit(request(2))
    server.shutdown()


class _FailsAfterFirstDrain:
    """A protocol transport whose wait_for_work() fails (its peer died) once
    a request has been drained."""

    def __init__(self):
        self.inner = ThreadingTransport()
        self.drained = 0

    def submit(self, td):
        return self.inner.submit(td)

    def drain(self, max_items):
        items, callbacks = self.inner.drain(max_items)
        self.drained += len(items)
        return items, callbacks

    def wait_for_work(self, timeout):
        if self.drained:
            raise ConnectionResetError("peer died")
        self.inner.wait_for_work(timeout)

    def resolve(self, callback, result):
        callback.set_result(result)

    def resolve_exception(self, callback, exc):
        callback.set_exception(exc)


def test_a_failing_transport_fails_what_it_drained_and_stops_the_server():
    transport = _FailsAfterFirstDrain()
    # min_batch_size=2: the first request is drained, then the wait for a
    # second one fails.
    server = InferenceServer(
        echo_model, transport, max_batch_size=4, min_batch_size=2, timeout=5
    ).start()
    future = transport.submit(request(1))
    with pytest.raises(ConnectionResetError, match="peer died"):
        future.result(timeout=10)
    server._worker.join(10)
    assert not server.is_alive
    server.shutdown()


def test_ctrl_c_reaches_a_caller_blocked_on_a_full_queue():
    # The child installs Python's SIGINT handler itself: Python only installs
    # it when SIGINT is not ignored at startup, and a command a
    # non-interactive shell starts in the background (`bash tests/run_all.sh
    # &`) inherits SIGINT ignored. There the SIGINT below never reached
    # Python and the blocked submit waited until the subprocess timeout
    # (the hang seen under load).
    script = textwrap.dedent(
        """
        import os, signal, threading, torch
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from tensordict import TensorDict
        from batchserve import ThreadingTransport

        transport = ThreadingTransport(max_queue_size=2)
        for _ in range(transport.max_queue_size):  # full, and no server
            transport.submit(TensorDict({"x": torch.zeros(1)}))
        for call in (transport.submit, transport.client()):
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                call(TensorDict({"x": torch.zeros(1)}))
            except KeyboardInterrupt:
                print("interrupted", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.count("interrupted") == 2, done.stdout + done.stderr


def test_dropping_a_transport_ends_its_queued_requests():
    import gc

    transport = ThreadingTransport()
    future = transport.submit(request(1))
    del transport
    gc.collect()
    with pytest.raises(RuntimeError, match="destroyed"):
        future.result(timeout=5)

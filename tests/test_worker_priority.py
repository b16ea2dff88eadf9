"""worker_nice: the nice value the server's worker thread runs at (Linux),
for a thread server and for the one a ProcessInferenceServer runs in its
child; checked at construction, and a value the system refuses fails
start()."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import sys
import threading

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict

from batchserve import (
    InferenceServer,
    ProcessInferenceServer,
    ServerClosedError,
    SharedMemoryTransport,
    ThreadingTransport,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread"),
]


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def raised_nice(by: int) -> int:
    """This thread's nice value plus ``by`` (raising one's own needs no
    privilege); skips a test whose process runs too near 19 to tell."""
    own = thread_nice()
    if own + by > 19:
        pytest.skip(f"this process runs at nice {own}: no room above it")
    return own + by


class NiceRecorder(nn.Module):
    """Writes the nice value of the thread running its forward into every
    row's "action" (and keeps it in `seen`)."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, td):
        nice = thread_nice()
        self.seen.append(nice)
        return td.set("action", torch.full((td.batch_size[0], 2), float(nice)))


def request() -> TensorDict:
    return TensorDict({"observation": torch.ones(4)})


def test_the_worker_thread_runs_at_worker_nice():
    own = thread_nice()
    nice = raised_nice(5)
    model = NiceRecorder()
    transport = ThreadingTransport()
    with InferenceServer(model, transport, worker_nice=nice, inline_calls=False):
        result = transport.client()(request())
    assert model.seen == [nice]
    assert result["action"].tolist() == [float(nice)] * 2
    assert thread_nice() == own  # the caller's thread keeps its own


def test_without_worker_nice_the_worker_keeps_the_process_value():
    model = NiceRecorder()
    transport = ThreadingTransport()
    with InferenceServer(model, transport, inline_calls=False):
        transport.client()(request())
    assert model.seen == [thread_nice()]


@pytest.mark.parametrize(
    "value, error",
    [(True, TypeError), (1.5, TypeError), ("5", TypeError), (20, ValueError), (-21, ValueError)],
)
def test_worker_nice_is_a_nice_value(value, error):
    with pytest.raises(error, match="worker_nice"):
        InferenceServer(NiceRecorder(), ThreadingTransport(), worker_nice=value)
    with pytest.raises(error, match="worker_nice"):
        ProcessInferenceServer(policy_factory=NiceRecorder, transport=shared_memory_transport(),
                               worker_nice=value)


@pytest.mark.parametrize("setup_timeout", [1.0, 0.0])
def test_a_refused_worker_nice_fails_start(monkeypatch, setup_timeout):
    """start() raises the refusal (whatever its set-up timeout: the nice
    value is applied first); what waits for that start is failed by
    shutdown(), or served by a later start."""
    def refuse(*args):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "setpriority", refuse)
    transport = ThreadingTransport()
    server = InferenceServer(NiceRecorder(), transport, worker_nice=-10)
    with pytest.raises(RuntimeError, match="failed to start: worker_nice raised PermissionError"
                       ) as info:
        server.start(setup_timeout=setup_timeout)
    assert isinstance(info.value.__cause__, PermissionError)
    assert not server.is_alive
    waiting = transport.submit(request())
    server.shutdown()
    with pytest.raises(ServerClosedError):
        waiting.result(timeout=60)

    transport = ThreadingTransport()
    server = InferenceServer(NiceRecorder(), transport, worker_nice=-10)
    with pytest.raises(RuntimeError, match="worker_nice"):
        server.start()
    waiting = transport.submit(request())
    monkeypatch.undo()
    server.worker_nice = None
    with server:
        assert waiting.result(timeout=60)["action"].shape == (2,)


def shared_memory_transport() -> SharedMemoryTransport:
    return SharedMemoryTransport(
        TensorDict({"observation": torch.zeros(4)}),
        TensorDict({"action": torch.zeros(2), "policy_version": torch.zeros((), dtype=torch.long)}),
        num_slots=4,
    )


def test_a_process_servers_worker_runs_at_worker_nice():
    nice = raised_nice(3)
    server = ProcessInferenceServer(
        policy_factory=NiceRecorder,
        transport=shared_memory_transport(),
        worker_nice=nice,
        mp_context=mp.get_context("spawn"),
    )
    with server:
        result = server.client()(request())
    assert result["action"].tolist() == [float(nice)] * 2

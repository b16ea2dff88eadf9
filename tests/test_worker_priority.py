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
    SharedMemoryTransport,
    ThreadingTransport,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread"),
]


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


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
    nice = min(own + 5, 19)  # raising one's nice value needs no privilege
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


def test_a_refused_worker_nice_fails_start(monkeypatch):
    def refuse(*args):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "setpriority", refuse)
    transport = ThreadingTransport()
    server = InferenceServer(NiceRecorder(), transport, worker_nice=-10)
    with pytest.raises(RuntimeError, match="failed to start: worker_nice raised PermissionError"
                       ) as info:
        server.start()
    assert isinstance(info.value.__cause__, PermissionError)
    assert not server.is_alive


def shared_memory_transport() -> SharedMemoryTransport:
    return SharedMemoryTransport(
        TensorDict({"observation": torch.zeros(4)}),
        TensorDict({"action": torch.zeros(2), "policy_version": torch.zeros((), dtype=torch.long)}),
        num_slots=4,
    )


def test_a_process_servers_worker_runs_at_worker_nice():
    nice = min(thread_nice() + 3, 19)
    server = ProcessInferenceServer(
        policy_factory=NiceRecorder,
        transport=shared_memory_transport(),
        worker_nice=nice,
        mp_context=mp.get_context("spawn"),
    )
    with server:
        result = server.client()(request())
    assert result["action"].tolist() == [float(nice)] * 2

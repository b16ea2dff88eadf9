"""Shared helpers for the batchserve test suite."""

from __future__ import annotations

import gc
import glob
import multiprocessing as mp
import os
import threading

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from batchserve import InferenceServer, SharedMemoryTransport, ThreadingTransport


def make_policy(in_features: int = 4, out_features: int = 2) -> TensorDictModule:
    return TensorDictModule(
        nn.Linear(in_features, out_features), in_keys=["observation"], out_keys=["action"]
    )


def echo_model(td):
    """Returns each request's id as its output: results prove their routing."""
    return TensorDict({"echo": td["id"].clone()}, batch_size=td.batch_size)


def request(i: int) -> TensorDict:
    return TensorDict({"id": torch.tensor(i), "observation": torch.randn(4)})


def echoes(futures, timeout: float = 10) -> list[int]:
    """The ids echo_model returned through `futures`, in order."""
    return [f.result(timeout=timeout)["echo"].item() for f in futures]


class BlockingModel:
    """A model whose forwards wait until `release` is set, then return
    `then(td)` (default: echo_model); `entered` tells when a forward started
    and `sizes` what batch sizes it saw."""

    def __init__(self, then=echo_model):
        self.then = then
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, td):
        self.sizes.append(td.batch_size[0])
        self.entered.set()
        assert self.release.wait(30), "test never released the model"
        return self.then(td)


def echo_shared_memory_transport(num_slots: int = 16) -> SharedMemoryTransport:
    """A SharedMemoryTransport for request() and echo_model(): it declares
    their keys."""
    spec = TensorDict({"id": torch.zeros((), dtype=torch.long), "observation": torch.zeros(4)})
    response = TensorDict({"echo": torch.zeros((), dtype=torch.long)})
    return SharedMemoryTransport(spec, response, num_slots=num_slots)


@pytest.fixture(scope="session")
def forkserver():
    """A multiprocessing context whose children start from a server process
    that has torch, tensordict and batchserve imported already."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tensordict", "batchserve"])
    return ctx


@pytest.fixture
def transport():
    return ThreadingTransport()


@pytest.fixture
def echo_server(transport):
    with InferenceServer(echo_model, transport, max_batch_size=16, timeout=0.005) as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left():
    """After the whole suite, no shared-memory segment made by a batchserve
    transport is left in /dev/shm (every test's transport, served or not,
    removed its name). A segment's name carries its creator's pid: those of
    other live processes (another run on the machine) are not this suite's."""
    before = set(glob.glob("/dev/shm/batchserve-*"))
    yield
    gc.collect()  # transports only referenced by finished tests
    left = set(glob.glob("/dev/shm/batchserve-*")) - before
    left = {path for path in left if not _created_by_another_live_process(path)}
    assert not left, f"shared-memory segments left behind: {sorted(left)}"


def _created_by_another_live_process(path: str) -> bool:
    try:
        pid = int(os.path.basename(path).split("-")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

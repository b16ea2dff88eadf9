"""torchrl's MultiProcessWeightSyncScheme and SharedMemWeightSyncScheme as
``InferenceServer(weight_sync=...)``, end to end.

A scheme's sender and receiver cannot be one object in one process
(``init_on_receiver`` wipes the sender state of an object initialised on the
sender), and its queues travel to another process only when that process is
started (a scheme pickles with its ``mp.Queue``s only then). So the process
that calls ``init_on_sender`` starts the other one:

* trainer here, server in a child (the collectors' layout): the test process
  calls ``init_on_sender``, starts the server process with the scheme, then
  ``connect()`` and one ``send(weights=...)`` per update; the actors (this
  process) reach the server through a ``SharedMemoryTransport``.
* server here, trainer in a child: the test process calls ``init_on_sender``
  only to make the queues, starts the trainer process with the scheme (which
  calls ``init_on_sender`` again, reusing the inherited queues, ``connect()``
  and ``send()``), and serves through a ``ThreadingTransport``.

Update v sets every parameter of a Linear(4, 2) to v + 1, so an all-ones
observation gives the action 5 (v + 1). ``send`` is synchronous (torchrl's
default ``sync=True``): it returns once the server's receiver thread applied
the update and acknowledged it, which comes after the version bump, so the
first request after it must carry version v and its weights; the stamped
version and ``server.policy_version`` go up by exactly one per update and
``stats()["weight_updates"]`` counts them.

Both schemes apply weights outside the server's model lock (torchrl's
receiver thread; SharedMem's trainer even writes the served parameters
itself), so a forward running during an update may mix versions: these tests
assert exact actions only between updates, and only the version order while
updates stream.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

pytest.importorskip(
    "torchrl.weight_update",
    reason="torchrl is not installed: its weight-sync schemes are what these tests run",
)
from torchrl.weight_update import (  # noqa: E402
    MultiProcessWeightSyncScheme,
    SharedMemWeightSyncScheme,
)

from batchserve import InferenceServer, SharedMemoryTransport, ThreadingTransport  # noqa: E402

SCHEMES = [
    pytest.param(MultiProcessWeightSyncScheme, id="MultiProcessWeightSyncScheme"),
    pytest.param(SharedMemWeightSyncScheme, id="SharedMemWeightSyncScheme"),
]
UPDATES = 5
OBSERVATION = TensorDict({"observation": torch.ones(4)})

def make_policy(features: int = 4, actions: int = 2) -> TensorDictModule:
    return TensorDictModule(
        nn.Linear(features, actions), in_keys=["observation"], out_keys=["action"]
    )


def weights(version: int, features: int = 4, actions: int = 2) -> TensorDict:
    """Every parameter of the policy set to version + 1."""
    template = TensorDict.from_module(make_policy(features, actions)).data
    return template.apply(lambda t: torch.full_like(t, float(version + 1)))


def action_of(version: int) -> torch.Tensor:
    """The action `weights(version)` computes for OBSERVATION."""
    return torch.full((2,), 5.0 * (version + 1))


@pytest.fixture(scope="module")
def ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tensordict", "torchrl.weight_update", "batchserve"])
    return ctx


def shared_memory_transport(features: int = 4, actions: int = 2) -> SharedMemoryTransport:
    request_spec = TensorDict({"observation": torch.zeros(features)})
    response_spec = TensorDict(
        {"action": torch.zeros(actions), "policy_version": torch.zeros((), dtype=torch.long)}
    )
    return SharedMemoryTransport(request_spec, response_spec, num_slots=8)


def call_until(client, version: int, deadline_s: float = 10.0) -> TensorDict:
    """Calls until a result carries `version`'s action (deadline: a hang
    guard; with a synchronous send the first call already does)."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = client(OBSERVATION.clone())
        if torch.equal(result["action"], action_of(version)) or time.monotonic() > deadline:
            return result
        time.sleep(0.005)


class StreamingActor:
    """A thread calling the server while updates stream: records each
    result's stamped version; the stamps must never go down."""

    def __init__(self, client):
        self.client = client
        self.versions: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                self.versions.append(self.client(OBSERVATION.clone())["policy_version"].item())
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self):
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        assert not self.errors, self.errors
        assert self.versions == sorted(self.versions), "a stamped version went down"
        assert set(self.versions) <= set(range(UPDATES + 1))


# -- trainer here, server in a child process -----------------------------------


def serve_in_child(scheme, transport, shape, commands, replies) -> None:
    policy = make_policy(*shape)
    server = InferenceServer(policy, transport, weight_sync=scheme, max_batch_size=8, timeout=0.001)
    server.start(setup_timeout=None)  # until connect() has the trainer's first weights
    replies.put("serving")
    for _ in iter(commands.get, "stop"):
        stats = server.stats()
        replies.put((server.policy_version, stats["weight_updates"], stats["weight_sync_errors"]))
    server.shutdown()


class ChildServer:
    """The documented sender set-up: init_on_sender, start the receiver's
    process with the scheme, connect(); then send() per update."""

    def __init__(self, ctx, scheme_cls, features: int = 4, actions: int = 2):
        self.transport = shared_memory_transport(features, actions)
        self.scheme = scheme_cls()
        self.scheme.init_on_sender(
            model_id="policy", weights=weights(0, features, actions), devices=["cpu"], ctx=ctx
        )
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=serve_in_child,
            args=(self.scheme, self.transport, (features, actions), self.commands, self.replies),
        )
        self.process.start()
        self.scheme.connect()  # hands the server its first weights
        assert self.replies.get(timeout=30) == "serving"

    def state(self):
        """(policy_version, weight_updates, weight_sync_errors) of the server."""
        self.commands.put("state")
        return self.replies.get(timeout=30)

    def close(self):
        self.commands.put("stop")
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        self.scheme.shutdown()
        self.transport.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme_cls", SCHEMES)
def test_trainer_streams_updates_to_a_server_process(ctx, scheme_cls):
    server = ChildServer(ctx, scheme_cls)
    try:
        client = server.transport.client()
        first = client(OBSERVATION.clone())
        assert first["policy_version"].item() == 0
        assert torch.equal(first["action"], action_of(0))  # connect() applied the first weights
        assert server.state() == (0, 0, 0)
        actor = StreamingActor(server.transport.client())
        for version in range(1, UPDATES + 1):
            server.scheme.send(weights=weights(version))
            result = call_until(client, version)
            assert torch.equal(result["action"], action_of(version))
            assert result["policy_version"].item() == version
            assert server.state() == (version, version, 0)
        actor.stop()
        assert server.state() == (UPDATES, UPDATES, 0)  # no late second bump
    finally:
        server.close()


@pytest.mark.timeout(60)
def test_multiprocess_updates_are_exact_under_concurrent_forwards(ctx):
    """Once MultiProcessWeightSyncScheme's updates are applied under the
    model lock, with the version bumped in the same critical section, every
    result computes exactly its stamped version's weights."""
    features = 256
    server = ChildServer(ctx, MultiProcessWeightSyncScheme, features, features)
    observation = TensorDict({"observation": torch.ones(features)})
    mixed, errors = [], []
    stop = threading.Event()

    def actor():
        client = server.transport.client()
        try:
            while not stop.is_set():
                result = client(observation.clone())
                expected = (features + 1.0) * (result["policy_version"].item() + 1)
                if not torch.all(result["action"] == expected):
                    mixed.append(result["policy_version"].item())
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=actor, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        for version in range(1, 41):
            server.scheme.send(weights=weights(version, features, features))
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        assert server.state() == (40, 40, 0)
        assert not mixed, f"{len(mixed)} results mixed versions (stamped {mixed[:5]}...)"
    finally:
        stop.set()
        server.close()


# -- server here, trainer in a child process -----------------------------------


def train_in_child(scheme, updates, go, sent) -> None:
    # Unpickled, the scheme is initialised on neither side: initialise it on
    # the sender again (the queues it carries are kept) and connect.
    scheme.init_on_sender(model_id="policy", weights=weights(0), devices=["cpu"])
    scheme.connect()
    for version in range(1, updates + 1):
        assert go.get(timeout=30) == version
        scheme.send(weights=weights(version))
        sent.put(version)
    scheme.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "scheme_cls",
    SCHEMES,
)
def test_trainer_process_streams_updates_to_a_server_here(ctx, scheme_cls):
    scheme = scheme_cls()
    scheme.init_on_sender(model_id="policy", weights=weights(0), devices=["cpu"], ctx=ctx)
    go, sent = ctx.Queue(), ctx.Queue()
    trainer = ctx.Process(target=train_in_child, args=(scheme, UPDATES, go, sent))
    trainer.start()
    transport = ThreadingTransport()
    server = InferenceServer(make_policy(), transport, weight_sync=scheme, timeout=0.001)
    released = 0
    try:
        server.start(setup_timeout=30)  # until the trainer's connect()
        client = transport.client()
        first = client(OBSERVATION.clone())
        assert first["policy_version"].item() == 0
        assert torch.equal(first["action"], action_of(0))
        actor = StreamingActor(transport.client())
        for version in range(1, UPDATES + 1):
            go.put(version)
            released = version
            assert sent.get(timeout=30) == version
            result = call_until(client, version)
            assert torch.equal(result["action"], action_of(version))
            assert result["policy_version"].item() == version
            assert server.policy_version == version
            assert server.stats()["weight_updates"] == version
        actor.stop()
        stats = server.stats()
        assert (stats["policy_version"], stats["weight_updates"]) == (UPDATES, UPDATES)
        assert stats["weight_sync_errors"] == 0
    finally:
        for version in range(released + 1, UPDATES + 1):  # let the trainer finish
            go.put(version)
        trainer.join(30)
        if trainer.is_alive():
            trainer.kill()
            trainer.join(10)
        server.shutdown()
        scheme.shutdown()
    assert trainer.exitcode == 0

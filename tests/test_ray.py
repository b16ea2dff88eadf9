"""Ray: RayTransport (a server in this process, clients in Ray tasks and
actors) and serve_on_ray (a server in a Ray actor), on a local Ray runtime.

Remote, local and driver clients get their own results (echo_model returns
each request's id, so misrouting would show), requests from different
clients share batches, model errors reach the remote caller as the same
exception type, and the faults: shutdown with callers waiting, the server's
actor killed mid-request, a client actor killed mid-request. Shutdown and
close leave the runtime running with its CPUs free.

Ray worker processes are slow to start, so the tests share one runtime, one
transport where they can, and make few actors (num_cpus=0 for the test's own
tasks and actors, so none waits for a CPU slot).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
import time

import pytest
import torch
from tensordict import TensorDict

ray = pytest.importorskip(
    "ray", reason="Ray is not installed (pip install 'batchserve[ray]' to run these tests)"
)

from conftest import BlockingModel, echo_model, request  # noqa: E402

from batchserve import InferenceServer, RayTransport, ServerClosedError, serve_on_ray  # noqa: E402

pytestmark = pytest.mark.timeout(90)

# A hang guard only: every wait below is for an event, a result or a deadline.
DEADLINE_S = 30


@pytest.fixture(scope="module")
def ray_runtime():
    """A local Ray runtime for the module, which this module started."""
    if ray.is_initialized():  # pragma: no cover - another module left one
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The workers cannot import the tests' modules: Ray ships the helpers
    # below (and conftest's) by value.
    for name in (__name__, "conftest"):
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])
    yield
    for name in (__name__, "conftest"):
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[name])
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_transport(ray_runtime):
    """One RayTransport for the tests that serve in this process: each test
    starts its own InferenceServer on it (so it is also re-served), sparing a
    new inbox actor per test."""
    transport = RayTransport()
    yield transport
    transport.close()


def wait_until(predicate, what: str, deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.01)


def cpus_all_free() -> bool:
    return ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU")


def echo_of(result) -> int:
    return result["echo"].item()


# -- what runs in Ray workers (shipped by value, see ray_runtime) -------------


@ray.remote(num_cpus=0)
def echo_calls(client, ids):
    """Blocking calls, one after another, from a Ray task."""
    return [client(request(i))["echo"].item() for i in ids]


@ray.remote(num_cpus=0)
def echo_submits(client, ids):
    """Submitted together from a Ray task, then waited for."""
    futures = [client.submit(request(i)) for i in ids]
    return [f.result(timeout=DEADLINE_S)["echo"].item() for f in futures]


@ray.remote(num_cpus=0)
def outcome(client, i):
    """(True, echo) or (False, the exception) for one call, from a Ray task."""
    try:
        return True, client(request(i))["echo"].item()
    except Exception as exc:  # noqa: BLE001 - handed back for the test to check
        return False, exc


@ray.remote(num_cpus=0)
class Caller:
    """A Ray actor that holds a client (pickled into it)."""

    def __init__(self, client):
        self.client = client

    def echo(self, ids):
        return [self.client(request(i))["echo"].item() for i in ids]


def flag_raising_model(td):
    """echo_model, but a batch with a negative id raises ValueError."""
    if (td["id"] < 0).any():
        raise ValueError("flagged request")
    return echo_model(td)


def sum_policy(scale: float = 1.0):
    """Linear(4, 1) with every weight `scale`: action = scale * sum(obs)."""
    from tensordict.nn import TensorDictModule

    module = torch.nn.Linear(4, 1)
    with torch.no_grad():
        module.weight.fill_(scale)
        module.bias.zero_()
    return TensorDictModule(module, in_keys=["observation"], out_keys=["action"])


def observation(value: float) -> TensorDict:
    return TensorDict({"observation": torch.full((4,), float(value))})


@ray.remote(num_cpus=0)
def action_from_handle(server, value):
    """A Ray task that makes its own client from a RayServer handle."""
    out = server.client()(observation(value))
    return out["action"].item(), out["policy_version"].item()


class MarkedSleeper:
    """echo_model, but a batch with a negative id first creates `marker`
    (the test's sign that it is in the model) and then sleeps: the model's
    behaviour in the server's process, which the test kills meanwhile."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, td):
        if (td["id"] < 0).any():
            open(self.marker, "w").close()
            time.sleep(60)
        return echo_model(td)


# -- a server in this process ---------------------------------------------------


def test_remote_local_and_driver_clients_get_their_own_results(ray_transport):
    with InferenceServer(echo_model, ray_transport, max_batch_size=8, timeout=0.005):
        client = ray_transport.client()
        caller = Caller.remote(client)
        local = ray_transport.local_client()
        local_out = []
        local_thread = threading.Thread(
            target=lambda: local_out.extend(echo_of(local(request(i))) for i in range(300, 320))
        )
        local_thread.start()
        in_task = echo_calls.remote(client, list(range(0, 20)))
        submitted_in_task = echo_submits.remote(client, list(range(100, 120)))
        in_actor = caller.echo.remote(list(range(200, 220)))

        driver_futures = [client.submit(request(i)) for i in range(400, 410)]

        async def acalls():
            outs = await asyncio.gather(*(client.acall(request(i)) for i in range(500, 510)))
            return [echo_of(o) for o in outs]

        assert asyncio.run(acalls()) == list(range(500, 510))
        assert [echo_of(f.result(timeout=DEADLINE_S)) for f in driver_futures] == list(
            range(400, 410)
        )
        assert ray.get(in_task, timeout=DEADLINE_S) == list(range(0, 20))
        assert ray.get(submitted_in_task, timeout=DEADLINE_S) == list(range(100, 120))
        assert ray.get(in_actor, timeout=DEADLINE_S) == list(range(200, 220))
        local_thread.join(DEADLINE_S)
        assert local_out == list(range(300, 320))
        assert echo_of(client(request(7), timeout=DEADLINE_S)) == 7
        ray.kill(caller)


def test_requests_from_different_clients_share_a_batch(ray_transport):
    sizes = []

    def recording_model(td):
        sizes.append(td.batch_size[0])
        return echo_model(td)

    # Nothing is served until 4 requests wait (the timeout is far away).
    with InferenceServer(
        recording_model, ray_transport, max_batch_size=4, min_batch_size=4, timeout=DEADLINE_S
    ) as server:
        client = ray_transport.client()
        in_tasks = [echo_calls.remote(client, [i]) for i in (1, 2)]
        from_driver = client.submit(request(3))
        from_thread = ray_transport.local_client().submit(request(4))
        assert [ray.get(t, timeout=DEADLINE_S) for t in in_tasks] == [[1], [2]]
        assert echo_of(from_driver.result(timeout=DEADLINE_S)) == 3
        assert echo_of(from_thread.result(timeout=DEADLINE_S)) == 4
        assert sizes == [4]
        assert server.stats()["batch_size_histogram"] == {4: 1}


def test_model_errors_reach_the_remote_caller_as_their_type(ray_transport):
    with InferenceServer(flag_raising_model, ray_transport, max_batch_size=8, timeout=0.005):
        client = ray_transport.client()
        ok, exc = ray.get(outcome.remote(client, -1), timeout=DEADLINE_S)
        assert not ok
        assert isinstance(exc, ValueError), repr(exc)
        assert "flagged request" in str(exc)
        with pytest.raises(ValueError, match="flagged request"):
            client(request(-2), timeout=DEADLINE_S)
        # The server goes on: later batches, from every kind of client.
        assert ray.get(outcome.remote(client, 5), timeout=DEADLINE_S) == (True, 5)
        assert ray.get(echo_submits.remote(client, [6, 7, 8]), timeout=DEADLINE_S) == [6, 7, 8]
        assert echo_of(client(request(9), timeout=DEADLINE_S)) == 9
        assert echo_of(ray_transport.local_client()(request(10))) == 10


class TwoArgError(Exception):
    """Pickles, but does not unpickle (unpickling calls TwoArgError(message))."""

    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def unpicklable_error_model(td):
    if (td["id"] < 0).any():
        raise TwoArgError("flagged", "request")
    return echo_model(td)


def test_a_model_error_that_does_not_unpickle_still_fails_the_remote_call(ray_transport):
    with InferenceServer(unpicklable_error_model, ray_transport, max_batch_size=8, timeout=0.005):
        client = ray_transport.client()
        try:
            client(request(-1), timeout=5)  # a hang guard: it fails at once or never
        except ray.exceptions.GetTimeoutError:
            pytest.fail("the remote caller of a failing request got no answer")
        except Exception as exc:  # noqa: BLE001 - its type may not survive: its text must
            assert "flagged: request" in str(exc)
        assert echo_of(client(request(1), timeout=DEADLINE_S)) == 1


def test_shutdown_lets_the_forward_in_progress_answer_remote_callers(ray_transport):
    model = BlockingModel()
    server = InferenceServer(
        model, ray_transport, max_batch_size=2, min_batch_size=2, timeout=DEADLINE_S
    ).start()
    remote = ray_transport.client().submit(request(1))
    local = ray_transport.local_client().submit(request(2))
    stopping = threading.Thread(target=server.shutdown, kwargs={"timeout": DEADLINE_S})
    try:
        assert model.entered.wait(DEADLINE_S), "the batch never reached the model"
        stopping.start()
        wait_until(lambda: ray_transport._queue.closed, "shutdown to close the queue")
    finally:
        model.release.set()  # the forward ends well within shutdown's timeout
    stopping.join(DEADLINE_S)
    assert echo_of(local.result(timeout=DEADLINE_S)) == 2
    assert echo_of(remote.result(timeout=DEADLINE_S)) == 1


def test_a_dead_client_actor_does_not_disturb_the_others(ray_transport):
    model = BlockingModel()
    # The doomed actor's request and a neighbour's share the blocked batch.
    with InferenceServer(
        model, ray_transport, max_batch_size=2, min_batch_size=2, timeout=DEADLINE_S
    ) as server:
        client = ray_transport.client()
        doomed = Caller.remote(client)
        # The actor is up before the neighbour's request starts the batch's
        # timeout: a Ray worker's start took over DEADLINE_S on a loaded
        # 2-core machine, and the batch then closed with the neighbour alone.
        ray.get(doomed.__ray_ready__.remote(), timeout=4 * DEADLINE_S)
        doomed_call = doomed.echo.remote([1])
        neighbour = client.submit(request(2))
        assert model.entered.wait(DEADLINE_S), "the batch never reached the model"
        ray.kill(doomed)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(doomed_call, timeout=DEADLINE_S)
        model.release.set()
        assert echo_of(neighbour.result(timeout=DEADLINE_S)) == 2
        server.min_batch_size = 1
        assert ray.get(echo_calls.remote(client, [3, 4, 5]), timeout=DEADLINE_S) == [3, 4, 5]
        assert echo_of(client(request(6), timeout=DEADLINE_S)) == 6
        assert echo_of(ray_transport.local_client()(request(7))) == 7
        assert model.sizes[0] == 2
        assert server.stats()["failed_batches"] == 0


def test_shutdown_fails_waiting_and_later_remote_calls_and_close_frees_ray(ray_runtime):
    transport = RayTransport()
    model = BlockingModel()
    server = InferenceServer(model, transport, max_batch_size=1, timeout=0.005).start()
    try:
        client = transport.client()
        in_forward = client.submit(request(1))
        assert model.entered.wait(DEADLINE_S), "the first request never reached the model"
        queued = client.submit(request(2))
        queued_in_task = outcome.remote(client, 3)
        # The forward in progress is overdue: its caller gets the shutdown error too.
        server.shutdown(timeout=0.1)
    finally:
        model.release.set()
        server.shutdown()
    for future in (in_forward, queued):
        with pytest.raises(ServerClosedError) as caught:
            future.result(timeout=DEADLINE_S)
        assert isinstance(caught.value, ray.exceptions.RayTaskError)
    ok, exc = ray.get(queued_in_task, timeout=DEADLINE_S)
    assert not ok and isinstance(exc, ServerClosedError), repr(exc)
    with pytest.raises(ServerClosedError):
        client(request(4), timeout=DEADLINE_S)

    transport.close()  # kills the inbox actor
    with pytest.raises(ray.exceptions.RayActorError):
        client(request(5), timeout=DEADLINE_S)
    assert ray.is_initialized()
    wait_until(cpus_all_free, "the cluster's CPUs to be free")
    # A closed transport cannot be served again, and says so at start().
    with pytest.raises(ServerClosedError, match="was closed"):
        server.start()
    assert not server.is_alive
    with pytest.raises(ServerClosedError):  # not accepted and left unserved
        transport.local_client()(request(6), timeout=DEADLINE_S)


class Unsendable:
    """A value Ray cannot serialise (a result of a flagged request)."""

    def __reduce__(self):
        raise TypeError("cannot pickle Unsendable")


def unsendable_result_model(td):
    out = echo_model(td)
    if (td["id"] < 0).any():
        out["extra"] = Unsendable()
    return out


def test_a_result_ray_cannot_send_fails_only_its_own_call(ray_transport):
    with InferenceServer(unsendable_result_model, ray_transport, max_batch_size=8,
                         timeout=0.005):
        client = ray_transport.client()
        with pytest.raises(TypeError, match="could not be sent back through Ray"):
            client(request(-1), timeout=DEADLINE_S)
        assert echo_calls_result(client, [1, 2, 3]) == [1, 2, 3]  # later calls still answered


def echo_calls_result(client, ids):
    return ray.get(echo_calls.remote(client, ids), timeout=DEADLINE_S)


# -- a server in a Ray actor ----------------------------------------------------


def test_serve_on_ray_serves_updates_weights_and_shuts_down(ray_runtime):
    server = serve_on_ray(sum_policy, max_batch_size=8, timeout=0.005)  # num_cpus=1
    try:
        client = server.client()
        out = client(observation(1.0), timeout=DEADLINE_S)
        assert (out["action"].item(), out["policy_version"].item()) == (4.0, 0)
        assert ray.get(action_from_handle.remote(server, 2.0), timeout=DEADLINE_S) == (8.0, 0)
        assert server.policy_version == 0
        stats = server.stats()
        assert stats["requests"] == 2 and stats["policy_version"] == 0
        wait_until(  # the actor holds one CPU while it lives
            lambda: ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"] - 1,
            "the server actor's CPU to show as taken",
        )

        new = TensorDict.from_module(sum_policy(3.0))
        assert server.update_weights(new) == 1
        assert server.policy_version == 1
        out = client(observation(1.0), timeout=DEADLINE_S)
        assert (out["action"].item(), out["policy_version"].item()) == (12.0, 1)
        assert ray.get(action_from_handle.remote(server, 2.0), timeout=DEADLINE_S) == (24.0, 1)
        assert server.update_weights(new, version=7) == 7
        assert client(observation(1.0), timeout=DEADLINE_S)["policy_version"].item() == 7
        assert server.stats()["weight_updates"] == 2
    finally:
        server.shutdown()
    with pytest.raises((ServerClosedError, ray.exceptions.RayActorError)):
        client(observation(1.0), timeout=DEADLINE_S)
    assert ray.is_initialized()
    wait_until(cpus_all_free, "the server actor's CPU to be freed")


def test_a_killed_server_actor_fails_waiting_and_later_calls(ray_runtime, tmp_path):
    marker = str(tmp_path / "in-model")
    server = serve_on_ray(
        functools.partial(MarkedSleeper, marker), num_cpus=0, max_batch_size=4, timeout=0.005
    )
    client = server.client()
    assert echo_of(client(request(1), timeout=DEADLINE_S)) == 1
    in_model = client.submit(request(-1))
    wait_until(lambda: os.path.exists(marker), "the flagged request to reach the model")
    waiting_in_task = outcome.remote(client, 2)

    ray.kill(server.actor)
    with pytest.raises(ray.exceptions.RayActorError):
        in_model.result(timeout=DEADLINE_S)
    ok, exc = ray.get(waiting_in_task, timeout=DEADLINE_S)
    assert not ok and isinstance(exc, ray.exceptions.RayActorError), repr(exc)
    with pytest.raises(ray.exceptions.RayActorError):
        client(request(3), timeout=DEADLINE_S)
    server.shutdown()  # of a dead server: nothing to do, and no error
    assert ray.is_initialized()

"""SharedMemoryTransport: actors in other processes through shared-memory slots.

Cross-process echoes under every start method (ids prove routing), torchrl's
semantics (declared keys only, KeyError before a slot is used, views with
copy_result=False, a full transport blocking its submitter), bad inputs, and
the faults: an actor SIGKILLed mid-request, the server process SIGKILLed,
shutdown with processes still attached. The suite-wide check that no segment
is left in /dev/shm is in conftest.py.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import signal
import threading
import time

import pytest
import torch
from conftest import BlockingModel
from tensordict import TensorDict

import batchserve
from batchserve import InferenceServer, ServerClosedError, SharedMemoryTransport

pytestmark = pytest.mark.timeout(180)


def request_spec() -> TensorDict:
    return TensorDict({"observation": torch.zeros(4), "id": torch.zeros((), dtype=torch.long)})


def response_spec() -> TensorDict:
    return TensorDict({
        "action": torch.zeros(2),
        "id": torch.zeros((), dtype=torch.long),
        "policy_version": torch.zeros((), dtype=torch.long),
    })


def request(i: int) -> TensorDict:
    return TensorDict({"observation": torch.full((4,), float(i)), "id": torch.tensor(i)})


def double_model(td):
    """action = 2 * observation[:2]; the request's id comes back as "id"."""
    return TensorDict({"action": td["observation"][:, :2] * 2, "id": td["id"].clone(),
                       "unused": torch.zeros(td.batch_size[0], 3)}, batch_size=td.batch_size)


def make_transport(num_slots: int = 16, **kwargs) -> SharedMemoryTransport:
    return SharedMemoryTransport(request_spec(), response_spec(), num_slots=num_slots, **kwargs)


def check(result: TensorDict, i: int) -> None:
    assert result["id"].item() == i
    assert torch.equal(result["action"], torch.full((2,), 2.0 * i))


def every_slot_serves(transport: SharedMemoryTransport) -> None:
    """num_slots requests in flight at once, from a new client, all served."""
    client = transport.client()
    futures = [client.submit(request(i), timeout=30) for i in range(transport.num_slots)]
    for i, f in enumerate(futures):
        check(f.result(timeout=30), i)


def segment_path(transport: SharedMemoryTransport) -> str:
    return "/dev/shm" + transport.name


# Child-process targets: module level, so that spawn and forkserver can pickle them.

def echo_actor(client, first: int, count: int, results) -> None:
    bad = []
    for i in range(first, first + count):
        out = client(request(i))
        if out["id"].item() != i or not torch.equal(out["action"], torch.full((2,), 2.0 * i)):
            bad.append(i)
    results.put((first, count, bad))


def call_when_told(client, attached, go, results) -> None:
    attached.set()  # unpickling `client` mapped the segment
    go.wait(60)
    try:
        client(request(7))
        results.put("served")
    except ServerClosedError as exc:
        results.put(f"ServerClosedError: {exc}")
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def call_and_hang(client, started) -> None:
    started.set()
    client(request(1))  # the server never answers: the test kills us


def submit_and_hang(client, count, submitted) -> None:
    futures = [client.submit(request(i)) for i in range(count)]  # noqa: F841 (held)
    submitted.set()
    time.sleep(300)  # the test kills us holding the slots


def slow_model(td):
    time.sleep(120)
    return double_model(td)


def serve_in_child(transport, ready) -> None:
    server = InferenceServer(slow_model, transport, max_batch_size=8, timeout=0.001).start()
    ready.set()
    time.sleep(300)
    server.shutdown()


def run_actors(ctx, transport, processes: int, per_actor: int) -> None:
    results = ctx.Queue()
    procs = [
        ctx.Process(target=echo_actor, args=(transport.client(), 1000 * p, per_actor, results))
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=150) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert sorted(r[0] for r in reports) == [1000 * p for p in range(processes)]
    assert all(r[1] == per_actor and r[2] == [] for r in reports), reports
    assert all(p.exitcode == 0 for p in procs)


# -- in one process -------------------------------------------------------------


def test_round_trip_declared_keys_and_copies():
    transport = make_transport()
    client = transport.client()
    with InferenceServer(double_model, transport, max_batch_size=8) as server:
        extra = request(3).set("ignored", torch.ones(5))
        out = client(extra)
        check(out, 3)
        assert set(out.keys()) == {"action", "id", "policy_version"}  # "unused" dropped
        assert out["policy_version"].item() == server.policy_version
        out["action"].fill_(-1)  # a copy: the next result is unaffected
        check(client(request(3)), 3)
        assert server.stats()["fast_path_requests"] == 2
    assert server.transport_kind == "shared_memory"


def test_copy_result_false_returns_a_view_of_the_slot():
    transport = make_transport(copy_result=False)
    client = transport.client()
    with InferenceServer(double_model, transport, max_batch_size=8):
        first = client(request(1))
        check(first, 1)
        client(request(2))  # the same client reuses its slot
        assert first["id"].item() == 2  # the view now shows the later result


@pytest.mark.parametrize("single_file", [False, True])
def test_threads_share_one_client(single_file):
    transport = make_transport(num_slots=8, single_file=single_file)
    assert transport.single_file is single_file
    client = transport.client()
    errors = []

    def worker(base):
        try:
            for i in range(base, base + 100):
                check(client(request(i)), i)
        except BaseException as exc:
            errors.append(exc)

    with InferenceServer(double_model, transport, max_batch_size=8):
        threads = [threading.Thread(target=worker, args=(1000 * t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    assert transport._segment.owned_slots == 0


def test_single_file_threads_that_stop_calling_strand_no_one():
    # Single file, a thread passes the wake-up it was handed at its next call.
    # Threads that stop calling (one waits on an event, some end, some use
    # futures) must not strand the others: the server wakes a result not
    # passed on in time, and an ending thread passes what it holds.
    transport = make_transport(num_slots=8, single_file=True)
    client = transport.client()
    stop = threading.Event()
    errors = []

    def idler(base):
        try:
            for i in range(base, base + 30):
                check(client(request(i)), i)
            stop.wait(60)  # alive, holding whatever it was handed last
        except BaseException as exc:
            errors.append(exc)

    def worker(base, n, futures):
        try:
            for i in range(base, base + n):
                if futures:
                    check(client.submit(request(i)).result(timeout=60), i)
                else:
                    check(client(request(i)), i)
        except BaseException as exc:
            errors.append(exc)

    with InferenceServer(double_model, transport, max_batch_size=8):
        idlers = [threading.Thread(target=idler, args=(100_000 * (t + 1),)) for t in range(2)]
        workers = [
            threading.Thread(target=worker, args=(1000 * t, 40 + 40 * t, t % 2 == 1))
            for t in range(5)
        ]
        for t in idlers + workers:
            t.start()
        for t in workers:
            t.join(60)
        stop.set()
        for t in idlers:
            t.join(60)
    assert not errors
    assert not any(t.is_alive() for t in idlers + workers)
    assert transport._segment.owned_slots == 0


def test_futures_block_when_full_and_time_out_like_torchrl():
    transport = make_transport(num_slots=2)
    client = transport.client()
    futures = [client.submit(request(i)) for i in range(2)]  # no server yet
    assert not futures[0].done()
    with pytest.raises(queue.Empty):  # torchrl's future raises queue.Empty
        futures[0].result(timeout=0.05)
    with pytest.raises(TimeoutError):  # a full transport blocks the submitter
        client.submit(request(9), timeout=0.05)
    with InferenceServer(double_model, transport, max_batch_size=8):
        for i, f in enumerate(futures):
            check(f.result(timeout=30), i)  # the request stayed in flight
            assert f.done()
        third = client.submit(request(5))
        assert third.exception(timeout=30) is None
        check(third.result(), 5)
    assert transport._segment.owned_slots == 0


def test_timeouts_withdraw_or_abandon_and_keep_no_slot():
    transport = make_transport(num_slots=2)
    client = transport.client()
    with pytest.raises(queue.Empty, match="withdrawn"):  # as torchrl's; also a TimeoutError
        client(request(1), timeout=0.05)  # no server: never taken
    model = BlockingModel(then=double_model)
    with InferenceServer(model, transport, max_batch_size=8):
        with pytest.raises(TimeoutError, match="already being served"):
            client(request(2), timeout=0.5)
        assert model.entered.is_set()
        model.release.set()
        check(client(request(3)), 3)
        deadline = time.monotonic() + 10
        while transport._segment.owned_slots and time.monotonic() < deadline:
            time.sleep(0.01)
        assert transport._segment.owned_slots == 0  # the abandoned slot came back


def test_future_outcomes_are_the_servers_and_cancel_keeps_an_answer():
    transport = make_transport(num_slots=2)
    client = transport.client()

    def times_out(td):
        if td["id"][0].item() == 1:
            raise TimeoutError("the model's backend timed out")
        return double_model(td)

    with InferenceServer(times_out, transport, max_batch_size=1):
        first = client.submit(request(1))
        with pytest.raises(TimeoutError, match="backend") as info:
            first.result(timeout=30)
        assert not isinstance(info.value, queue.Empty)  # the server's, not a wait's
        assert first.done()
        second = client.submit(request(2))
        check(second.result(timeout=30), 2)  # not another request's result
        assert not second.cancel()  # answered: cancel leaves the result
        check(second.result(), 2)
    transport2 = make_transport(num_slots=1)
    pending = transport2.client().submit(request(3))  # no server
    assert pending.cancel() and pending.cancelled()
    assert transport2._segment.owned_slots == 0


def test_dropped_future_gives_its_slot_back():
    transport = make_transport(num_slots=1)
    client = transport.client()
    future = client.submit(request(1))
    del future
    with InferenceServer(double_model, transport, max_batch_size=8):
        check(client(request(2), timeout=30), 2)


def test_a_result_that_takes_longer_than_a_wait_slice_still_arrives():
    """A client waits in 100 ms slices; a model slower than that must still
    hand back its result (the wait once returned None after a slice)."""
    transport = make_transport()
    client = transport.client()

    def slow_model(td):
        time.sleep(0.3)  # longer than a wait slice (csrc/core/sliced_wait.h)
        return double_model(td)

    with InferenceServer(slow_model, transport, max_batch_size=8):
        check(client(request(3)), 3)
        check(client.submit(request(4)).result(timeout=30), 4)


def test_model_errors_reach_the_caller_and_serving_goes_on():
    transport = make_transport()
    client = transport.client()
    calls = []

    def flaky(td):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("boom: the model failed")
        return double_model(td)

    with InferenceServer(flaky, transport, max_batch_size=8):
        with pytest.raises(ValueError, match="boom"):
            client(request(1))
        check(client(request(2)), 2)


class LocalOnlyError(Exception):
    """Pickles, but its __init__ needs two arguments: it does not unpickle."""

    def __init__(self, code, detail):
        super().__init__(f"error {code}: {detail}")


@pytest.mark.parametrize(
    "exc, text",
    [
        (LocalOnlyError(503, "the backend fell over"), "error 503"),
        (ValueError("€" * 1000), "€€€"),  # larger than the error area, not ASCII
    ],
    ids=["does-not-unpickle", "too-large"],
)
def test_exceptions_that_cannot_cross_arrive_as_their_text(exc, text):
    transport = make_transport()
    client = transport.client()

    def raises(td):
        raise exc

    with InferenceServer(raises, transport, max_batch_size=8):
        with pytest.raises(RuntimeError, match=f"the server raised .*{text}"):
            client(request(1))


def test_a_ticket_outlives_its_transport():
    transport = make_transport()
    future = transport.client().submit(request(4))
    _, callbacks = transport.drain(8)
    del transport
    import gc

    gc.collect()
    callbacks[0].set_result(double_model(request(4).unsqueeze(0))[0].set(
        "policy_version", torch.tensor(0)))
    check(future.result(timeout=30), 4)


def test_shutdown_during_the_hand_back_fails_cleanly():
    """A shutdown whose timeout ends while the worker copies results into
    the slots (the GIL released) ends each request once, without a crash."""
    big = TensorDict({"action": torch.zeros(2_000_000), "id": torch.zeros((), dtype=torch.long),
                      "policy_version": torch.zeros((), dtype=torch.long)})
    transport = SharedMemoryTransport(request_spec(), big, num_slots=4)
    client = transport.client()
    entered = threading.Event()

    def slow_big(td):
        entered.set()
        time.sleep(0.3)
        n = td.batch_size[0]
        return TensorDict({"action": torch.ones(n, 2_000_000), "id": td["id"].clone()},
                          batch_size=td.batch_size)

    for shutdown_after in (0.28, 0.3, 0.32):
        server = InferenceServer(slow_big, transport, max_batch_size=4).start()
        entered.clear()
        futures = [client.submit(request(i)) for i in range(4)]
        assert entered.wait(30)  # a forward is under way: the shutdown lands in it or after
        server.shutdown(timeout=shutdown_after)
        for i, f in enumerate(futures):
            try:
                assert f.result(timeout=30)["id"].item() == i  # its own result, or
            except ServerClosedError:  # the shutdown's error; nothing else
                pass
        server.shutdown(timeout=None)
    assert transport._segment.owned_slots == 0


EXIT_DURING_HAND_BACK = """
import sys, threading, time, torch
from tensordict import TensorDict
from batchserve import InferenceServer, SharedMemoryTransport
n, width = 16, 2 * 1024 * 1024  # 16 slots of 8 MiB results: a long GIL-free copy
transport = SharedMemoryTransport(TensorDict({"obs": torch.zeros(4)}),
                                  TensorDict({"big": torch.zeros(width)}), num_slots=n)
out = torch.ones(n, width)
entered = threading.Event()
def model(td):
    entered.set()
    time.sleep(1.0)
    return TensorDict({"big": out[: td.batch_size[0]]}, batch_size=td.batch_size)
server = InferenceServer(model, transport, max_batch_size=n, min_batch_size=n, timeout=5).start()
clients = [transport.client() for _ in range(n)]
def call(client):
    try:
        client(TensorDict({"obs": torch.zeros(4)}), timeout=30)
    except Exception:
        pass
threads = [threading.Thread(target=call, args=(c,), daemon=True) for c in clients]
for t in threads:
    t.start()
entered.wait(30)
server.shutdown(timeout=float(sys.argv[1]))  # overdue: the worker is still copying
for t in threads:  # the callers are done (their results or the shutdown's error)
    t.join(30)
print("exiting", flush=True)
"""


@pytest.mark.parametrize("shutdown_timeout", [1.01, 1.05])
def test_the_process_exits_cleanly_with_the_worker_in_the_hand_back(shutdown_timeout):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", EXIT_DURING_HAND_BACK, str(shutdown_timeout)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exiting" in done.stdout


def test_a_missing_response_key_fails_the_request_with_its_name():
    transport = make_transport()
    client = transport.client()

    def no_id(td):
        return TensorDict({"action": td["observation"][:, :2]}, batch_size=td.batch_size)

    with InferenceServer(no_id, transport, max_batch_size=8):
        with pytest.raises(KeyError, match="'id'"):
            client(request(1))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (TensorDict({"observation": torch.zeros(4)}), KeyError, "'id'"),
        (TensorDict({"observation": torch.zeros(5), "id": torch.tensor(1)}), ValueError, "shape"),
        (TensorDict({"observation": torch.zeros(4, dtype=torch.float64), "id": torch.tensor(1)}),
         ValueError, "dtype"),
        (TensorDict({"observation": torch.zeros(4, device="meta"), "id": torch.tensor(1)}),
         ValueError, "CPU"),
        ({"observation": torch.zeros(4), "id": torch.tensor(1)}, TypeError, "TensorDict"),
        (TensorDict({"observation": torch.zeros(3, 4), "id": torch.ones(3, dtype=torch.long)},
                    batch_size=[3]), ValueError, "batch size"),
    ],
    ids=["missing-key", "shape", "dtype", "not-cpu", "not-a-tensordict", "batched"],
)
def test_bad_inputs_raise_clearly_without_using_a_slot(bad, error, match):
    transport = make_transport(num_slots=4)
    client, other = transport.client(), transport.client()
    with InferenceServer(double_model, transport, max_batch_size=8):
        with pytest.raises(error, match=match):
            client(bad)
        with pytest.raises(error, match=match):
            client.submit(bad)
        assert transport._segment.owned_slots == 0
        check(other(request(4)), 4)  # other clients are unaffected
        check(client(request(5)), 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_leaves_are_refused():
    transport = make_transport()
    with pytest.raises(ValueError, match="CPU"):
        transport.client()(TensorDict({"observation": torch.zeros(4, device="cuda"),
                                       "id": torch.tensor(1)}))


def test_inputs_the_matcher_normalises():
    transport = make_transport()
    client = transport.client()
    with InferenceServer(double_model, transport, max_batch_size=8):
        strided = TensorDict({"observation": torch.full((4, 2), 6.0)[:, 0], "id": torch.tensor(6)})
        check(client(strided), 6)  # a non-contiguous leaf
        on_cpu = TensorDict({"observation": torch.full((4,), 7.0), "id": torch.tensor(7)},
                            device="cpu")
        check(client(on_cpu), 7)  # a TensorDict device the spec does not declare


def test_specs_are_validated_like_torchrl():
    with pytest.raises(ValueError, match="num_slots"):
        SharedMemoryTransport(request_spec(), response_spec(), num_slots=0)
    with pytest.raises(TypeError, match="tensor leaves"):
        SharedMemoryTransport(TensorDict({"x": torch.zeros(1), "s": "text"}), response_spec(),
                              num_slots=2)
    with pytest.raises(ValueError, match="at least one tensor leaf"):
        SharedMemoryTransport(TensorDict({}), response_spec(), num_slots=2)
    with pytest.raises(ValueError, match="CPU"):
        SharedMemoryTransport(TensorDict({"x": torch.zeros(1, device="meta")}), response_spec(),
                              num_slots=2)


def test_general_path_and_torchrl_protocol_write_results_into_slots():
    """A custom collate_fn takes the general path (slot views as items);
    torchrl's transport protocol (drain, resolve) works too."""
    transport = make_transport()
    client = transport.client()

    def collate(items):
        return torch.stack(items)

    with InferenceServer(double_model, transport, max_batch_size=8, collate_fn=collate) as server:
        check(client(request(8)), 8)
        assert server.stats()["fast_path_requests"] == 0
    # The protocol, driven by hand as a protocol server would.
    transport = make_transport()
    future = transport.client().submit(request(9))
    items, callbacks = transport.drain(8)
    assert len(items) == 1 and items[0]["id"].item() == 9
    transport.resolve(callbacks[0], double_model(items[0].unsqueeze(0))[0].set(
        "policy_version", torch.tensor(0)))
    check(future.result(timeout=30), 9)
    failing = transport.client().submit(request(10))
    _, callbacks = transport.drain(8)
    transport.resolve_exception(callbacks[0], RuntimeError("rejected"))
    with pytest.raises(RuntimeError, match="rejected"):
        failing.result(timeout=30)


def test_a_general_path_result_that_does_not_fit_fails_with_its_own_error_type():
    """The error raised while writing a result into its slot (on the general
    path, key by key) reaches the client with its type, like a model's."""
    transport = make_transport()
    client = transport.client()

    def wide_action(td):
        out = double_model(td)
        out["action"] = torch.zeros(td.batch_size[0], 5)
        return out

    with InferenceServer(wide_action, transport, max_batch_size=8,
                         collate_fn=lambda items: torch.stack(items)):
        with pytest.raises(ValueError, match="shape"):
            client(request(1))
        with pytest.raises(ValueError, match="shape"):
            client.submit(request(2)).result(timeout=30)


def test_shutdown_unlinks_and_later_calls_raise():
    transport = make_transport()
    client = transport.client()
    server = InferenceServer(double_model, transport, max_batch_size=8).start()
    check(client(request(1)), 1)
    assert os.path.exists(segment_path(transport))
    server.shutdown()
    assert not os.path.exists(segment_path(transport))
    with pytest.raises(ServerClosedError):
        client(request(2))
    server.start()  # a restart serves the clients that are attached
    check(client(request(3)), 3)
    server.shutdown()


# -- across processes ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_echo_across_processes(method, forkserver):
    ctx = forkserver if method == "forkserver" else mp.get_context(method)
    transport = make_transport(num_slots=8)
    with InferenceServer(double_model, transport, max_batch_size=8, timeout=0.001):
        run_actors(ctx, transport, processes=2 if method == "spawn" else 3, per_actor=100)
    assert transport._segment.owned_slots == 0


def exit_after_one_call(client) -> None:
    client(request(1))


def test_a_forked_child_leaves_the_segment_in_place():
    transport = make_transport()
    with InferenceServer(double_model, transport, max_batch_size=8):
        child = mp.get_context("fork").Process(target=exit_after_one_call,
                                               args=(transport.client(),))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert os.path.exists(segment_path(transport))  # only the creator removes it
        check(transport.client()(request(2)), 2)


def test_torch_multiprocessing_children():
    import torch.multiprocessing as tmp

    transport = make_transport(num_slots=4)
    with InferenceServer(double_model, transport, max_batch_size=8, timeout=0.001):
        run_actors(tmp.get_context("spawn"), transport, processes=1, per_actor=50)


def test_32_processes_lose_and_misroute_nothing(forkserver):
    transport = make_transport(num_slots=64)
    with InferenceServer(double_model, transport, max_batch_size=64, timeout=0.001) as server:
        run_actors(forkserver, transport, processes=32, per_actor=40)
        assert server.stats()["requests"] == 32 * 40
    assert transport._segment.owned_slots == 0


# An idle server with a long timeout still looks for dead actors' slots
# every 0.1 s (it wakes for that, not only at its batching timeout).
@pytest.mark.parametrize("server_timeout", [0.001, 600.0])
def test_killed_actor_does_not_keep_its_slot(forkserver, server_timeout):
    transport = make_transport(num_slots=2)
    model = BlockingModel(then=double_model)
    with InferenceServer(model, transport, max_batch_size=8, timeout=server_timeout):
        started = forkserver.Event()
        child = forkserver.Process(target=call_and_hang, args=(transport.client(), started))
        child.start()
        assert started.wait(60) and model.entered.wait(60)  # its request is being served
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        model.release.set()
        every_slot_serves(transport)  # the dead actor's slot was freed by the server
        assert transport._queue.reaped_slots == 1


def test_a_forked_child_dropping_inherited_futures_leaves_them_to_the_parent():
    transport = make_transport(num_slots=8)
    model = BlockingModel(then=double_model)
    with InferenceServer(model, transport, max_batch_size=1):
        client = transport.client()
        futures = [client.submit(request(i)) for i in range(4)]
        assert model.entered.wait(30)  # request 0 in the forward, 1..3 queued
        pid = os.fork()
        if pid == 0:  # the child's copies are dropped; the requests stay the parent's
            del futures
            gc.collect()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        model.release.set()
        for i, f in enumerate(futures):
            check(f.result(timeout=30), i)
    assert transport._segment.owned_slots == 0


def test_slots_of_an_actor_killed_before_its_requests_were_served_come_back(forkserver):
    transport = make_transport(num_slots=2)
    submitted = forkserver.Event()
    child = forkserver.Process(target=submit_and_hang, args=(transport.client(), 2, submitted))
    child.start()
    try:
        assert submitted.wait(60)
        assert transport._segment.owned_slots == 2  # both held, no server yet
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    with InferenceServer(double_model, transport, max_batch_size=8):
        every_slot_serves(transport)
    assert transport._segment.owned_slots == 0


def test_dead_server_process_unblocks_clients_promptly(forkserver):
    transport = make_transport(num_slots=4)
    ready = forkserver.Event()
    server = forkserver.Process(target=serve_in_child, args=(transport, ready))
    server.start()
    try:
        assert ready.wait(60)
        client = transport.client()
        errors = []

        def call():
            try:
                client(request(1))
            except BaseException as exc:
                errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 30  # hang guard
        segment = transport._segment
        while not (segment.owned_slots == 1 and segment.ready_count == 0):
            assert time.monotonic() < deadline  # submitted, then taken into the endless forward
            time.sleep(0.01)
        os.kill(server.pid, signal.SIGKILL)
        caller.join(60)  # hang guard: the caller must come back, not wait forever
        assert not caller.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ServerClosedError)
        assert "is gone" in str(errors[0])
        with pytest.raises(ServerClosedError, match="is gone"):
            client(request(2), timeout=30)  # later calls too
        # A new server recovers what the dead one held and serves again.
        with InferenceServer(double_model, transport, max_batch_size=8):
            check(client(request(3), timeout=30), 3)
        assert transport._segment.owned_slots == 0
    finally:
        server.kill()
        server.join(30)
        transport.close()


def test_a_child_that_outlives_the_server_gets_a_clear_error(forkserver):
    transport = make_transport()
    attached, go, results = forkserver.Event(), forkserver.Event(), forkserver.Queue()
    child = forkserver.Process(target=call_when_told,
                               args=(transport.client(), attached, go, results))
    with InferenceServer(double_model, transport, max_batch_size=8):
        child.start()
        assert attached.wait(60)
        check(transport.client()(request(1)), 1)
    go.set()
    try:
        outcome = results.get(timeout=60)
    finally:
        child.join(30)
    assert outcome.startswith("ServerClosedError") and "shut down" in outcome


def test_library_exports_it():
    assert batchserve.SharedMemoryTransport is SharedMemoryTransport

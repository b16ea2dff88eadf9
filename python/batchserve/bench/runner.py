"""One measurement: a system serving N actors for a while.

Latency is taken at the caller with perf_counter_ns around each call; only
calls that complete while recording is on count. Warm-up runs first and is
excluded. Batch sizes and forward times come from a wrapper around the
model (only batches served inside the window), so every system is measured
the same way; a process server's wrapper, in its child, records into shared
memory the parent reads. CPU time counts the measuring process, the actor
processes and a server process. A server that stops, an actor that fails, or a run that
overstays its deadline ends the measurement with a BenchError; actor
processes are always terminated.

The server's own counters are reset after the warm-up; its ``stats()`` just
after the reset and at the end give the share of the measured requests the
fast path served (``Measurement.fast_path``, see
``metrics.fast_path_summary``; all None for a server that does not report
it). A scenario's interaction type is set around the whole measurement
(tensordict's setting is process-wide).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from array import array
from dataclasses import dataclass, field

import numpy as np
import torch
from tensordict import TensorDict

from batchserve.batching.native import new_tensordict
from batchserve.bench.metrics import fast_path_summary, nearest_rank
from batchserve.bench.scenario import Scenario
from batchserve.bench.systems import (
    LIMITS,
    NULL,
    BenchError,
    make_server,
    make_transport,
    require_torchrl,
)
from batchserve.bench.workload import (
    RecordingModel,
    client_factory,
    interaction_context,
    leaf_specs,
    leaves_of,
    make_leaves,
    make_policy,
    recording_model,
    request,
    wrap_client,
)

# Hang guards, generous: on a loaded 2-core machine 32 processes start slowly.
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 10.0
_POLL_S = 0.02


@dataclass
class Measurement:
    system: str
    actors: int
    round: int
    requests: int
    seconds: float
    latencies_ns: np.ndarray
    batch_sizes: dict = field(default_factory=dict)
    forward_ns: list = field(default_factory=list)
    queue_ms_p50: float = float("nan")
    cpu_s: float = 0.0
    rss_growth_mb: float = 0.0
    # metrics.fast_path_summary of the server's stats over the measurement;
    # None for the bare model call.
    fast_path: dict | None = None


def _rss_mb(pid: int | str = "self") -> float:
    """Resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class _RssPeak:
    """Peak resident memory of this process (plus `pids`) over the window."""

    def __init__(self, pids=()):
        self._pids = list(pids)
        self.start = self._now()
        self.peak = self.start

    def _now(self) -> float:
        return _rss_mb() + sum(_rss_mb(pid) for pid in self._pids)

    def sample(self) -> None:
        self.peak = max(self.peak, self._now())

    @property
    def growth_mb(self) -> float:
        return max(0.0, self.peak - self.start)


def requests_per_actor(scenario: Scenario, actors: int) -> list[int | None]:
    """Each actor's share of a request-count run (the first ones take the
    remainder); None for every actor of a run by duration."""
    if scenario.requests is None:
        return [None] * actors
    base, extra = divmod(scenario.requests, actors)
    return [base + (1 if i < extra else 0) for i in range(actors)]


def _mp_context():
    """Actor and server processes: forkserver, with torch and this module
    loaded once in the server that forks them."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tensordict", "batchserve.bench.runner"])
    return ctx


def _process_cpu_s(pid: int | None) -> float:
    """CPU time (user + system) another process has used so far (Linux
    /proc; 0 where unavailable)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _cpu_s(server_pid: int | None) -> float:
    """CPU time used so far by this process and the server process, if any."""
    return time.process_time() + _process_cpu_s(server_pid)


def _server_pid(server) -> int | None:
    """The pid of a ProcessInferenceServer's child (batchserve's and
    torchrl's both keep it as ``_process``), None for a thread server."""
    process = getattr(server, "_process", None)
    return process.pid if process is not None else None


def _warm_up(scenario: Scenario, check) -> None:
    """Lets the actors run for the warm-up, excluded from the measurement."""
    end = time.monotonic() + scenario.warmup
    while time.monotonic() < end:
        check()
        time.sleep(min(_POLL_S, max(0.0, end - time.monotonic())))


def _requests_deadline_s(scenario: Scenario) -> float:
    """How long a request-count window may take before it counts as hung."""
    return _START_TIMEOUT_S + 0.01 * (scenario.requests or 0)


def _window(scenario: Scenario, finished, check, rss: _RssPeak, tick) -> None:
    """Waits out the measured window: `duration` seconds, or until
    `finished()` (request-count runs). Calls `check()` (which raises on a
    failure) and samples memory every _POLL_S."""
    start = time.monotonic()
    while True:
        check()
        rss.sample()
        elapsed = time.monotonic() - start
        if scenario.requests is None:
            if elapsed >= scenario.duration:
                return
            if tick:
                tick(elapsed / scenario.duration)
            time.sleep(min(_POLL_S, scenario.duration - elapsed))
        else:
            if finished():
                return
            if elapsed > _requests_deadline_s(scenario):
                raise BenchError(
                    f"{scenario.requests} requests did not complete within {elapsed:.0f} s"
                )
            time.sleep(_POLL_S)


def _served(system, actors, round_, samples, span_ns, window, stats, cpu_s, rss) -> Measurement:
    """A server measurement from what its window recorded; ``stats`` is the
    server's (start, end) pair of stats() snapshots."""
    start_stats, stats = stats
    batch_sizes, forward_ns = window
    return Measurement(
        system=system,
        actors=actors,
        round=round_,
        requests=len(samples),
        seconds=span_ns / 1e9,
        latencies_ns=samples,
        batch_sizes=batch_sizes,
        forward_ns=forward_ns,
        queue_ms_p50=float(stats.get("p50_queue_ms", float("nan"))),
        cpu_s=cpu_s,
        rss_growth_mb=rss.growth_mb,
        fast_path=fast_path_summary(stats, start_stats),
    )


def measure(system: str, scenario: Scenario, actors: int, round_: int, tick=None) -> Measurement:
    """Runs one measurement; `tick(fraction)` reports progress."""
    if scenario.client == "policy_client":
        require_torchrl("client 'policy_client' (torchrl's PolicyClientModule)")
    with interaction_context(scenario):
        if scenario.actors == "threads":
            m = _measure_threads(system, scenario, actors, round_, tick)
        else:
            m = _measure_processes(system, scenario, actors, round_, tick)
    if m.requests == 0:
        raise BenchError(f"{system}: no request completed while measuring")
    return m


def _thread_server(system, scenario, actors):
    """A (not yet started) server of ``system`` for ``actors`` actor threads:
    its recording model, the server, and a factory of one actor's client."""
    model = recording_model(scenario)
    ctx = _mp_context() if scenario.server == "process" else None
    transport = make_transport(system, scenario, mp_context=ctx, actors=actors,
                               policy=model.policy)
    server = make_server(system, model, transport, scenario, mp_context=ctx, actors=actors)
    if scenario.server == "process" and system != NULL:
        # Made before the server starts: torchrl's shared-memory clients
        # register with the transport its child inherits.
        made = iter([transport.client() for _ in range(actors)])
        new_client = lambda: wrap_client(scenario, next(made))  # noqa: E731
    else:
        new_client = client_factory(scenario, transport)
    return model, server, new_client


def _measure_threads(system, scenario, actors, round_, tick) -> Measurement:
    model, server, new_client = _thread_server(system, scenario, actors)
    leaves = make_leaves(scenario)
    quotas = requests_per_actor(scenario, actors)
    recording, stop, failed = threading.Event(), threading.Event(), threading.Event()
    started = threading.Barrier(actors + 1)
    latencies = [array("q") for _ in range(actors)]
    end_ns = [0] * actors  # when each actor made its last recorded call
    finished = [False] * actors
    errors: list[BaseException] = []

    def actor(index: int) -> None:
        record = latencies[index].append
        quota = quotas[index]
        clock = time.perf_counter_ns
        try:
            client = new_client()
            started.wait(_START_TIMEOUT_S)
            while not stop.is_set() and quota != 0:
                td = request(leaves)
                t0 = clock()
                client(td)
                t1 = clock()
                if recording.is_set():
                    record(t1 - t0)
                    end_ns[index] = t1
                    if quota is not None and len(latencies[index]) >= quota:
                        break
        except BaseException as exc:  # reported by check()
            errors.append(exc)
            failed.set()
        finally:
            finished[index] = True

    def check() -> None:  # the server first: a dead server also fails its callers
        if not server.is_alive:
            raise BenchError(f"the {system} server stopped during the run")
        if failed.is_set():
            raise BenchError(f"an actor failed: {errors[0]!r}") from errors[0]

    server.start()
    threads = [threading.Thread(target=actor, args=(i,), daemon=True) for i in range(actors)]
    try:
        for t in threads:
            t.start()
        try:
            started.wait(_START_TIMEOUT_S)
        except threading.BrokenBarrierError:
            check()
            raise BenchError("actor threads did not start in time") from None
        _warm_up(scenario, check)
        server.stats(reset=True)
        start_stats = server.stats()
        server_pid = _server_pid(server)
        rss = _RssPeak([server_pid] if server_pid else ())
        model.start()
        cpu0 = _cpu_s(server_pid)
        t0 = time.perf_counter_ns()
        recording.set()
        _window(scenario, lambda: all(finished), check, rss, tick)
        recording.clear()
        t1 = time.perf_counter_ns()
        cpu = _cpu_s(server_pid) - cpu0
        batch_sizes, forward_ns = model.stop()
        check()
        stats = server.stats()
    finally:
        stop.set()
        if server.is_alive:  # else stuck callers may never return: they are daemons
            deadline = time.monotonic() + _STOP_TIMEOUT_S
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
        server.shutdown()
    if system in LIMITS:  # with the actors stopped: they would slow it
        batch_sizes, forward_ns = _forwards_at_full_batch(model, scenario, actors)
    if scenario.requests is not None:
        t1 = max(end_ns)  # the last request, not the next poll of the window
    samples = np.concatenate([np.frombuffer(actor_latencies, dtype=np.int64)
                              for actor_latencies in latencies])
    return _served(system, actors, round_, samples, t1 - t0, (batch_sizes, forward_ns),
                   (start_stats, stats), cpu, rss)


# Forwards timed for the null server's row.
_NULL_FORWARDS = 64


def _forwards_at_full_batch(model: RecordingModel, scenario: Scenario, actors: int):
    """The null server runs no model; its row records what the model alone
    costs at the batch size the actors allow (all of them, up to
    max_batch_size), timed after the window, so that the limit it reports
    can count the model's share (``report.limit_lines``)."""
    size = max(1, min(actors, scenario.max_batch_size))
    batch = request(make_leaves(scenario)).unsqueeze(0).expand(size).clone()
    if scenario.device != "cpu":
        model.to(scenario.device)
        batch = batch.to(scenario.device)
    model.start()
    with torch.no_grad():
        for _ in range(_NULL_FORWARDS):
            model(batch)
    return model.stop()


def _process_actor(client, specs, quota, recording, stop, results, index, cpus) -> None:
    """One actor process: calls the server until told to stop (or its quota
    is done); reports its latencies, its CPU time and its recorded span.
    ``specs``: workload.leaf_specs, the leaves of its requests; ``cpus``: the
    CPUs the run has (``--cpus``, taskset), which a forkserver started
    before the run was confined would not pass on."""
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        leaves = leaves_of(specs)
        latencies = array("q")
        clock = time.perf_counter_ns
        cpu_start = None
        first_ns = last_ns = 0
        results.put(("ready", index, None))
        while not stop.is_set() and quota != 0:
            td = request(leaves)
            t0 = clock()
            client(td)
            t1 = clock()
            if recording.is_set():
                if cpu_start is None:
                    cpu_start, first_ns = time.process_time(), t0
                latencies.append(t1 - t0)
                last_ns = t1
                if quota is not None and len(latencies) >= quota:
                    break
        cpu = time.process_time() - cpu_start if cpu_start is not None else 0.0
        results.put(("done", index, (latencies.tobytes(), cpu, first_ns, last_ns)))
    except BaseException as exc:  # reported by the parent
        results.put(("error", index, repr(exc)))


class _Inbox:
    """The parent's view of its actor processes' messages."""

    def __init__(self, results):
        self._results = results
        self.ready: set[int] = set()
        self.done: dict[int, tuple] = {}

    def poll(self) -> None:
        """Takes every waiting message; raises on an actor's error."""
        while True:
            try:
                kind, index, payload = self._results.get_nowait()
            except queue.Empty:
                return
            if kind == "error":
                raise BenchError(f"actor process {index} failed: {payload}")
            if kind == "ready":
                self.ready.add(index)
            else:
                self.done[index] = payload

    def wait(self, what: str, count: int, timeout: float, check) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ready if what == "ready" else self.done) < count:
            check()
            if time.monotonic() > deadline:
                raise BenchError(f"actor processes did not report '{what}' within {timeout:.0f} s")
            time.sleep(_POLL_S)


def _measure_processes(system, scenario, actors, round_, tick) -> Measurement:
    ctx = _mp_context()
    model = recording_model(scenario)
    transport = make_transport(system, scenario, mp_context=ctx, actors=actors,
                               policy=model.policy)
    clients = [transport.client() for _ in range(actors)]
    server = make_server(system, model, transport, scenario, mp_context=ctx)
    quotas = requests_per_actor(scenario, actors)
    recording, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    processes = [
        ctx.Process(
            target=_process_actor,
            args=(clients[i], leaf_specs(scenario), quotas[i], recording, stop, results, i,
                  cpus),
            daemon=True,
        )
        for i in range(actors)
    ]
    inbox = _Inbox(results)

    def check() -> None:
        if not server.is_alive:
            raise BenchError(f"the {system} server stopped during the run")
        inbox.poll()
        dead = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0)]
        if dead:
            raise BenchError(f"actor process {dead[0]} died "
                             f"(exit code {processes[dead[0]].exitcode})")

    server.start()
    try:
        for p in processes:
            p.start()
        inbox.wait("ready", actors, _START_TIMEOUT_S, check)
        _warm_up(scenario, check)
        server.stats(reset=True)
        start_stats = server.stats()
        server_pid = _server_pid(server)
        rss = _RssPeak([p.pid for p in processes] + ([server_pid] if server_pid else []))
        model.start()
        cpu0 = _cpu_s(server_pid)
        t0 = time.perf_counter_ns()
        recording.set()
        _window(scenario, lambda: len(inbox.done) == actors, check, rss, tick)  # check() polls
        recording.clear()
        t1 = time.perf_counter_ns()
        cpu = _cpu_s(server_pid) - cpu0
        batch_sizes, forward_ns = model.stop()
        stop.set()
        inbox.wait("done", actors, _STOP_TIMEOUT_S + _START_TIMEOUT_S, check)
        stats = server.stats()
    finally:
        stop.set()
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in processes:  # no orphans, whatever happened
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(_STOP_TIMEOUT_S)
        server.shutdown()
    if system in LIMITS:  # with the actors stopped: they would slow it
        batch_sizes, forward_ns = _forwards_at_full_batch(model, scenario, actors)
    done = [inbox.done[i] for i in sorted(inbox.done)]
    if scenario.requests is not None:  # the children's own span, not the polling
        spans = [(first, last) for _, _, first, last in done if last]
        if spans:
            t0, t1 = min(s[0] for s in spans), max(s[1] for s in spans)
    samples = (
        np.concatenate([np.frombuffer(d[0], dtype=np.int64) for d in done])
        if done
        else np.zeros(0, dtype=np.int64)
    )
    return _served(system, actors, round_, samples, t1 - t0, (batch_sizes, forward_ns),
                   (start_stats, stats), cpu + sum(d[1] for d in done), rss)


def bare_call(policy, scenario: Scenario):
    """An actor calling ``policy`` itself: ``make()`` builds the TensorDict
    of batch size [1] it would build (not timed, as no actor's request to a
    server is), ``call(td)`` runs the model on it; on a GPU ``call`` also
    copies the input to the device and the output back, waited for, as the
    server's path does."""
    on_device = scenario.device != "cpu"
    if on_device:
        policy.to(scenario.device)
    leaves = {key: leaf.unsqueeze(0) for key, leaf in make_leaves(scenario).items()}

    def make():
        return TensorDict(dict(leaves), batch_size=[1])

    def call(td):
        if on_device:
            td = td.to(scenario.device)
        out = policy(td)
        if on_device:
            out = out.to("cpu")
            torch.cuda.synchronize()
        return out

    return make, call


class NoFloor(Exception):
    """The model's output is not an exact TensorDict: :func:`floor_call`'s
    row steps do not apply to it."""


def floor_call(policy, scenario: Scenario):
    """The steps any server that hands a row back takes around the forward,
    in their cheapest form and without a server (None on a GPU, whose
    server path has copies of its own): ``call(td)`` takes ``td``, one
    unbatched request, unsqueezes its leaves into a TensorDict of batch size
    [1], runs ``policy`` on it and returns the output's row as a TensorDict
    of batch size [] (an entry that is the request's own tensor passed
    through, as a ``TensorDictModule`` passes its input, copied: the caller
    refills it). What a one-actor overhead cannot go below: the floor under
    it. ``batchserve.batching.lone_request`` takes these steps for an
    inline call, with its checks and the policy-version stamp. Raises
    :class:`NoFloor` for a model whose output is not an exact TensorDict."""
    if scenario.device != "cpu":
        return None
    one, empty = torch.Size([1]), torch.Size([])

    def call(td):
        leaves = td._tensordict
        output = policy(new_tensordict(
            [(key, leaf.unsqueeze(0)) for key, leaf in leaves.items()], one, None))
        if type(output) is not TensorDict:
            raise NoFloor(f"the model returned a {type(output).__name__}")
        row = {}
        for key, value in output._tensordict.items():
            own = leaves.get(key)
            passed = own is not None and type(value) is torch.Tensor and value._base is own
            row[key] = own.clone() if passed else value[0]
        return new_tensordict(row, empty, output.device)

    return call


def _bare_model(policy, scenario: Scenario) -> RecordingModel:
    """``policy`` inside the wrapper every server's forward runs in (~1 µs
    a call, so that the overhead figures do not count the harness's own
    recording), without the scenario's server_nice: bare calls run on the
    harness's own threads."""
    return RecordingModel(policy, scenario.device, scenario.torch_threads)


def measure_bare(scenario: Scenario, tick=None) -> Measurement:
    """model(td) at batch size 1 in a loop, one thread: the baseline of
    every overhead (see :func:`bare_call`). It runs under the scenario's
    interaction type, as the servers' forwards do."""
    make, call = bare_call(_bare_model(make_policy(scenario), scenario), scenario)
    latencies = array("q")
    clock = time.perf_counter_ns

    with torch.no_grad(), interaction_context(scenario):
        end = time.perf_counter() + scenario.warmup
        while time.perf_counter() < end:
            call(make())
        cpu0, t0 = time.process_time(), time.perf_counter()
        limit = scenario.requests
        while True:
            td = make()
            s = clock()
            call(td)
            latencies.append(clock() - s)
            elapsed = time.perf_counter() - t0
            if limit is not None:
                if len(latencies) >= limit:
                    break
            elif elapsed >= scenario.duration:
                break
            if tick and len(latencies) % 256 == 0:
                tick(elapsed / scenario.duration if limit is None else len(latencies) / limit)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    samples = np.frombuffer(latencies, dtype=np.int64).copy()
    return Measurement(
        system="bare",
        actors=1,
        round=0,
        requests=len(samples),
        seconds=seconds,
        latencies_ns=samples,
        batch_sizes={1: len(samples)},
        cpu_s=cpu,
    )


# Calls per block of the interleaved overhead measurement: long enough for
# each path to run hot (as in its own loop), short enough (~10-70 ms here)
# that the machine's speed, which drifts by up to 2x within seconds on the
# project's VM, is the same for both.
OVERHEAD_BLOCK = 128
# How often the measurement's main thread looks at its actor thread (each
# look takes the GIL the actor needs: rarely).
_OVERHEAD_POLL_S = 0.1


def measure_overhead(system: str, scenario: Scenario, tick=None) -> dict:
    """One actor thread's overhead with ``system``: blocks of
    :data:`OVERHEAD_BLOCK` bare calls of the model the server serves (see
    :func:`bare_call`), of its floor (see :func:`floor_call`; CPU scenarios)
    and of calls through the system's client, alternated for the scenario's
    ``duration`` (after its ``warmup``), or until each kind has ``requests``
    calls, in whole blocks. The p50 of each over the same seconds, and their
    differences from the bare call's: unlike the difference of the bare
    row's p50 and the one-actor row's, measured seconds or minutes apart,
    it does not take the machine's drift for overhead. Thread actors only."""
    if scenario.actors != "threads":
        raise BenchError("the interleaved overhead is measured for thread actors")
    if scenario.client == "policy_client":
        require_torchrl("client 'policy_client' (torchrl's PolicyClientModule)")
    model, server, new_client = _thread_server(system, scenario, 1)
    bare_model = _bare_model(model.policy, scenario)
    make, bare = bare_call(bare_model, scenario)
    floor = floor_call(bare_model, scenario)  # None: no floor (a GPU, or see actor())
    leaves = make_leaves(scenario)
    clock = time.perf_counter_ns
    times = {"bare": array("q"), "floor": array("q"), system: array("q")}

    def bare_block(record) -> None:
        with torch.no_grad():
            for _ in range(OVERHEAD_BLOCK):
                td = make()
                s = clock()
                bare(td)
                record(clock() - s)

    def floor_block(record) -> None:
        if floor is None:
            return
        with torch.no_grad():
            for _ in range(OVERHEAD_BLOCK):
                td = request(leaves)
                s = clock()
                floor(td)
                record(clock() - s)

    def served_block(client, record) -> None:
        for _ in range(OVERHEAD_BLOCK):
            td = request(leaves)
            s = clock()
            client(td)
            record(clock() - s)

    limit = scenario.requests
    progress = [0.0]  # the measured share done, for tick()
    errors: list[BaseException] = []

    def actor() -> None:  # a daemon thread: a stuck call cannot hang the harness
        nonlocal floor
        try:
            client = new_client()
            if floor is not None:
                try:  # one call tells whether the model's output has a floor
                    with torch.no_grad():
                        floor(request(leaves))
                except NoFloor:
                    floor = None
            end = time.perf_counter() + scenario.warmup
            while time.perf_counter() < end:
                bare_block(lambda ns: None)
                floor_block(lambda ns: None)
                served_block(client, lambda ns: None)
            t0 = time.perf_counter()
            while True:
                elapsed = time.perf_counter() - t0
                progress[0] = (elapsed / scenario.duration if limit is None
                               else len(times[system]) / limit)
                if progress[0] >= 1.0:
                    return
                bare_block(times["bare"].append)
                floor_block(times["floor"].append)
                served_block(client, times[system].append)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with interaction_context(scenario):
        server.start()
        try:
            thread = threading.Thread(target=actor, daemon=True)
            thread.start()
            deadline = time.monotonic() + scenario.warmup + (
                _START_TIMEOUT_S + scenario.duration if limit is None
                else _requests_deadline_s(scenario))  # (which counts _START_TIMEOUT_S)
            while thread.is_alive():
                thread.join(_OVERHEAD_POLL_S)
                if tick:
                    tick(min(progress[0], 1.0))
                if not server.is_alive:
                    raise BenchError(f"the {system} server stopped during the run")
                if time.monotonic() > deadline:
                    raise BenchError(f"the {system} overhead measurement did not finish in time")
            if errors:
                raise BenchError(f"the overhead measurement failed: {errors[0]!r}") from errors[0]
        finally:
            server.shutdown()
    p50 = {name: nearest_rank(np.sort(np.frombuffer(t, dtype=np.int64)), 0.5) / 1e3
           for name, t in times.items() if len(t)}  # as the table's p50s are taken
    floor_p50 = p50.get("floor")
    return {"bare_p50_us": p50["bare"], "p50_us": p50[system],
            "overhead_us": p50[system] - p50["bare"], "calls": len(times[system]),
            "floor_p50_us": floor_p50,
            "floor_us": None if floor_p50 is None else floor_p50 - p50["bare"]}

"""One measurement: a system serving N actors for a while.

Latency is taken at the caller with perf_counter_ns around each call; only
calls that complete while recording is on count. Warm-up runs first and is
excluded. Batch sizes and forward times come from a wrapper around the
model, so every system is measured the same way.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import resource
import threading
import time
from array import array
from dataclasses import dataclass, field

import numpy as np
import torch
from tensordict import TensorDict

from batchserve.bench.scenario import Scenario
from batchserve.bench.systems import BenchError, make_server, make_transport
from batchserve.bench.workload import RecordingModel, make_observation, make_policy, request

# Generous hang guards: on a loaded 2-core machine 32 processes start slowly.
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0


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


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _wait_or_fail(failed: threading.Event, seconds: float, errors: list) -> None:
    if failed.wait(seconds):
        raise BenchError(f"an actor failed: {errors[0]!r}") from errors[0]


def measure(system: str, scenario: Scenario, actors: int, round_: int, tick=None) -> Measurement:
    """Runs one measurement; `tick(fraction)` reports progress."""
    if scenario.actors == "threads":
        return _measure_threads(system, scenario, actors, round_, tick)
    return _measure_processes(system, scenario, actors, round_, tick)


def _recording_window(scenario: Scenario, done, tick) -> None:
    """Waits out the measured window: `duration` seconds, or until `done()`
    (request-count runs); polls `tick` for the progress display."""
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        if scenario.requests is None:
            if elapsed >= scenario.duration:
                return
            if tick:
                tick(elapsed / scenario.duration)
            time.sleep(min(0.05, scenario.duration - elapsed))
        else:
            if done():
                return
            time.sleep(0.01)


def _measure_threads(system, scenario, actors, round_, tick) -> Measurement:
    model = RecordingModel(make_policy(scenario))
    transport = make_transport(system, scenario)
    server = make_server(system, model, transport, scenario)
    observation = make_observation(scenario)
    quota = None if scenario.requests is None else max(1, scenario.requests // actors)
    recording, stop, failed = threading.Event(), threading.Event(), threading.Event()
    started = threading.Barrier(actors + 1)
    latencies = [array("q") for _ in range(actors)]
    finished = [False] * actors
    errors: list[BaseException] = []

    def actor(index: int) -> None:
        client = transport.client()
        record = latencies[index].append
        clock = time.perf_counter_ns
        started.wait()
        try:
            while not stop.is_set():
                td = request(observation)
                t0 = clock()
                client(td)
                t1 = clock()
                if recording.is_set():
                    record(t1 - t0)
                    if quota is not None and len(latencies[index]) >= quota:
                        break
        except BaseException as exc:  # reported by the runner
            errors.append(exc)
            failed.set()
        finally:
            finished[index] = True

    rss0 = _max_rss_mb()
    server.start()
    threads = [threading.Thread(target=actor, args=(i,), daemon=True) for i in range(actors)]
    try:
        for t in threads:
            t.start()
        started.wait(_START_TIMEOUT_S)
        _wait_or_fail(failed, scenario.warmup, errors)
        model.reset()
        server.stats(reset=True)
        cpu0, t0 = time.process_time(), time.perf_counter()
        recording.set()
        _recording_window(scenario, lambda: all(finished) or failed.is_set(), tick)
        recording.clear()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        _wait_or_fail(failed, 0, errors)
        if not server.is_alive:
            raise BenchError(f"the {system} server stopped during the run")
        stats = server.stats()
    finally:
        stop.set()
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        server.shutdown()
    samples = np.concatenate([np.frombuffer(l, dtype=np.int64) for l in latencies])
    return Measurement(
        system=system,
        actors=actors,
        round=round_,
        requests=len(samples),
        seconds=seconds,
        latencies_ns=samples,
        batch_sizes=dict(model.batch_sizes),
        forward_ns=list(model.forward_ns),
        queue_ms_p50=float(stats.get("p50_queue_ms", float("nan"))),
        cpu_s=cpu,
        rss_growth_mb=max(0.0, _max_rss_mb() - rss0),
    )


def _process_actor(client, shape, dtype, quota, recording, stop, results, index) -> None:
    """One actor process: calls the server until told to stop."""
    try:
        dt = getattr(torch, dtype)
        observation = torch.randn(shape).to(dt) if dt.is_floating_point else torch.randint(0, 255, shape, dtype=dt)
        latencies = array("q")
        clock = time.perf_counter_ns
        cpu_start = None
        results.put(("ready", index, None, 0.0))
        while not stop.is_set():
            td = TensorDict({"observation": observation})
            t0 = clock()
            client(td)
            t1 = clock()
            if recording.is_set():
                if cpu_start is None:
                    cpu_start = time.process_time()
                latencies.append(t1 - t0)
                if quota is not None and len(latencies) >= quota:
                    break
        cpu = time.process_time() - cpu_start if cpu_start is not None else 0.0
        results.put(("done", index, latencies.tobytes(), cpu))
    except BaseException as exc:  # reported by the parent
        results.put(("error", index, repr(exc), 0.0))


def _measure_processes(system, scenario, actors, round_, tick) -> Measurement:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tensordict", "batchserve.bench.runner"])
    model = RecordingModel(make_policy(scenario))
    transport = make_transport(system, scenario, mp_context=ctx)
    clients = [transport.client() for _ in range(actors)]
    server = make_server(system, model, transport, scenario)
    quota = None if scenario.requests is None else max(1, scenario.requests // actors)
    recording, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    processes = [
        ctx.Process(
            target=_process_actor,
            args=(clients[i], list(scenario.observation_shape), scenario.observation_dtype,
                  quota, recording, stop, results, i),
            daemon=True,
        )
        for i in range(actors)
    ]
    done: dict[int, tuple] = {}

    def collect(kind: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < count:
            try:
                message = results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"actor processes did not report '{kind}' in time") from None
            if message[0] == "error":
                raise BenchError(f"actor process {message[1]} failed: {message[2]}")
            if message[0] == kind:
                seen += 1
                if kind == "done":
                    done[message[1]] = message
            if time.monotonic() > deadline:
                raise BenchError(f"actor processes did not report '{kind}' in time")

    rss0 = _max_rss_mb()
    server.start()
    try:
        for p in processes:
            p.start()
        collect("ready", actors, _START_TIMEOUT_S)
        time.sleep(scenario.warmup)
        model.reset()
        server.stats(reset=True)
        cpu0, t0 = time.process_time(), time.perf_counter()
        recording.set()
        if scenario.requests is None:
            _recording_window(scenario, lambda: True, tick)
        else:
            collect("done", actors, _START_TIMEOUT_S)
        recording.clear()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stop.set()
        if scenario.requests is None:
            collect("done", actors, _STOP_TIMEOUT_S)
        if not server.is_alive:
            raise BenchError(f"the {system} server stopped during the run")
        stats = server.stats()
    finally:
        stop.set()
        for p in processes:
            p.join(5.0)
        for p in processes:  # no orphans, whatever happened
            if p.is_alive():
                p.terminate()
                p.join(5.0)
        server.shutdown()
    samples = np.concatenate(
        [np.frombuffer(done[i][2], dtype=np.int64) for i in sorted(done)]
    ) if done else np.zeros(0, dtype=np.int64)
    return Measurement(
        system=system,
        actors=actors,
        round=round_,
        requests=len(samples),
        seconds=seconds,
        latencies_ns=samples,
        batch_sizes=dict(model.batch_sizes),
        forward_ns=list(model.forward_ns),
        queue_ms_p50=float(stats.get("p50_queue_ms", float("nan"))),
        cpu_s=cpu + sum(done[i][3] for i in done),
        rss_growth_mb=max(0.0, _max_rss_mb() - rss0),
    )


def measure_bare(scenario: Scenario, tick=None) -> Measurement:
    """model(td) at batch size 1 in a loop, one thread: the floor."""
    policy = make_policy(scenario)
    if scenario.device != "cpu":
        policy.to(scenario.device)
    observation = make_observation(scenario).unsqueeze(0).to(scenario.device)
    latencies = array("q")
    clock = time.perf_counter_ns
    with torch.no_grad():
        end = time.perf_counter() + scenario.warmup
        while time.perf_counter() < end:
            policy(TensorDict({"observation": observation}, batch_size=[1]))
        cpu0, t0 = time.process_time(), time.perf_counter()
        limit = scenario.requests
        while True:
            td = TensorDict({"observation": observation}, batch_size=[1])
            s = clock()
            policy(td)
            latencies.append(clock() - s)
            elapsed = time.perf_counter() - t0
            if limit is not None:
                if len(latencies) >= limit:
                    break
            elif elapsed >= scenario.duration:
                break
            if tick and len(latencies) % 256 == 0:
                tick(elapsed / scenario.duration if limit is None else len(latencies) / limit)
    samples = np.frombuffer(latencies, dtype=np.int64).copy()
    return Measurement(
        system="bare",
        actors=1,
        round=0,
        requests=len(samples),
        seconds=time.perf_counter() - t0,
        latencies_ns=samples,
        batch_sizes={1: len(samples)},
        cpu_s=time.process_time() - cpu0,
    )

"""Stress and soak: many actors, many requests, servers restarted at random
moments; zero lost, duplicated or misrouted results.

Two lanes run at once, each an :class:`~batchserve.InferenceServer` of this
process over its own transport:

* **threads**: actor threads on a ``ThreadingTransport``. Most requests have
  the fixed schema and take the fast path; ``general_fraction`` of them carry
  an observation of random length under a nested key: another schema at
  each length, so they mostly go through ``collate_fn`` (general path), a
  batch that teaches the fast path one of them moves the flat ones there
  until the next, and batches mix both.
* **processes**: actor processes on a ``SharedMemoryTransport`` (fast path,
  the observation's first ``length`` entries are random, the rest zero).

Every submission gets a fresh id that encodes (actor, sequence number). The
model echoes the id and the observation's sum, and counts every id it sees
in a preallocated table. A submission ends exactly once: with its result
(checked: the echo is its id, the sum its observation's), with
``ServerClosedError`` while a restart of its server overlapped the call (the
actor goes on with a new id), or with a ``TimeoutError`` on one of the
``timeout_fraction`` of calls that give up after a few hundred microseconds
(the request is withdrawn or its late result discarded). Any other outcome
is an error of the run, and so is a failed batch on a server. Afterwards: no
id was forwarded twice, every result came from a forward of its own id, and
nothing is left outstanding.

Also reported: throughput, latency percentiles, the longest stall (the
longest time in which no request ended, sampled every 2 ms, and the longest
single call), and the resident memory drift of the serving process (and of
each actor process) from ``warmup_fraction`` of the requests to the end.

    batchserve-bench benchmarks/soak               # 1 million requests
    batchserve-bench benchmarks/soak --requests 50000 --json soak.json
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import random
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from tensordict import LazyStackedTensorDict, TensorDict

from batchserve import InferenceServer, ServerClosedError, SharedMemoryTransport, ThreadingTransport
from batchserve.bench.metrics import latency_summary
from batchserve.bench.runner import _rss_mb
from batchserve.bench.scenario import config_of

# The outcomes of one actor's submissions, as the actor counted them.
_COUNTERS = ("results", "closed", "timed_out", "misrouted", "corrupted", "other_errors")
_STALL_SAMPLE_S = 0.002
_THREAD_LANE, _PROCESS_LANE = 0, 1


@dataclass
class SoakConfig:
    """What a soak or stress run does (fields of ``benchmarks/soak.toml``)."""

    name: str = "soak"
    kind: str = "soak"
    requests: int = 1_000_000  # results to collect, all actors together
    threads: int = 8  # actor threads (threads lane); 0: no such lane
    processes: int = 4  # actor processes (processes lane); 0: no such lane
    observation: int = 16  # the fast path's observation length
    max_general_observation: int = 64  # general path: random length 1..this
    general_fraction: float = 0.1  # of the threads lane's requests
    future_fraction: float = 0.2  # submit() + result() instead of a blocking call
    timeout_fraction: float = 0.01  # calls that give up after `caller_timeout`
    caller_timeout: float = 0.0005
    restarts: int = 10  # per lane, at random moments spread over the run
    max_batch_size: int = 32
    timeout: float = 0.001  # the batching timeout
    num_slots: int = 64  # of the shared-memory transport
    warmup_fraction: float = 0.1  # memory baseline taken after this share of requests
    seed: int = 0
    rss_drift_target_mb: float = 10.0  # the serving process's drift above this fails the run
    hang_guard: float = 120.0  # seconds in which no request ends before the run counts as hung

    def validate(self) -> SoakConfig:
        if self.kind != "soak":
            raise ValueError(f"kind must be 'soak', not {self.kind!r}")
        if self.threads < 0 or self.processes < 0 or self.threads + self.processes == 0:
            raise ValueError("threads and processes: non-negative, at least one actor")
        if self.requests < self.threads + self.processes:
            raise ValueError("requests must be at least one per actor")
        for name in ("general_fraction", "future_fraction", "timeout_fraction", "warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if min(self.observation, self.max_general_observation, self.max_batch_size,
               self.num_slots) < 1 or self.restarts < 0:
            raise ValueError("sizes must be at least 1 and restarts non-negative")
        return self


def load_config(data: dict, **overrides) -> SoakConfig:
    return config_of(SoakConfig, data, "soak", **overrides)


# -- ids and the model ---------------------------------------------------------------


class _IdSpace:
    """id = actor * per_actor + sequence number; the model counts each id it
    forwards in ``seen`` (preallocated: no memory grows per request)."""

    def __init__(self, actors: int, quota: int, config: SoakConfig):
        # Room for the quota, the calls that time out or are refused during
        # restarts, and a margin; an actor that runs out of ids stops and is
        # reported (it never wraps around onto ids it used).
        self.per_actor = int(quota * (1.2 + 2 * config.timeout_fraction)) + 20_000
        self.seen = torch.zeros(actors * self.per_actor, dtype=torch.uint8)

    def first(self, actor: int) -> int:
        return actor * self.per_actor


def _observation(seq: int, length: int, size: int) -> torch.Tensor:
    """`length` small integers (exact float32 sums), zero-padded to `size`."""
    values = torch.zeros(size)
    values[:length] = torch.arange(length, dtype=torch.float32).add_(seq % 997)
    return values


def _expected_sum(seq: int, length: int) -> float:
    return length * (length - 1) / 2 + length * (seq % 997)


def _observation_of(item) -> torch.Tensor:
    observation = item.get(("nested", "observation"), None)
    return item["observation"] if observation is None else observation


class _EchoModel:
    """Echoes each request's id and its observation's sum; counts every id."""

    def __init__(self, seen: torch.Tensor):
        self.seen = seen
        self._one = torch.ones((), dtype=torch.uint8)

    def __call__(self, td):
        ids = td["id"].reshape(-1)
        self.seen.index_put_((ids,), self._one.expand(ids.shape), accumulate=True)
        if isinstance(td, LazyStackedTensorDict):  # general path: ragged observations
            sums = torch.stack([_observation_of(item).sum() for item in td.tensordicts])
        else:  # the fast path (nested requests of one length take it too)
            sums = _observation_of(td).sum(-1)
        return TensorDict({"echo": ids.clone(), "sum": sums}, batch_size=td.batch_size)


# -- actors ------------------------------------------------------------------------------


class _Actor:
    """One actor's loop, in a thread or a process: submits until `quota`
    results came back, counting each submission's outcome."""

    def __init__(self, index: int, client, first_id: int, id_room: int, quota: int,
                 config: SoakConfig, progress, general_fraction: float, epochs, lane: int,
                 abort: threading.Event | None = None):
        self.index = index
        # epochs[lane] is odd while the actor's server restarts (see _Restarter).
        self.epochs, self.lane = epochs, lane
        self.abort = abort  # set when the run is given up (a thread actor stops)
        self.client = client
        self.first_id = first_id
        self.id_room = id_room
        self.quota = quota
        self.config = config
        self.progress = progress  # progress[index] += 1 per ended submission
        self.general_fraction = general_fraction
        self.counts = dict.fromkeys(_COUNTERS, 0)
        # Written through now: pages first touched during the run would
        # show as memory drift.
        self.latencies_ns = np.full(quota, -1, dtype=np.int64)
        self.submitted = 0
        self.out_of_ids = False
        self.rss_mb = (0.0, 0.0)  # at the warm-up point and at the end (processes)

    def _request(self, rng: random.Random, seq: int):
        rid = torch.tensor(self.first_id + seq)
        if rng.random() < self.general_fraction:
            length = rng.randint(1, self.config.max_general_observation)
            td = TensorDict({"id": rid,
                             "nested": {"observation": _observation(seq, length, length)}})
        else:
            length = rng.randint(1, self.config.observation)
            td = TensorDict({"id": rid,
                             "observation": _observation(seq, length, self.config.observation)})
        return td, _expected_sum(seq, length)

    def run(self, warmup_point: int | None = None) -> None:
        config = self.config
        rng = random.Random(config.seed * 1_000_003 + self.index)
        results = 0
        seq = 0
        while results < self.quota:
            if self.abort is not None and self.abort.is_set():
                return
            if seq >= self.id_room:
                self.out_of_ids = True
                return
            td, expected = self._request(rng, seq)
            timeout = config.caller_timeout if rng.random() < config.timeout_fraction else None
            use_future = rng.random() < config.future_fraction
            seq += 1
            self.submitted += 1
            epoch = self.epochs[self.lane]
            start = time.perf_counter_ns()
            try:
                if use_future:
                    out = self.client.submit(td).result(timeout=timeout)
                else:
                    out = self.client(td, timeout=timeout)
            except ServerClosedError:
                if epoch % 2 == 0 and self.epochs[self.lane] == epoch:
                    self.counts["other_errors"] += 1  # no restart overlapped the call
                else:
                    self.counts["closed"] += 1
                    time.sleep(0.0005)  # a restart is under way: back off a little
            except TimeoutError:
                self.counts["timed_out" if timeout is not None else "other_errors"] += 1
            except Exception:  # counted as a failure of the run
                self.counts["other_errors"] += 1
            else:
                self.latencies_ns[results] = time.perf_counter_ns() - start
                results += 1
                if out["echo"].item() != self.first_id + seq - 1:
                    self.counts["misrouted"] += 1
                elif out["sum"].item() != expected:
                    self.counts["corrupted"] += 1
                self.counts["results"] += 1
                if warmup_point is not None and results == warmup_point:
                    self.rss_mb = (_rss_mb(), 0.0)
            self.progress[self.index] += 1
        if warmup_point is not None:
            self.rss_mb = (self.rss_mb[0], _rss_mb())

    def report(self) -> dict:
        return {"index": self.index, "submitted": self.submitted, "out_of_ids": self.out_of_ids,
                "counts": self.counts, "latencies_ns": self.latencies_ns[: self.counts["results"]],
                "rss_mb": self.rss_mb}


def _process_actor(client, index, first_id, id_room, quota, config, progress, epochs,
                   reports) -> None:
    torch.set_num_threads(1)
    actor = _Actor(index, client, first_id, id_room, quota, config, progress, 0.0, epochs,
                   _PROCESS_LANE)
    try:
        actor.run(warmup_point=max(1, int(quota * config.warmup_fraction)))
    finally:
        reports.put(actor.report())


# -- servers restarted at random moments ---------------------------------------------------


class _StallWatch(threading.Thread):
    """Samples the actors' progress counters; records the longest time in
    which none moved (to within the sampling period), and this process's
    memory once the run is warm."""

    def __init__(self, thread_progress: list, process_progress, threads: int,
                 warmup_requests: int, stop: threading.Event):
        super().__init__(daemon=True, name="soak-stall-watch")
        # Actor i counts in thread_progress[i] if i < threads, else in
        # process_progress[i] (shared memory); the other entry stays 0.
        self.thread_progress, self.process_progress = thread_progress, process_progress
        self.threads = threads
        self.warmup_requests, self.stop = warmup_requests, stop
        self.longest_s = 0.0
        self.rss_warm_mb: float | None = None
        self.rss_peak_mb = 0.0

    def ended(self) -> int:
        return sum(self.thread_progress) + sum(self.process_progress)

    def all_started(self) -> bool:
        """Whether every actor has ended a submission (an actor process has
        attached its transport by then)."""
        counts = list(self.process_progress)
        counts[: self.threads] = self.thread_progress[: self.threads]
        return all(n > 0 for n in counts)

    def run(self) -> None:
        # Stalls count once every actor is under way (not process start-up).
        while not self.all_started():
            if self.stop.wait(_STALL_SAMPLE_S):
                return
        last, since = self.ended(), time.monotonic()
        samples = 0
        while not self.stop.wait(_STALL_SAMPLE_S):
            now, ended = time.monotonic(), self.ended()
            if ended != last:  # a stall counts once it is over (not the idle end of the run)
                self.longest_s = max(self.longest_s, now - since)
                last, since = ended, now
            samples += 1
            if samples % 50 == 0:
                rss = _rss_mb()
                self.rss_peak_mb = max(self.rss_peak_mb, rss)
                if self.rss_warm_mb is None and ended >= self.warmup_requests:
                    self.rss_warm_mb = rss


class _Restarter(threading.Thread):
    """Shuts a server down and starts it again `count` times, at random
    points of the run: once every actor is under way, whenever the requests
    ended pass the next of `count` random fractions of `total`. Each shutdown
    gives the forward in progress a random grace (none, 2 ms or 1 s), then
    waits for the worker. epochs[lane] is odd from just before the shutdown
    to just after the start: the window in which its actors may be refused."""

    def __init__(self, server: InferenceServer, count: int, total: int, watch: _StallWatch,
                 rng: random.Random, stop: threading.Event, epochs, lane: int):
        super().__init__(daemon=True, name="soak-restarter")
        self.server, self.watch, self.rng, self.stop = server, watch, rng, stop
        self.epochs, self.lane = epochs, lane
        self.points = sorted(int(total * rng.uniform(0.05, 0.95)) for _ in range(count))
        self.done = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.watch.all_started():
                if self.stop.wait(0.001):
                    return
            for point in self.points:
                while self.watch.ended() < point:
                    if self.stop.wait(0.001):
                        return
                self.epochs[self.lane] += 1
                self.server.shutdown(timeout=self.rng.choice([0.0, 0.002, 1.0]))
                self.server.shutdown(timeout=None)  # the worker, if the grace ran out
                self.server.start()
                self.epochs[self.lane] += 1
                self.done += 1
        except BaseException as exc:  # reported as a failure of the run
            self.error = exc


# -- one run ---------------------------------------------------------------------------------


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_soak(config: SoakConfig, *, progress_cb=None) -> dict:
    """Runs `config`; returns the report (see :func:`failures` for its verdict)."""
    config.validate()
    actors = config.threads + config.processes
    quotas = _shares(config.requests, actors)
    ids = _IdSpace(actors, max(quotas), config)
    rng = random.Random(config.seed)
    torch.set_num_threads(1)

    # The threads lane: fast and general requests on one ThreadingTransport.
    thread_transport = ThreadingTransport()
    lanes = []
    if config.threads:
        lanes.append(("threads", thread_transport))
    shm = None
    if config.processes:
        spec = TensorDict({"id": torch.zeros((), dtype=torch.long),
                           "observation": torch.zeros(config.observation)})
        response = TensorDict({"echo": torch.zeros((), dtype=torch.long), "sum": torch.zeros(())})
        shm = SharedMemoryTransport(spec, response, num_slots=config.num_slots)
        lanes.append(("processes", shm))
    model = _EchoModel(ids.seen)
    servers = {name: InferenceServer(model, transport, max_batch_size=config.max_batch_size,
                                     timeout=config.timeout, policy_version_key=None)
               for name, transport in lanes}

    thread_progress = [0] * actors
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tensordict", "batchserve.bench.soak"])
    process_progress = ctx.Array("q", actors, lock=False)  # one writer per entry
    epochs = ctx.Array("q", 2, lock=False)  # per lane; written by its restarter only
    reports_queue = ctx.Queue()
    stop = threading.Event()
    watch = _StallWatch(thread_progress, process_progress, config.threads,
                        int(config.requests * config.warmup_fraction), stop)

    thread_actors = [
        _Actor(i, thread_transport.client(), ids.first(i), ids.per_actor, quotas[i], config,
               thread_progress, config.general_fraction, epochs, _THREAD_LANE, abort=stop)
        for i in range(config.threads)
    ]
    for server in servers.values():
        server.start()
    processes = [
        ctx.Process(target=_process_actor, daemon=True,
                    args=(shm.client(), i, ids.first(i), ids.per_actor, quotas[i], config,
                          process_progress, epochs, reports_queue))
        for i in range(config.threads, actors)
    ]
    begin = time.perf_counter()
    for p in processes:
        p.start()
    threads = [threading.Thread(target=a.run, name=f"soak-actor-{a.index}") for a in thread_actors]
    for t in threads:
        t.start()
    watch.start()
    restarters = [_Restarter(servers[name], config.restarts, config.requests, watch,
                             random.Random(rng.random()), stop, epochs,
                             _THREAD_LANE if name == "threads" else _PROCESS_LANE)
                  for name in servers]
    for r in restarters:
        r.start()

    process_reports = []
    last_ended, last_progress = -1, time.monotonic()
    try:
        while len(process_reports) < len(processes) or any(t.is_alive() for t in threads):
            ended = watch.ended()
            if progress_cb is not None:
                progress_cb(min(1.0, ended / config.requests))
            if ended != last_ended:
                last_ended, last_progress = ended, time.monotonic()
            elif time.monotonic() - last_progress > config.hang_guard:
                break  # nothing ended for hang_guard seconds: the actors left count as hung
            try:
                process_reports.append(reports_queue.get(timeout=0.2))
            except Exception:  # queue.Empty; or a dead actor, found below
                if any(p.exitcode not in (None, 0) for p in processes) and reports_queue.empty():
                    break
        seconds = time.perf_counter() - begin
        rss_end = _rss_mb()
    finally:
        stop.set()
        for r in restarters:
            r.join(60)
        stats = {name: server.stats() for name, server in servers.items()}
        for server in servers.values():
            server.shutdown(timeout=5)
        for t in threads:
            t.join(5)
        for p in processes:
            p.join(5)
            if p.is_alive():
                p.kill()
        watch.join(5)
        if shm is not None:
            shm.close()

    reports = [a.report() for a in thread_actors] + process_reports
    return _summarise(config, ids, reports, threads, processes, restarters, watch, stats,
                      seconds, rss_end)


def _summarise(config, ids, reports, threads, processes, restarters, watch, stats, seconds,
               rss_end) -> dict:
    totals = dict.fromkeys(_COUNTERS, 0)
    for r in reports:
        for k in _COUNTERS:
            totals[k] += r["counts"][k]
    submitted = sum(r["submitted"] for r in reports)
    ended = sum(totals[k] for k in ("results", "closed", "timed_out", "other_errors"))
    seen = ids.seen
    forwarded_twice = int((seen > 1).sum())
    # Every result must come from a forward of its own id (checked by the
    # actor's echo), so ids forwarded at least once are at least the results.
    forwarded = int((seen > 0).sum())
    latencies = np.concatenate([r["latencies_ns"] for r in reports]) if reports else np.array([])
    actor_rss = [r["rss_mb"][1] - r["rss_mb"][0] for r in reports if r["rss_mb"][1]]
    rss_warm = watch.rss_warm_mb if watch.rss_warm_mb is not None else float("nan")
    return {
        "config": dataclasses.asdict(config),
        "seconds": seconds,
        "requests_per_s": totals["results"] / seconds if seconds > 0 else 0.0,
        "submitted": submitted,
        "ended": ended,
        "lost": submitted - ended,
        "hung_actors": sum(t.is_alive() for t in threads)
        + (len(processes) - sum(1 for r in reports if r["index"] >= config.threads)),
        "out_of_ids": sum(r["out_of_ids"] for r in reports),
        **totals,
        "forwarded": forwarded,
        "forwarded_twice": forwarded_twice,
        "restarts": sum(r.done for r in restarters),
        "restart_errors": [repr(r.error) for r in restarters if r.error is not None],
        "fast_path_requests": sum(s["fast_path_requests"] for s in stats.values()),
        "failed_batches": sum(s["failed_batches"] for s in stats.values()),
        "latency_us": latency_summary(latencies) if len(latencies) else {},
        "longest_stall_ms": watch.longest_s * 1e3,
        "longest_call_ms": float(latencies.max()) / 1e6 if len(latencies) else float("nan"),
        "rss_warm_mb": rss_warm,
        "rss_end_mb": rss_end,
        "rss_peak_mb": max(watch.rss_peak_mb, rss_end),
        "rss_drift_mb": rss_end - rss_warm,
        "actor_process_rss_drift_mb": max(actor_rss) if actor_rss else None,
    }


def failures(report: dict) -> list[str]:
    """What the run got wrong; empty when nothing was lost, duplicated or
    misrouted, no request failed but for a restart or its own timeout, and
    the serving process's memory drift stayed under its target."""
    wrong = []
    for key in ("lost", "hung_actors", "out_of_ids", "misrouted", "corrupted", "other_errors",
                "forwarded_twice", "failed_batches"):
        if report[key]:
            wrong.append(f"{key}: {report[key]}")
    if report["forwarded"] < report["results"]:
        wrong.append(f"{report['results']} results but only {report['forwarded']} ids forwarded")
    if report["results"] < report["config"]["requests"]:
        wrong.append(f"only {report['results']} of {report['config']['requests']} results")
    wrong += [f"restart failed: {e}" for e in report["restart_errors"]]
    target = report["config"]["rss_drift_target_mb"]
    if report["rss_drift_mb"] > target:  # False when not measured (nan)
        wrong.append(f"RSS drift {report['rss_drift_mb']:+.1f} MB over the {target} MB target")
    return wrong


def format_report(report: dict) -> str:
    c = report["config"]
    lat = report["latency_us"]
    drift = report["actor_process_rss_drift_mb"]
    lines = [
        f"soak {c['name']}: {report['results']:,} results from {c['threads']} threads + "
        f"{c['processes']} processes in {report['seconds']:.1f} s "
        f"({report['requests_per_s']:,.0f} req/s)",
        f"  submitted {report['submitted']:,}: {report['results']:,} results, "
        f"{report['closed']:,} refused during {report['restarts']} restarts, "
        f"{report['timed_out']:,} timed out, {report['other_errors']} other errors",
        f"  lost {report['lost']}, misrouted {report['misrouted']}, "
        f"corrupted {report['corrupted']}, forwarded twice {report['forwarded_twice']}, "
        f"hung actors {report['hung_actors']}",
        f"  fast path {report['fast_path_requests']:,} of {report['forwarded']:,} forwarded",
        f"  latency µs: p50 {lat.get('p50', math.nan):.0f}, p99 {lat.get('p99', math.nan):.0f}, "
        f"p99.9 {lat.get('p99.9', math.nan):.0f}; longest call {report['longest_call_ms']:.1f} ms, "
        f"longest stall (nothing ended) {report['longest_stall_ms']:.1f} ms",
        f"  RSS of the serving process: {report['rss_warm_mb']:.1f} MB after "
        f"{c['warmup_fraction']:.0%} of the requests, {report['rss_end_mb']:.1f} MB at the end: "
        f"drift {report['rss_drift_mb']:+.1f} MB (peak {report['rss_peak_mb']:.1f} MB)"
        + (f"; actor processes: worst drift {drift:+.1f} MB" if drift is not None else ""),
    ]
    wrong = failures(report)
    lines.append("  verdict: " + ("OK" if not wrong else "FAILED: " + "; ".join(wrong)))
    return "\n".join(lines)

"""Ray actors calling a server in the driver: batchserve's
:class:`~batchserve.RayTransport` side by side with torchrl's.

Ray actors (``num_cpus=0``: all of them run on a small machine too) call an
:class:`~batchserve.InferenceServer` in this process, each as fast as it
can, through the system's Ray transport:

* ``batchserve``: :class:`batchserve.RayTransport` (calls wait in an async
  inbox actor; a pump thread brings them into the C++ queue in bulk) and
  :class:`batchserve.InferenceServer`;
* ``batchserve-hosted``: the server in a Ray actor of its own
  (:func:`batchserve.serve_on_ray`, ``num_cpus=0``), which is its own inbox:
  one actor call per request. It serves all along; its batch sizes come
  from its ``stats()``;
* ``torchrl`` (``--vs torchrl``): torchrl's ``RayTransport``
  (``ray.util.queue`` request queue, one response queue per client) and
  torchrl's ``InferenceServer``.

One Ray runtime serves the whole run (started here, and shut down at the
end, unless one is running already), and one set of actors serves every
system and actor count: each actor holds a client of each system, made in
the driver. Only the measured system's server runs during a measurement
(an idle torchrl server polls its Ray queue every ``timeout``). Systems
alternate within each actor count, ``rounds`` times, so that the machine's
drift weighs on both alike.

Each actor times every call itself (``time.perf_counter_ns`` around
``client(td)``); a call counts when it ends inside the measurement window,
the same wall-clock window for every actor, which opens ``warmup`` seconds
after the actors are asked to start. Throughput is the calls counted over
the window's length; p50/p99 are over every counted call.

    batchserve-bench benchmarks/ray --vs torchrl --json ray.json
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tensordict import TensorDict

from batchserve.bench.metrics import (
    fast_path_summary,
    histogram_mean,
    latency_summary,
    merge_fast_path,
    merge_histograms,
    percent_text,
    refusals_text,
)
from batchserve.bench.scenario import Scenario, config_of
from batchserve.bench.systems import make_server, server_kwargs
from batchserve.bench.workload import RecordingModel, make_observation, make_policy

BATCHSERVE_SYSTEMS = ("batchserve", "batchserve-hosted")
TORCHRL_SYSTEMS = ("torchrl",)


@dataclass
class RayConfig:
    """Fields of ``benchmarks/ray.toml``."""

    name: str = "ray"
    kind: str = "ray"
    observation: int = 64  # float32[observation]
    hidden: list = field(default_factory=lambda: [256])
    actions: int = 8
    actor_counts: list = field(default_factory=lambda: [4, 16])
    max_batch_size: int = 64
    timeout: float = 0.001  # the batching timeout
    torch_threads: int = 1  # intra-op threads of the server's forward
    duration: float = 3.0  # measured seconds per (system, actor count, round)
    warmup: float = 1.0  # seconds of calls before each measurement, excluded
    rounds: int = 2  # alternating rounds per actor count
    num_cpus: int | None = None  # ray.init(num_cpus=...) when the run starts Ray
    call_timeout: float = 60.0  # a call taking longer is an error

    def validate(self) -> RayConfig:
        if self.kind != "ray":
            raise ValueError(f"kind must be 'ray', not {self.kind!r}")
        if not self.actor_counts or any(int(n) < 1 for n in self.actor_counts):
            raise ValueError("actor_counts must be positive integers")
        if self.duration <= 0 or self.rounds < 1 or self.warmup < 0:
            raise ValueError("duration and rounds must be positive, warmup non-negative")
        if self.observation < 1 or self.actions < 1 or self.max_batch_size < 1:
            raise ValueError("observation, actions and max_batch_size must be positive")
        if self.timeout < 0 or self.call_timeout <= 0:
            raise ValueError("timeout must be non-negative and call_timeout positive")
        if self.torch_threads < 1 or (self.num_cpus is not None and self.num_cpus < 1):
            raise ValueError("torch_threads and num_cpus must be at least 1")
        return self


def load_config(data: dict, **overrides) -> RayConfig:
    return config_of(RayConfig, data, "ray", **overrides)


def workload(config: RayConfig) -> Scenario:
    """The throughput harness's scenario for the same workload: its policy,
    observation and server settings are built the same way."""
    return Scenario(
        name=config.name, observation_shape=[config.observation], hidden=list(config.hidden),
        actions=config.actions, max_batch_size=config.max_batch_size, timeout=config.timeout,
        torch_threads=config.torch_threads,
    )


def steps(config: RayConfig, systems) -> int:
    """Measurements a run makes (for a progress bar)."""
    return len(config.actor_counts) * config.rounds * len(systems)


# -- the actors -------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """The exception's type and the last line of its text (a Ray error's
    text ends with the remote exception)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


class Caller:
    """One Ray actor: holds a client of each system and calls it in a loop."""

    def __init__(self, observation: torch.Tensor):
        torch.set_num_threads(1)
        self._td = TensorDict({"observation": observation})
        self._clients: dict = {}

    def attach(self, system: str, client) -> None:
        self._clients[system] = client

    def ready(self) -> bool:
        return True

    def prime(self, system: str, call_timeout: float) -> str | None:
        """One call (the first call of a client can take seconds: torchrl's
        response queue is an actor that starts on its first use); returns
        what went wrong, if anything."""
        try:
            out = self._clients[system](self._td, timeout=call_timeout)
        except Exception as exc:
            return _describe(exc)
        if "action" not in out.keys():
            return f"the result has no 'action': {out}"
        return None

    def run(self, system: str, measure_from: float, measure_until: float,
            call_timeout: float) -> dict:
        """Calls until the first call ending at ``measure_until`` (wall
        clock) or later; counts and times those ending in
        [measure_from, measure_until)."""
        client, td = self._clients[system], self._td
        latencies: list[int] = []
        warmup_calls, error = 0, None
        clock, now = time.perf_counter_ns, time.time
        try:
            while True:
                t0 = clock()
                client(td, timeout=call_timeout)
                t1 = clock()
                ended = now()
                if ended >= measure_until:
                    break
                if ended >= measure_from:
                    latencies.append(t1 - t0)
                else:
                    warmup_calls += 1
        except Exception as exc:  # reported with the results
            error = _describe(exc)
        return {"calls": len(latencies), "warmup_calls": warmup_calls,
                "latency_ns": np.asarray(latencies, dtype=np.int64), "error": error}


# -- the systems --------------------------------------------------------------------


class _System:
    """A system's transport and server in the driver (the server runs only
    while the system is measured), and the policy it serves."""

    def __init__(self, system: str, config: RayConfig):
        self.name = system
        scenario = workload(config)
        self.model = RecordingModel(make_policy(scenario), threads=config.torch_threads)
        if system == "batchserve":
            from batchserve import RayTransport
        else:
            from torchrl.modules.inference_server import RayTransport
        self.transport = RayTransport()
        self.server = make_server(system, self.model, self.transport, scenario)

    def client(self):
        return self.transport.client()

    def stats(self) -> dict:
        return self.server.stats()

    def close(self) -> None:
        if self.name == "batchserve":
            self.transport.close()
            return
        # torchrl's transport has no close: end its queues' actors (a Ray
        # runtime the caller started keeps running).
        for q in [self.transport._request_queue, *self.transport._response_queues.values()]:
            try:
                q.shutdown()
            except Exception:
                pass


def _hosted_policy(scenario: Scenario, threads):
    """The policy, built inside the hosting actor (module level: pickled by
    reference)."""
    return RecordingModel(make_policy(scenario), threads=threads)


class _Hosted:
    """batchserve's server hosted in a Ray actor, with _System's interface:
    its ``server`` serves all along (start and shutdown do nothing), and its
    ``model`` gives a window's batch sizes from the actor's stats()."""

    class _ServesAllAlong:
        def start(self) -> None:
            pass

        def shutdown(self) -> None:
            pass

    class _StatsWindow:
        def __init__(self, handle):
            self._handle = handle

        def start(self) -> None:
            self._handle.stats(reset=True)

        def stop(self):
            return self._handle.stats()["batch_size_histogram"], []

    def __init__(self, config: RayConfig):
        from batchserve import serve_on_ray

        self.name = "batchserve-hosted"
        scenario = workload(config)
        self.handle = serve_on_ray(
            functools.partial(_hosted_policy, scenario, config.torch_threads),
            num_cpus=0, **server_kwargs(scenario),
        )
        self.server = self._ServesAllAlong()
        self.model = self._StatsWindow(self.handle)

    def client(self):
        return self.handle.client()

    def stats(self) -> dict:
        return self.handle.stats()

    def close(self) -> None:
        self.handle.shutdown()


def _start_ray(config: RayConfig) -> bool:
    """Starts the Ray runtime unless one runs; whether this started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _measure(system: _System, actors, config: RayConfig) -> dict:
    import ray

    system.server.start()
    try:
        measure_from = time.time() + config.warmup
        measure_until = measure_from + config.duration
        refs = [a.run.remote(system.name, measure_from, measure_until, config.call_timeout)
                for a in actors]
        time.sleep(max(0.0, measure_from - time.time()))
        system.model.start()
        before = system.stats()
        time.sleep(max(0.0, measure_until - time.time()))
        histogram, _ = system.model.stop()
        fast_path = fast_path_summary(system.stats(), before)
        ready, waiting = ray.wait(refs, num_returns=len(refs),
                                  timeout=config.call_timeout + 60.0)
        outs = ray.get(ready)
        errors = [o["error"] for o in outs if o["error"]]
        if waiting:
            errors.append(f"{len(waiting)} of {len(refs)} actors never finished")
    finally:
        system.server.shutdown()
    return {"calls": sum(o["calls"] for o in outs),
            "warmup_calls": sum(o["warmup_calls"] for o in outs),
            "seconds": config.duration,
            "latency_ns": np.concatenate([o["latency_ns"] for o in outs]
                                         or [np.zeros(0, np.int64)]),
            "batch_size_histogram": histogram, "fast_path": fast_path, "errors": errors}


def run(config: RayConfig, systems, *, progress_cb=None) -> dict:
    """Every system at every actor count, ``rounds`` times, alternating."""
    import ray

    started = _start_ray(config)
    made: list[_System] = []
    rows: dict[tuple[str, int], list[dict]] = {}
    setup_errors: list[tuple[str, str]] = []
    step = 0
    try:
        observation = make_observation(workload(config))
        caller = ray.remote(Caller).options(num_cpus=0)
        actors = [caller.remote(observation) for _ in range(max(config.actor_counts))]
        ray.get([a.ready.remote() for a in actors], timeout=600)
        for name in systems:
            system = None
            try:
                system = _Hosted(config) if name == "batchserve-hosted" else _System(name, config)
                ray.get([a.attach.remote(name, system.client()) for a in actors], timeout=600)
                system.server.start()
                try:
                    problems = ray.get([a.prime.remote(name, config.call_timeout) for a in actors],
                                       timeout=config.call_timeout + 60.0)
                finally:
                    system.server.shutdown()
                if any(problems):
                    raise RuntimeError(f"a first call failed: {next(p for p in problems if p)}")
                made.append(system)
            except Exception as exc:  # reported in its rows; the other systems still run
                setup_errors.append((name, f"set-up failed: {_describe(exc)}"))
                if system is not None:
                    system.close()
        for count in config.actor_counts:
            for round_ in range(config.rounds):
                for system in made:
                    if progress_cb is not None:
                        progress_cb(f"{system.name} · {count} actors · round "
                                    f"{round_ + 1}/{config.rounds}", step)
                    try:
                        m = _measure(system, actors[:count], config)
                    except Exception as exc:  # reported in its row
                        m = {"errors": [f"the measurement failed: {_describe(exc)}"]}
                    rows.setdefault((system.name, count), []).append(m)
                    step += 1
        for a in actors:
            ray.kill(a)
    finally:
        for system in made:
            try:
                system.close()
            except Exception:
                pass
        if started:
            ray.shutdown()
    results = [_summarise(name, count, rounds) for (name, count), rounds in rows.items()]
    for name, error in setup_errors:
        results += [{"system": name, "actors": count, "errors": [error]}
                    for count in config.actor_counts]
    order = {name: i for i, name in enumerate(systems)}
    results.sort(key=lambda r: (r["actors"], order.get(r["system"], 0)))
    return {"config": dataclasses.asdict(config), "results": results}


def _summarise(system: str, count: int, rounds: list[dict]) -> dict:
    errors = [e for m in rounds for e in m["errors"]]
    measured = [m for m in rounds if "calls" in m]
    if not measured:
        return {"system": system, "actors": count, "errors": errors}
    calls = sum(m["calls"] for m in measured)
    if calls == 0:
        errors.append("no call ended inside the measurement window")
        return {"system": system, "actors": count, "errors": errors}
    seconds = sum(m["seconds"] for m in measured)
    histogram = merge_histograms(m["batch_size_histogram"] for m in measured)
    return {
        "system": system,
        "actors": count,
        "requests": calls,
        "seconds": seconds,
        "requests_per_s": calls / seconds,
        "round_requests_per_s": [m["calls"] / m["seconds"] for m in measured],
        "latency_us": latency_summary(np.concatenate([m["latency_ns"] for m in measured])),
        "mean_batch_size": histogram_mean(histogram),
        "batch_size_histogram": {str(k): v for k, v in histogram.items()},
        **merge_fast_path([m["fast_path"] for m in measured], [m["calls"] for m in measured]),
        "errors": errors,
    }


def failures(report: dict) -> list[str]:
    return [f"{r['system']} at {r['actors']} actors: {e}"
            for r in report["results"] for e in r["errors"]]


def format_report(report: dict) -> str:
    c = report["config"]
    widths = " -> ".join(str(w) for w in [c["observation"], *c["hidden"], c["actions"]])
    lines = [
        f"{c['name']}: Ray actors calling a server; MLP {widths}, "
        f"float32[{c['observation']}], max_batch_size {c['max_batch_size']}, "
        f"timeout {c['timeout'] * 1e3:g} ms; {c['rounds']} x {c['duration']:g} s per point",
        f"{'system':<19}{'actors':>7}{'req/s':>10}{'p50':>10}{'p90':>10}{'p99':>10}"
        f"{'max':>10}{'batch':>7}{'fast %':>8}{'errors':>8}",
    ]
    by_count: dict[int, dict[str, float]] = {}
    for r in report["results"]:
        if "latency_us" not in r:
            lines.append(f"{r['system']:<19}{r['actors']:>7}  failed (below)")
            continue
        lat = r["latency_us"]
        lines.append(
            f"{r['system']:<19}{r['actors']:>7}{r['requests_per_s']:>10,.0f}"
            + "".join(f"{lat[k] / 1e3:>8.2f}ms" for k in ("p50", "p90", "p99", "max"))
            + f"{r['mean_batch_size']:>7.1f}{percent_text(r.get('fast_path_fraction')):>8}"
            + f"{len(r['errors']):>8}"
        )
        if r.get("fast_path_refusals"):
            lines.append(f"{'':>19}general path: {refusals_text(r['fast_path_refusals'])}")
        by_count.setdefault(r["actors"], {})[r["system"]] = r["requests_per_s"]
    for count, rates in by_count.items():
        if not rates.get("torchrl"):
            continue
        ratios = [f"{name} {rates[name] / rates['torchrl']:.1f}x" for name in BATCHSERVE_SYSTEMS
                  if name in rates]
        if ratios:
            lines.append(f"{count} actors, throughput against torchrl's: {', '.join(ratios)}")
    for r in report["results"]:
        for e in r["errors"]:
            lines.append(f"error: {r['system']} at {r['actors']} actors: {e}")
    return "\n".join(lines)

"""Weight sync under load: what streaming new weights costs the actors.

Actor threads call a server as fast as they can. Phases of ``duration``
seconds without updates and with a trainer publishing the policy's weights
every ``1 / update_hz`` seconds alternate, ``rounds`` times each (so that
the machine's own drift weighs on both alike). Per system:

* **throughput** without and with updates, and the dip between them;
* **update latency**: from the moment the trainer starts publishing version
  v to the first result stamped with v or newer (``policy_version``, CLOCK_
  MONOTONIC on both sides, so it spans processes);
* **the trainer's publish call**: how long the trainer is held per update.

Systems (``--vs torchrl`` adds torchrl's):

* ``batchserve``: a trainer process with :class:`~batchserve.WeightPublisher`,
  the server with :class:`~batchserve.SharedMemoryWeightReceiver`;
* ``batchserve-inproc``: a trainer thread in the server's process calling
  :meth:`~batchserve.InferenceServer.update_weights`;
* ``torchrl-shared``: torchrl's server with its ``SharedMemWeightSyncScheme``,
  a trainer process calling ``send()``;
* ``torchrl-mp``: torchrl's server with its ``MultiProcessWeightSyncScheme``.

    batchserve-bench benchmarks/weight_sync --vs torchrl --json ws.json
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tensordict import TensorDict

from batchserve.bench.metrics import fast_path_summary, latency_summary, percent_text
from batchserve.bench.scenario import Scenario, config_of
from batchserve.bench.workload import make_policy

BATCHSERVE_SYSTEMS = ("batchserve", "batchserve-inproc")
TORCHRL_SYSTEMS = ("torchrl-shared", "torchrl-mp")


@dataclass
class WeightSyncConfig:
    """Fields of ``benchmarks/weight_sync.toml``."""

    name: str = "weight_sync"
    kind: str = "weight_sync"
    observation: int = 64
    hidden: list = field(default_factory=lambda: [1792, 1792, 1792, 1792])
    actions: int = 8
    actors: int = 16  # actor threads
    max_batch_size: int = 64
    timeout: float = 0.001  # the batching timeout
    torch_threads: int = 1  # intra-op threads of the forward
    device: str = "cpu"
    update_hz: float = 10.0
    duration: float = 2.5  # seconds of each phase
    rounds: int = 3  # of (without updates, with updates), alternating
    settle: float = 0.3  # seconds between a phase with updates and the next
    warmup: float = 1.0

    def validate(self) -> WeightSyncConfig:
        if self.kind != "weight_sync":
            raise ValueError(f"kind must be 'weight_sync', not {self.kind!r}")
        if self.actors < 1 or self.update_hz <= 0 or self.duration <= 0 or self.rounds < 1:
            raise ValueError("actors, update_hz, duration and rounds must be positive")
        return self


def load_config(data: dict, **overrides) -> WeightSyncConfig:
    return config_of(WeightSyncConfig, data, "weight_sync", **overrides)


# -- the policy -----------------------------------------------------------------


class _Policy(nn.Module):
    """The MLP policy, setting the forward thread's intra-op threads on its
    first call there (torch's setting is per thread)."""

    def __init__(self, config: WeightSyncConfig):
        super().__init__()
        self.policy = make_policy(Scenario(
            observation_shape=[config.observation], hidden=list(config.hidden),
            actions=config.actions, model="mlp",
        ))
        self._threads = config.torch_threads
        self._configured = threading.local()

    def forward(self, td):
        if not getattr(self._configured, "done", False):
            torch.set_num_threads(self._threads)
            self._configured.done = True
        return self.policy(td)

def parameter_count(config: WeightSyncConfig) -> int:
    return sum(p.numel() for p in _Policy(config).parameters())


# -- trainers ---------------------------------------------------------------------


def _publish_loop(publish, hz: float, active, done) -> list[tuple[int, int, int]]:
    """Calls publish() every 1/hz s while `active` is set, until `done`;
    returns (version, t_start_ns, t_end_ns) per call (versions 1, 2, ...)."""
    records = []
    period = 1.0 / hz
    version = 0
    while not done.is_set():
        if not active.wait(0.02):
            continue
        next_at = time.monotonic()
        while active.is_set():
            version += 1
            t0 = time.monotonic_ns()
            publish(version)
            records.append((version, t0, time.monotonic_ns()))
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return records


def _process_trainer(system, config, handle, ready, active, done, out) -> None:
    """A trainer process: publishes the policy's weights through `system`."""
    torch.set_num_threads(1)
    model = _Policy(config)
    if system == "batchserve":
        from batchserve import WeightPublisher

        publisher = WeightPublisher(handle, model)
        ready.set()
        records = _publish_loop(lambda v: publisher.publish(version=v), config.update_hz,
                                active, done)
        publisher.close()
    else:  # torchrl's schemes: `handle` carries the queues the parent made
        weights = TensorDict.from_module(model).data.to(config.device)
        handle.init_on_sender(model_id="policy", weights=weights, devices=[config.device])
        handle.connect()  # hands the server its first weights
        ready.set()
        records = _publish_loop(lambda v: handle.send(weights=weights), config.update_hz,
                                active, done)
        handle.shutdown()
    out.put(records)


# -- one system -----------------------------------------------------------------------


class _Actors:
    """Actor threads calling as fast as they can; each counts its results
    and notes when it first saw each newer policy version."""

    def __init__(self, transport, n: int, config: WeightSyncConfig):
        self.counts = [0] * n
        self.seen: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        observation = torch.randn(config.observation)
        self._threads = [
            threading.Thread(target=self._run, args=(transport.client(), i, observation),
                             daemon=True)
            for i in range(n)
        ]

    def _run(self, client, i: int, observation) -> None:
        td = TensorDict({"observation": observation})
        newest = -1
        seen = self.seen[i]
        try:
            while not self._stop.is_set():
                version = int(client(td)["policy_version"])
                self.counts[i] += 1
                if version > newest:
                    newest = version
                    seen.append((version, time.monotonic_ns()))
        except BaseException as exc:  # reported with the results
            self.errors.append(exc)

    def start(self):
        for t in self._threads:
            t.start()

    def total(self) -> int:
        return sum(self.counts)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _make_server(system: str, model, config: WeightSyncConfig, weight_sync):
    kwargs = dict(max_batch_size=config.max_batch_size, timeout=config.timeout,
                  weight_sync=weight_sync)
    if config.device != "cpu":
        kwargs.update(device=config.device, output_device="cpu")
    if system.startswith("torchrl"):
        from torchrl.modules.inference_server import InferenceServer, ThreadingTransport
    else:
        from batchserve import InferenceServer, ThreadingTransport
    transport = ThreadingTransport()
    return InferenceServer(model, transport, **kwargs), transport


def _torchrl_scheme(system: str, config: WeightSyncConfig, ctx):
    """torchrl's scheme for a trainer process and the server here.

    torchrl's documented set-up has the trainer start the server's process;
    here the server is this process. So this process makes the scheme's
    queues (``init_on_sender``, with a copy of the weights: passing
    ``model=`` would share the trainer's tensors with the server), the
    trainer's process sets itself up as the sender with them, and the
    receiver side is set up here before the server starts: torchrl's server
    would otherwise reset the scheme, context included, and never count an
    update (batchserve's does it in the right order).
    """
    from torchrl.weight_update import MultiProcessWeightSyncScheme, SharedMemWeightSyncScheme

    scheme = (SharedMemWeightSyncScheme() if system == "torchrl-shared"
              else MultiProcessWeightSyncScheme())
    weights = TensorDict.from_module(_Policy(config)).data.clone().to(config.device)
    scheme.init_on_sender(model_id="policy", weights=weights, devices=[config.device], ctx=ctx)
    return scheme



def run_system(system: str, config: WeightSyncConfig, ctx=None) -> dict:
    """Both phases for one system; returns its measurements."""
    ctx = ctx or _context()
    model = _Policy(config)
    if config.device != "cpu":
        model = model.to(config.device)
    name = f"batchserve-bench-weights-{os.getpid()}"
    ready, active, done, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    child = trainer_thread = None
    if system == "batchserve":
        from batchserve import SharedMemoryWeightReceiver

        weight_sync = SharedMemoryWeightReceiver(name)
        handle = name
    elif system == "batchserve-inproc":
        weight_sync = handle = None
    else:
        handle = weight_sync = _torchrl_scheme(system, config, ctx)
    server, transport = _make_server(system, model, config, weight_sync)
    if system in ("batchserve", *TORCHRL_SYSTEMS):
        child = ctx.Process(target=_process_trainer,
                            args=(system, config, handle, ready, active, done, out), daemon=True)
        child.start()
    if system in TORCHRL_SYSTEMS:
        handle.init_on_receiver(model_id="policy", model=model, worker_idx=0)
    with server:
        actors = _Actors(transport, config.actors, config)
        actors.start()
        if system == "batchserve-inproc":
            weights = TensorDict.from_module(_Policy(config).to(config.device))
            records_box: list = []
            trainer_thread = threading.Thread(
                target=lambda: records_box.append(_publish_loop(
                    lambda v: server.update_weights(weights, version=v), config.update_hz,
                    active, done)),
                daemon=True)
            trainer_thread.start()
        else:
            assert ready.wait(120), f"{system}: the trainer process never got ready"
        time.sleep(config.warmup)
        # Phases alternate, so that a machine slowing down or speeding up
        # meanwhile weighs on both alike.
        counted = {False: [0, 0.0], True: [0, 0.0]}  # updating -> [results, seconds]
        for _ in range(config.rounds):
            for updating in (False, True):
                if updating:
                    active.set()
                c0, t0 = actors.total(), time.monotonic()
                time.sleep(config.duration)
                c1, t1 = actors.total(), time.monotonic()
                counted[updating][0] += c1 - c0
                counted[updating][1] += t1 - t0
                if updating:
                    active.clear()
                    time.sleep(config.settle)  # the last update lands outside both phases
        done.set()
        if trainer_thread is not None:
            trainer_thread.join(60)
            records = records_box[0]
        else:
            records = out.get(timeout=120)
        # Results of the last publication reach the actors after `stop`.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and max(
            (s[-1][0] for s in actors.seen if s), default=0) < records[-1][0]:
            time.sleep(0.01)
        actors.stop()
        stats = server.stats()
    if child is not None:
        child.join(60)
    if system == "batchserve":
        weight_sync.close()
    elif system in TORCHRL_SYSTEMS:
        handle.shutdown()
    return _summarise(system, config, records, actors, stats,
                      counted[False][0] / counted[False][1], counted[True][0] / counted[True][1])


def _summarise(system, config, records, actors, stats, baseline, under_updates) -> dict:
    # First time any actor saw a version >= v.
    firsts = sorted(p for seen in actors.seen for p in seen)
    latencies, calls = [], []
    for version, t_start, t_end in records:
        calls.append(t_end - t_start)
        first = next((t for v, t in firsts if v >= version and t >= t_start), None)
        if first is not None:
            latencies.append(first - t_start)
    return {
        "system": system,
        "baseline_rps": baseline,
        "under_updates_rps": under_updates,
        "dip_percent": 100.0 * (1.0 - under_updates / baseline) if baseline else float("nan"),
        "updates_published": len(records),
        "updates_applied": stats["weight_updates"],
        "update_latency_us": latency_summary(np.array(latencies, dtype=np.int64)),
        "updates_measured": len(latencies),
        "publish_call_us": latency_summary(np.array(calls, dtype=np.int64)),
        # How long applying an update held the model lock (batchserve only).
        "apply_ms_p50": stats.get("p50_weight_apply_ms"),
        "apply_ms_max": stats.get("max_weight_apply_ms"),
        # The whole run's (both phases): "—" where the server does not say.
        **fast_path_summary(stats),
        "errors": [repr(e) for e in actors.errors],
    }


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tensordict", "batchserve"])
    return ctx


def run(config: WeightSyncConfig, systems, *, progress_cb=None) -> dict:
    ctx = _context()
    results = []
    for i, system in enumerate(systems):
        if progress_cb is not None:
            progress_cb(system, i)
        try:
            results.append(run_system(system, config, ctx))
        except Exception as exc:  # reported in its row; the other systems still run
            results.append({"system": system, "errors": [f"the run failed: {exc!r}"]})
    return {"config": dataclasses.asdict(config), "parameters": parameter_count(config),
            "results": results}


def failures(report: dict) -> list[str]:
    return [f"{r['system']}: {e}" for r in report["results"] for e in r["errors"]]


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}ms"


def format_report(report: dict) -> str:
    c = report["config"]
    lines = [
        f"{c['name']}: {report['parameters'] / 1e6:.2f} M-parameter MLP on {c['device']}, "
        f"{c['actors']} actor threads, updates at {c['update_hz']:g} Hz; "
        f"{c['rounds']} x ({c['duration']:g} s without, {c['duration']:g} s with updates)",
        f"{'system':<19}{'req/s':>9}{'with updates':>14}{'dip':>8}"
        f"{'latency p50':>13}{'p99':>9}{'max':>9}{'publish p50':>13}{'lock p50':>10}"
        f"{'max':>8}{'applied':>10}{'fast %':>8}",
    ]
    for r in report["results"]:
        if "update_latency_us" not in r:
            lines.append(f"{r['system']:<19}{'; '.join(r['errors'])}")
            continue
        lat, call = r["update_latency_us"], r["publish_call_us"]
        lines.append(
            f"{r['system']:<19}{r['baseline_rps']:>9,.0f}{r['under_updates_rps']:>14,.0f}"
            f"{r['dip_percent']:>7.1f}%{lat['p50'] / 1e3:>11.1f}ms{lat['p99'] / 1e3:>7.1f}ms"
            f"{lat['max'] / 1e3:>7.1f}ms{call['p50'] / 1e3:>11.1f}ms"
            f"{_ms(r['apply_ms_p50']):>10}{_ms(r['apply_ms_max']):>8}"
            f"{r['updates_applied']:>6}/{r['updates_published']:<4}"
            f"{percent_text(r.get('fast_path_fraction')):>8}"
        )
    return "\n".join(lines)

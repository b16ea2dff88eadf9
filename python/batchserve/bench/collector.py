"""Collection throughput: batchserve's AsyncBatchedCollector vs torchrl's.

Both collectors step the same environments (torchrl's ``CountingEnv``, so the
environment costs next to nothing and the policy service dominates) with the
same small policy, environment workers in threads, for each ``num_envs``.
Per round, each system collects for ``duration`` seconds after ``warmup``
batches; systems alternate within a round so that the machine's drift weighs
on both alike. Reports frames/s (median over rounds), batchserve / torchrl,
and the share of the policy requests batchserve's fast path served over the
measured batches ("fast %", from the server's stats() before and after them;
"—" for torchrl's server, which does not report it).

Systems (``--vs torchrl`` adds torchrl's):

* ``batchserve``: :class:`batchserve.AsyncBatchedCollector`;
* ``torchrl``: :class:`torchrl.collectors.AsyncBatchedCollector`.

    batchserve-bench benchmarks/collector --vs torchrl --json collector.json
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from batchserve.bench.metrics import (
    fast_path_summary,
    merge_fast_path,
    percent_text,
    refusals_text,
)
from batchserve.bench.scenario import config_of

BATCHSERVE_SYSTEMS = ("batchserve",)
TORCHRL_SYSTEMS = ("torchrl",)


@dataclass
class CollectorConfig:
    """Fields of ``benchmarks/collector.toml``."""

    name: str = "collector"
    kind: str = "collector"
    num_envs: list = field(default_factory=lambda: [8, 32])
    frames_per_batch: int = 256
    max_batch_size: int = 64
    hidden: int = 64
    duration: float = 3.0  # seconds measured per system, per round
    warmup: int = 2  # batches collected before measuring
    rounds: int = 2
    torch_threads: int = 1

    def validate(self) -> CollectorConfig:
        if not self.num_envs or min(self.num_envs) < 1:
            raise ValueError("num_envs must be a non-empty list of positive integers")
        for name in ("frames_per_batch", "max_batch_size", "hidden", "rounds", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.duration <= 0 or self.warmup < 0:
            raise ValueError("duration must be positive and warmup non-negative")
        return self


def load_config(data: dict, **overrides) -> CollectorConfig:
    return config_of(CollectorConfig, data, "collector", **overrides)


class _Policy(nn.Module):
    """An MLP over CountingEnv's integer observation; acts 1 (count up)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, observation):
        out = self.net(observation.float())
        return (out * 0 + 1).to(observation.dtype)


def _collector(system: str, num_envs: int, config: CollectorConfig):
    from tensordict.nn import TensorDictModule
    from torchrl.testing.mocking_classes import CountingEnv

    if system == "batchserve":
        from batchserve.collector import AsyncBatchedCollector
    else:
        from torchrl.collectors import AsyncBatchedCollector
    policy = TensorDictModule(_Policy(config.hidden), in_keys=["observation"], out_keys=["action"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return AsyncBatchedCollector(
            [lambda: CountingEnv(max_steps=10_000)] * num_envs,
            policy=policy,
            frames_per_batch=config.frames_per_batch,
            total_frames=-1,
            max_batch_size=config.max_batch_size,
            env_backend="threading",
        )


def measure(system: str, num_envs: int, config: CollectorConfig) -> dict:
    """frames/s of one collector over ``config.duration`` seconds."""
    collector = _collector(system, num_envs, config)
    try:
        batches = iter(collector)
        for _ in range(config.warmup):
            next(batches)
        # Not reset: "mean_batch" stays the whole run's; the fast path's
        # share is the difference over the measured batches.
        before = collector.server_stats()
        frames, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < config.duration:
            frames += next(batches).numel()
        stats = collector.server_stats()
    finally:
        collector.shutdown()
    fast_path = fast_path_summary(stats, before)
    return {
        "frames": frames,
        "seconds": elapsed,
        "fps": frames / elapsed,
        "mean_batch": stats.get("avg_batch_size", stats.get("mean_batch_size")),
        **fast_path,
    }


def steps(config: CollectorConfig, systems) -> int:
    return len(config.num_envs) * config.rounds * len(systems)


def run(config: CollectorConfig, systems, *, progress_cb=None) -> dict:
    torch.set_num_threads(config.torch_threads)
    results, done = [], 0
    for num_envs in config.num_envs:
        runs = {system: [] for system in systems}
        for round_index in range(config.rounds):
            # Alternate which system goes first from one round to the next.
            order = systems if round_index % 2 == 0 else list(reversed(systems))
            for system in order:
                if progress_cb is not None:
                    progress_cb(f"{num_envs} envs, {system}", done)
                runs[system].append(measure(system, num_envs, config))
                done += 1
        for system in systems:
            results.append(
                {
                    "system": system,
                    "num_envs": num_envs,
                    "runs": runs[system],
                    "fps": statistics.median(r["fps"] for r in runs[system]),
                    **merge_fast_path(runs[system], [r["frames"] for r in runs[system]]),
                    "errors": [],
                }
            )
    return {"config": dataclasses.asdict(config), "results": results}


def failures(report: dict) -> list[str]:
    return [f"{r['system']}: {e}" for r in report["results"] for e in r["errors"]]


def format_report(report: dict) -> str:
    c = report["config"]
    lines = [
        f"{c['name']}: CountingEnv in threads, {c['hidden']}-unit MLP, frames_per_batch "
        f"{c['frames_per_batch']}, max_batch_size {c['max_batch_size']}; median of "
        f"{c['rounds']} alternated rounds of {c['duration']:g} s",
        f"{'num_envs':>8}  {'system':<12}{'frames/s':>10}{'runs':>22}{'vs torchrl':>12}"
        f"{'fast %':>8}",
    ]
    by_key = {(r["num_envs"], r["system"]): r for r in report["results"]}
    for r in report["results"]:
        torchrl = by_key.get((r["num_envs"], "torchrl"))
        ratio = (
            f"{r['fps'] / torchrl['fps']:.2f}x"
            if torchrl is not None and r["system"] != "torchrl"
            else ""
        )
        runs = " ".join(f"{x['fps']:,.0f}" for x in r["runs"])
        fast = percent_text(r.get("fast_path_fraction"))
        lines.append(
            f"{r['num_envs']:>8}  {r['system']:<12}{r['fps']:>10,.0f}{runs:>22}{ratio:>12}"
            f"{fast:>8}"
        )
        if r.get("fast_path_refusals"):
            lines.append(f"{'':>10}general path: {refusals_text(r['fast_path_refusals'])}")
    return "\n".join(lines)

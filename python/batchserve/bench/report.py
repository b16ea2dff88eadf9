"""Results: aggregation over rounds, the tables, the JSON file, the plot."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections import defaultdict
from importlib import metadata

import numpy as np

from batchserve.bench import metrics
from batchserve.bench.runner import OVERHEAD_BLOCK, Measurement
from batchserve.bench.scenario import Scenario
from batchserve.bench.systems import LIMITS

SCHEMA_VERSION = 2
SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "schema.json")


def aggregate(measurements: list[Measurement]) -> dict:
    """Per system and actor count, over all rounds: exact percentiles of every
    sample, summed requests and seconds, merged batch-size histograms."""
    grouped: dict[tuple[str, int], list[Measurement]] = defaultdict(list)
    for m in measurements:
        grouped[(m.system, m.actors)].append(m)
    rows = {}
    for (system, actors), runs in grouped.items():
        samples = np.concatenate([m.latencies_ns for m in runs])
        requests = sum(m.requests for m in runs)
        seconds = sum(m.seconds for m in runs)
        histogram = metrics.merge_histograms(m.batch_sizes for m in runs)
        forward = np.asarray([ns for m in runs for ns in m.forward_ns], dtype=np.int64)
        queue_p50 = [m.queue_ms_p50 for m in runs if not math.isnan(m.queue_ms_p50)]
        rows[(system, actors)] = {
            "system": system,
            "actors": actors,
            "rounds": len(runs),
            "requests": requests,
            "seconds": seconds,
            "requests_per_s": requests / seconds if seconds > 0 else 0.0,
            "latency_us": metrics.latency_summary(samples) if len(samples) else {},
            "latency_cdf_us": metrics.cdf_points(samples),
            "batch_size_mean": metrics.histogram_mean(histogram),
            "batch_size_histogram": {str(k): v for k, v in histogram.items()},
            "forward_ms_p50": (
                metrics.nearest_rank(np.sort(forward), 0.5) / 1e6 if len(forward) else None
            ),
            "queue_wait_ms_p50": float(np.mean(queue_p50)) if queue_p50 else None,
            "cpu_s_per_1000_requests": (
                1000.0 * sum(m.cpu_s for m in runs) / requests if requests else None
            ),
            "rss_growth_mb": max(m.rss_growth_mb for m in runs),
            **_fast_path(runs),
        }
    return rows


def _fast_path(runs: list[Measurement]) -> dict:
    """The fast path's share over a row's rounds (None for the bare call and
    for servers that do not report it)."""
    served = [m for m in runs if m.fast_path is not None]
    return metrics.merge_fast_path([m.fast_path for m in served],
                                   [m.requests for m in served])


def overhead_us(rows: dict) -> dict[str, float]:
    """Per system: its p50 at one actor minus the bare call's p50."""
    bare = rows.get(("bare", 1))
    if not bare:
        return {}
    return {
        system: row["latency_us"]["p50"] - bare["latency_us"]["p50"]
        for (system, actors), row in sorted(rows.items())
        if system not in ("bare", *LIMITS) and actors == 1  # the limits: no model, no overhead
    }


def interleaved_lines(interleaved: dict) -> list[str]:
    """One line per system whose one-actor overhead was measured
    interleaved with the bare call (``runner.measure_overhead``)."""
    lines = []
    for system, r in interleaved.items():
        line = (f"overhead per call at 1 actor, interleaved ({system} p50 − bare p50 over the "
                f"same {r['calls']:,} calls each, in alternated blocks of {OVERHEAD_BLOCK}): "
                f"{r['overhead_us']:.1f} µs ({system} {r['p50_us']:.1f} µs, bare "
                f"{r['bare_p50_us']:.1f} µs)")
        if r.get("floor_us") is not None:
            line += (f"; the floor under it (a batch of one in and its row out, no server: "
                     f"runner.floor_call) {r['floor_us']:.1f} µs, {system} "
                     f"{r['overhead_us'] - r['floor_us']:.1f} µs above it")
        lines.append(line)
    return lines


def refusal_lines(rows: dict) -> list[str]:
    """One line per row whose server reported why requests took the
    general path (its stats()' fast_path_refusals)."""
    lines = []
    for (system, actors), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
        refusals = row.get("fast_path_refusals")
        if refusals:
            lines.append(f"general path at {actors} actors ({system}): "
                         f"{metrics.refusals_text(refusals)}")
    return lines


def inline_lines(rows: dict) -> list[str]:
    """One line per row whose server served requests on their callers'
    threads (inline calls: a lone caller finding the server idle)."""
    lines = []
    for (system, actors), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
        inline, served = row.get("inline_requests"), row.get("server_requests")
        if inline and served:
            lines.append(f"inline calls at {actors} actors ({system}): {inline:,} of "
                         f"{served:,} requests served on the caller's thread")
    return lines


def limit_rps(null_row: dict) -> float | None:
    """The most any server can serve the null row's actors: their own loop
    (the null server's req/s, serving free) plus the model's share per
    request at the largest batch they can form (its forward at that batch
    over the batch size), as if the two never overlapped. An upper bound:
    it counts no collation, no hand-back and no wait for a batch to fill."""
    rps, batch, forward_ms = (null_row["requests_per_s"], null_row["batch_size_mean"],
                              null_row["forward_ms_p50"])
    if rps <= 0:
        return None
    per_request_s = 1.0 / rps
    if batch and forward_ms is not None:
        per_request_s += forward_ms / 1e3 / batch
    return 1.0 / per_request_s


def _limit_row(rows: dict, actors: int) -> dict | None:
    """The row a server's share of the limit is read against at ``actors``:
    the echo (the round trip to a server thread counted) if it ran, else
    the null server."""
    return rows.get(("echo", actors)) or rows.get(("null", actors))


def _of_limit(rows: dict, row: dict) -> float | None:
    """A server row's req/s over the limit at its actor count."""
    if row["system"] in ("bare", *LIMITS):
        return None
    limit_row = _limit_row(rows, row["actors"])
    limit = limit_rps(limit_row) if limit_row else None
    return row["requests_per_s"] / limit if limit else None


_LIMIT_NAMES = {
    "null": "the actors against the null server",
    "echo": "with the hand-off: the actors against an echo through batchserve's queue",
}


def limit_lines(rows: dict) -> list[str]:
    """Per actor count run with a limit system (null, echo): the limit
    (limit_rps) and what it is made of, as a multiple of torchrl's req/s,
    so a target ratio can be read against what is possible."""
    lines = []
    for (system, actors), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
        limit = limit_rps(row) if system in LIMITS else None
        if limit is None:
            continue
        text = (f"limit at {actors} actors ({system}): {limit:,.0f} req/s "
                f"({_LIMIT_NAMES[system]} {row['requests_per_s']:,.0f} req/s; model "
                f"{_fmt(row['forward_ms_p50'], 3)} ms per batch of "
                f"{_fmt(row['batch_size_mean'], 0)})")
        ref = rows.get(("torchrl", actors))
        if ref and ref["requests_per_s"] > 0:
            text += f" = {limit / ref['requests_per_s']:.2f}× torchrl"
        ours = rows.get(("batchserve", actors))
        if ours:
            text += f"; batchserve reaches {ours['requests_per_s'] / limit:.0%} of it"
        lines.append(text)
    return lines


def _fmt(value, digits=1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def describe(scenario: Scenario) -> str:
    """A scenario in one line (the table's title)."""
    text = (f"{scenario.name}: {scenario.actors}, obs {scenario.observation_dtype}"
            f"{list(scenario.observation_shape)}, model {scenario.model}, "
            f"max_batch_size {scenario.max_batch_size}, timeout {scenario.timeout * 1e3:g} ms")
    if scenario.server != "thread":
        text += f", server {scenario.server}"
    if scenario.single_file:
        text += ", single file"
    if scenario.client != "direct":
        text += f", client {scenario.client}"
    if scenario.interaction_type is not None:
        text += f", interaction {scenario.interaction_type}"
    if scenario.collate != "default":
        text += f", collate {scenario.collate}"
    if scenario.server_nice is not None:
        text += f", server nice {scenario.server_nice}"
    return text


def table(scenario: Scenario, rows: dict):
    """A rich Table: one row per (actors, system), ratios vs torchrl."""
    from rich.table import Table

    t = Table(title=describe(scenario))
    for name, justify in [
        ("actors", "right"), ("system", "left"), ("req/s", "right"),
        ("p50 µs", "right"), ("p90 µs", "right"), ("p99 µs", "right"),
        ("p99.9 µs", "right"), ("max µs", "right"), ("batch", "right"),
        ("fast %", "right"), ("queue p50 ms", "right"), ("fwd p50 ms", "right"),
        ("CPU s/1k", "right"), ("RSS +MB", "right"), ("req/s vs torchrl", "right"),
        ("p99 vs torchrl", "right"),
    ]:
        t.add_column(name, justify=justify)
    with_limit = any(system in LIMITS for system, _ in rows)
    if with_limit:
        t.add_column("of limit", justify="right")
    order = {"bare": 0, "batchserve": 1, "torchrl": 2, "torchrl-mp": 3, "null": 4, "echo": 5}
    for key in sorted(rows, key=lambda k: (k[1] if k[0] != "bare" else 0, order.get(k[0], 9))):
        row = rows[key]
        lat = row["latency_us"]
        ref = rows.get(("torchrl", row["actors"]))
        ratio = p99_ratio = None
        if ref and row["system"] == "batchserve" and ref["requests_per_s"] > 0:
            ratio = row["requests_per_s"] / ref["requests_per_s"]
            p99_ratio = lat["p99"] / ref["latency_us"]["p99"]
        cells = [
            "bare" if row["system"] == "bare" else str(row["actors"]),
            row["system"],
            _fmt(row["requests_per_s"], 0),
            _fmt(lat.get("p50")), _fmt(lat.get("p90")), _fmt(lat.get("p99")),
            _fmt(lat.get("p99.9")), _fmt(lat.get("max")),
            _fmt(row["batch_size_mean"], 2),
            metrics.percent_text(row["fast_path_fraction"]),
            _fmt(row["queue_wait_ms_p50"], 3), _fmt(row["forward_ms_p50"], 3),
            _fmt(row["cpu_s_per_1000_requests"], 3), _fmt(row["rss_growth_mb"], 1),
            "—" if ratio is None else f"{ratio:.2f}×",
            "—" if p99_ratio is None else f"{p99_ratio:.2f}×",
        ]
        if with_limit:
            share = _of_limit(rows, row)
            cells.append("—" if share is None else f"{share:.0%}")
        t.add_row(*cells)
    return t


def _batchserve_revision() -> str | None:
    """HEAD of the batchserve checkout: the package's own (editable install)
    or the one the run started in, if it is a batchserve checkout."""
    for where in (os.path.dirname(__file__), os.getcwd()):
        try:
            top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=where,
                                 capture_output=True, text=True, timeout=5).stdout.strip()
            if top and os.path.isdir(os.path.join(top, "python", "batchserve", "bench")):
                return subprocess.run(["git", "rev-parse", "HEAD"], cwd=top, capture_output=True,
                                      text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def machine() -> dict:
    """What the numbers were measured on."""
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    revision = _batchserve_revision()
    import torch

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "tensordict": version("tensordict"),
        "torchrl": version("torchrl"),
        # tensordict 0.14's TensorDictModule looks pandas up on every output
        # key; installed, the lookup is a dict hit (docs/api.md).
        "pandas": version("pandas"),
        "batchserve": version("batchserve"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_revision": revision,
    }


def cpu_list(cpus) -> str:
    """CPU numbers as taskset writes them: ``0-3,6``."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def machine_line(m: dict) -> str:
    """The footer of a report: the machine, the CPUs the run had when fewer
    than all of them (``--cpus``, taskset), and the library versions."""
    cores = f"{m['cores']} cores"
    if m.get("cpus") is not None and len(m["cpus"]) < (m["cores"] or 0):
        cores += f", run on CPU{'s' if len(m['cpus']) > 1 else ''} {cpu_list(m['cpus'])}"
    threads = m["torch_threads"]
    return (f"{m['cpu_model']}, {cores}; torch {m['torch']} ({threads} intra-op "
            f"thread{'' if threads == 1 else 's'}), tensordict {m['tensordict']}, "
            f"torchrl {m['torchrl']}")


def to_json(results: list[tuple[Scenario, dict, dict]], command: list[str]) -> dict:
    """The document --json writes; its schema is batchserve/bench/schema.json.
    ``results``: per scenario, its rows and its interleaved overheads."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "machine": machine(),
        "scenarios": [
            {
                "scenario": scenario.to_json(),
                "overhead_us": overhead_us(rows),
                "overhead_interleaved": interleaved,
                "results": [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))],
            }
            for scenario, rows, interleaved in results
        ],
    }


def write_json(path: str, document: dict) -> None:
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def plot(path: str, results: list[tuple[Scenario, dict, dict]]) -> None:
    """Throughput vs actors, and latency CDFs at the largest actor count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.5 * len(results)), squeeze=False)
    for (scenario, rows, _), (ax_tp, ax_cdf) in zip(results, axes):
        systems = sorted({s for s, _ in rows if s not in ("bare", *LIMITS)})  # off the scale
        for system in systems:
            counts = sorted(a for s, a in rows if s == system)
            ax_tp.plot(counts, [rows[(system, a)]["requests_per_s"] for a in counts],
                       marker="o", label=system)
        if ("bare", 1) in rows:
            ax_tp.axhline(rows[("bare", 1)]["requests_per_s"], linestyle="--", color="gray",
                          label="bare model(td), 1 thread")
        ax_tp.set_xscale("log", base=2)
        all_counts = sorted({a for s, a in rows if s != "bare"})
        ax_tp.set_xticks(all_counts, [str(a) for a in all_counts])
        ax_tp.set_xlabel(f"actor {scenario.actors}")
        ax_tp.set_ylabel("requests / s")
        ax_tp.set_title(f"{scenario.name}: throughput")
        ax_tp.grid(True, alpha=0.3)
        ax_tp.legend()
        largest = max(a for s, a in rows if s != "bare")
        for system in systems:
            cdf = rows.get((system, largest), {}).get("latency_cdf_us", [])
            if cdf:
                ax_cdf.plot([p[0] for p in cdf], [p[1] for p in cdf], label=system)
        if ("bare", 1) in rows:
            cdf = rows[("bare", 1)]["latency_cdf_us"]
            ax_cdf.plot([p[0] for p in cdf], [p[1] for p in cdf], linestyle="--", color="gray",
                        label="bare model(td)")
        ax_cdf.set_xscale("log")
        ax_cdf.set_xlabel("latency per request at the caller (µs)")
        ax_cdf.set_ylabel("fraction of requests")
        ax_cdf.set_title(f"{scenario.name}: latency CDF, {largest} actors")
        ax_cdf.grid(True, alpha=0.3)
        ax_cdf.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

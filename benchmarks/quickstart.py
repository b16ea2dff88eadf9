"""Quick multi-thread demo: batchserve vs a bare per-request model call.

Actor threads each call the server in a loop for a few seconds; the script
prints requests/s and per-request latency (p50/p99, measured at the caller)
for 1, 8 and 32 threads, next to the bare baseline (``model(td)`` at batch
size 1 in one thread). With torchrl installed it runs torchrl's
InferenceServer + ThreadingTransport on the same workload in the same run,
alternating with batchserve round by round.

Workload (design §3): MLP 64 -> 256 -> 8 as a TensorDictModule, observation
float32[64], max_batch_size=64, timeout=1 ms, CPU.

    python benchmarks/quickstart.py                # 1, 8, 32 threads
    python benchmarks/quickstart.py --threads 8 --seconds 5 --no-torchrl
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

import batchserve


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_policy() -> TensorDictModule:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    return TensorDictModule(mlp, in_keys=["observation"], out_keys=["action"])


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def run_server(server_cls, transport_cls, threads: int, seconds: float) -> dict:
    """Actors call the server for `seconds`; returns req/s and latency (µs)."""
    policy = make_policy()
    transport = transport_cls()
    server = server_cls(policy, transport, max_batch_size=64, timeout=0.001)
    latencies: list[list[int]] = [[] for _ in range(threads)]
    stop = threading.Event()
    start_barrier = threading.Barrier(threads + 1)

    def actor(index: int) -> None:
        client = transport.client()
        observation = torch.randn(64)
        record = latencies[index].append
        clock = time.perf_counter_ns
        start_barrier.wait()
        while not stop.is_set():
            td = TensorDict({"observation": observation})
            t0 = clock()
            client(td)
            record(clock() - t0)

    with server:
        workers = [threading.Thread(target=actor, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        start_barrier.wait()
        time.sleep(seconds * 0.2)  # warm-up, excluded
        for lat in latencies:
            lat.clear()
        t0 = time.perf_counter()
        time.sleep(seconds)
        counted = sum(len(lat) for lat in latencies)
        elapsed = time.perf_counter() - t0
        stop.set()
        for w in workers:
            w.join()
    samples = sorted(x for lat in latencies for x in lat)
    return {
        "req_s": counted / elapsed,
        "p50_us": percentile(samples, 0.50) / 1e3,
        "p99_us": percentile(samples, 0.99) / 1e3,
    }


def run_bare(seconds: float) -> dict:
    """model(td) at batch size 1 in a loop, one thread."""
    policy = make_policy()
    observation = torch.randn(64)
    samples = []
    clock = time.perf_counter_ns
    end = time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            td = TensorDict({"observation": observation.unsqueeze(0)}, batch_size=[1])
            t0 = clock()
            policy(td)
            samples.append(clock() - t0)
    samples.sort()
    return {
        "req_s": len(samples) / seconds,
        "p50_us": percentile(samples, 0.50) / 1e3,
        "p99_us": percentile(samples, 0.99) / 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per system")
    parser.add_argument("--no-torchrl", action="store_true", help="skip torchrl's server")
    args = parser.parse_args()
    torch.set_num_threads(1)

    systems = {"batchserve": (batchserve.InferenceServer, batchserve.ThreadingTransport)}
    if not args.no_torchrl:
        try:
            from torchrl.modules.inference_server import InferenceServer, ThreadingTransport

            systems["torchrl"] = (InferenceServer, ThreadingTransport)
        except ImportError:
            print("(torchrl not installed: batchserve only; pip install torchrl to compare)")

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}; batchserve {batchserve.__version__}"
    )
    bare = run_bare(args.seconds)
    print(
        f"bare model(td), batch 1, 1 thread: {bare['req_s']:9.0f} req/s  "
        f"p50 {bare['p50_us']:7.1f} µs  p99 {bare['p99_us']:7.1f} µs"
    )
    header = f"{'threads':>7}  {'system':<10} {'req/s':>9} {'p50 µs':>9} {'p99 µs':>9}"
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        results: dict[str, list[dict]] = {name: [] for name in systems}
        for _ in range(args.rounds):  # A, B, A, B: machine noise hits both
            for name, (server_cls, transport_cls) in systems.items():
                results[name].append(run_server(server_cls, transport_cls, threads, args.seconds))
        for name, runs in results.items():
            req_s = statistics.median(r["req_s"] for r in runs)
            p50 = statistics.median(r["p50_us"] for r in runs)
            p99 = statistics.median(r["p99_us"] for r in runs)
            line = f"{threads:>7}  {name:<10} {req_s:9.0f} {p50:9.1f} {p99:9.1f}"
            if threads == 1:
                line += f"   overhead vs bare p50: {p50 - bare['p50_us']:+.1f} µs"
            print(line)
        if "torchrl" in results:
            ratio = statistics.median(r["req_s"] for r in results["batchserve"]) / max(
                statistics.median(r["req_s"] for r in results["torchrl"]), 1e-9
            )
            print(f"{'':>7}  batchserve/torchrl req/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()

"""Where the server's time goes, per batch: a per-stage timing breakdown.

    python benchmarks/stage_breakdown.py [--actors 1,8,32] [--seconds 2] [--processes]
    python benchmarks/stage_breakdown.py --scenario benchmarks/policy [--actors 8,32]

Runs the harness's MLP workload (obs float32[64], 64->256->8) with actor
threads calling a batchserve server (or, with ``--processes``, actor
processes through a SharedMemoryTransport), or, with ``--scenario``, a
thread scenario of ``batchserve-bench`` (its model, requests, client
wrapping, collate, batching settings and interaction type; ``policy``:
torchrl's stochastic actor called through ``PolicyClientModule``), and times
the server loop's stages by wrapping them (so each figure includes a little
timing overhead):

* ``wait``: ``collect()`` from the call to its return: waking the previous
  batch's callers, waiting for requests (the batching policy) and taking the
  GIL back, which the woken callers hold meanwhile;
* ``gather``: copying fast-path rows into staging;
* ``input``: the model's input TensorDict over staging, and the rows'
  interaction stamps;
* ``model``: the forward itself (torch releases and retakes the GIL around
  each op, so callers holding it stretch this too);
* ``hand-back``: output columns and one TensorDict per request (for
  processes: the copy into the response slots and the wake-ups);
* ``other``: the rest of the loop (stats, prefetch, checks).

Batches served inline (a lone caller serving its own request while the
server idles, see docs/fast_path.md) are counted and timed in the same
stages, on the caller's thread; the server's ``wait`` then spans them.
``--no-inline-calls`` serves every batch on the server's thread.

It is a diagnostic for the figures in docs/benchmarks.md, not a benchmark: compare
systems with ``batchserve-bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import threading
import time

import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from batchserve import InferenceServer, SharedMemoryTransport, ThreadingTransport
from batchserve.batching import batch_source as _batch_source
from batchserve.batching import fast_path as _fast_path
from batchserve.bench import scenario as _scenario
from batchserve.bench import systems as _systems
from batchserve.bench import workload as _workload
from batchserve.server import loop as _loop

_clock = time.perf_counter_ns


class Timings:
    def __init__(self):
        self.ns = dict.fromkeys(("wait", "gather", "input", "model", "hand-back", "serve"), 0)
        self.batches = 0
        self.inline = 0  # batches served on their caller's thread

    def wrap(self, owner, name: str, stage: str, count: bool = False) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = _clock()
            try:
                return original(*args, **kwargs)
            finally:
                self.ns[stage] += _clock() - t0
                if count:
                    self.batches += 1

        setattr(owner, name, timed)

    def count_inline(self) -> None:
        original = _loop.WorkerLoop.serve_inline

        def counted(*args, **kwargs):
            self.inline += 1
            return original(*args, **kwargs)

        _loop.WorkerLoop.serve_inline = counted

    def reset(self) -> None:
        self.ns = dict.fromkeys(self.ns, 0)
        self.batches = 0
        self.inline = 0


def _process_actor(client, counts, index: int, stop) -> None:
    observation = torch.randn(64)
    while not stop.is_set():
        client(TensorDict({"observation": observation}))
        counts[index] += 1


def _workload_of(scenario):
    """The policy, a maker of one actor's callable, a maker of one request,
    the server's settings and the context the actors run in: the default
    MLP's, or a thread scenario's (as batchserve-bench runs it)."""
    if scenario is None:
        policy = TensorDictModule(
            nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 8)),
            in_keys=["observation"],
            out_keys=["action"],
        )
        observation = torch.randn(64)
        return (policy, lambda transport: transport.client,
                lambda: TensorDict({"observation": observation}),
                dict(max_batch_size=64, timeout=0.001), contextlib.nullcontext())
    leaves = _workload.make_leaves(scenario)
    return (_workload.make_policy(scenario),
            lambda transport: _workload.client_factory(scenario, transport),
            lambda: _workload.request(leaves),
            _systems.server_kwargs(scenario), _workload.interaction_context(scenario))


def run(actors: int, seconds: float, timings: Timings, processes: bool, threads: int,
        inline_calls: bool, scenario=None) -> None:
    policy, client_factory, new_request, server_kwargs, context = _workload_of(scenario)
    configured = threading.local()

    def model(td):
        # torch's setting is per thread: the server's fresh thread gets it.
        # Not an actor's thread serving itself inline: set explicitly there,
        # a count above one makes MKL fork a spinning team a thread left at
        # the default does not (see the worker loop's main()).
        on_server = threading.current_thread().name == "batchserve-worker"
        if on_server and not getattr(configured, "done", False):
            torch.set_num_threads(threads)
            configured.done = True
        t0 = _clock()
        out = policy(td)
        timings.ns["model"] += _clock() - t0
        return out

    if processes:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "tensordict", "batchserve"])
        transport = SharedMemoryTransport(
            TensorDict({"observation": torch.zeros(64)}),
            TensorDict({"action": torch.zeros(8),
                        "policy_version": torch.zeros((), dtype=torch.long)}),
            num_slots=max(64, 2 * actors),
        )
        stop, counts = ctx.Event(), ctx.Array("q", actors, lock=False)
        threads_or_processes = [
            ctx.Process(target=_process_actor, args=(transport.client(), counts, i, stop))
            for i in range(actors)
        ]
    else:
        transport = ThreadingTransport()
        stop, counts = threading.Event(), [0] * actors
        new_client = client_factory(transport)

        def actor(i: int) -> None:
            client = new_client()
            while not stop.is_set():
                client(new_request())
                counts[i] += 1

        threads_or_processes = [threading.Thread(target=actor, args=(i,)) for i in range(actors)]
    server = InferenceServer(model, transport, inline_calls=inline_calls, **server_kwargs).start()
    with context:  # the interaction type is process-wide: entered once, around the actors
        for t in threads_or_processes:
            t.start()
        while sum(counts) < 1000:  # every actor is up (processes take a while)
            time.sleep(0.05)
        time.sleep(0.5)
        timings.reset()
        done0, t0 = sum(counts), _clock()
        time.sleep(seconds)
        elapsed, done = _clock() - t0, sum(counts) - done0
        snapshot = dict(timings.ns)
        batches = max(timings.batches, 1)
        inline = timings.inline
        stop.set()
        for t in threads_or_processes:
            t.join()
    server.shutdown()
    other = (snapshot["serve"] - snapshot["gather"] - snapshot["input"] - snapshot["model"]
             - snapshot["hand-back"])
    print(
        f"{actors:3d} actors: {done / seconds:9,.0f} req/s, mean batch {done / batches:5.1f}, "
        f"{elapsed / batches / 1e3:7.1f} µs per batch:"
    )
    for stage, ns in (
        ("wait", snapshot["wait"]),
        ("gather", snapshot["gather"]),
        ("input", snapshot["input"]),
        ("model", snapshot["model"]),
        ("hand-back", snapshot["hand-back"]),
        ("other", other),
    ):
        print(f"      {stage:10s} {ns / batches / 1e3:8.1f} µs  {ns / elapsed * 100:5.1f}%")
    if inline:
        print(f"      ({inline:,} of {batches:,} batches served inline, on the caller's thread)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--torch-threads", type=int, default=2,
                        help="intra-op threads, in the main and the server's thread")
    parser.add_argument("--processes", action="store_true",
                        help="actor processes through a SharedMemoryTransport")
    parser.add_argument("--no-inline-calls", action="store_true",
                        help="serve every batch on the server's thread (inline_calls=False)")
    parser.add_argument("--scenario", metavar="PATH",
                        help="a thread scenario of batchserve-bench (e.g. benchmarks/policy) "
                             "instead of the MLP")
    args = parser.parse_args()
    scenario = None if args.scenario is None else _scenario.load(args.scenario)
    if scenario is not None and (args.processes or scenario.actors != "threads"
                                 or scenario.device != "cpu"):
        parser.error("--scenario takes a thread scenario on the CPU, without --processes")
    torch.set_num_threads(args.torch_threads)
    timings = Timings()
    timings.wrap(_batch_source.NativeBatches, "next_batch", "wait")
    timings.wrap(_loop.WorkerLoop, "serve_batch", "serve", count=True)
    timings.wrap(_fast_path.FastPath, "gather", "gather")
    timings.wrap(_fast_path.FastPath, "model_input", "input")
    timings.wrap(_fast_path.StagingBuffer, "interaction_codes", "input")
    timings.wrap(_fast_path.FastPath, "hand_back", "hand-back")
    timings.count_inline()
    for actors in (int(a) for a in args.actors.split(",")):
        run(actors, args.seconds, timings, args.processes, args.torch_threads,
            not args.no_inline_calls, scenario)


if __name__ == "__main__":
    main()

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

``--one-caller`` instead takes one caller's call apart (the harness's
main job, or ``--scenario``'s model and requests, called plainly): one
thread times, per round, one call of each of these in turn (a rotating
order, so the machine's drift and the order's cache effects fall on all
alike), each with its request built outside the clock:

* ``bare``: the plain ``model(td)`` on a TensorDict of batch size [1]
  (grad off outside the clock; the harness's bare row runs it inside its
  recording wrapper, ~1 µs more);
* ``floor``: the steps any server handing back a row takes, in their
  cheapest form: the caller's leaves unsqueezed into a batch of one, the
  forward, the output's row with the caller's own memory copied (a
  ``TensorDictModule`` passes its input through), one TensorDict of it
  (``batchserve.bench.runner.floor_call``, which the harness's interleaved
  overhead measures too);
* ``rows``: batchserve's version of those steps (``LoneRequests``: the
  same, plus the policy-version stamp and the checks);
* ``serve_one``: the server's inline runner (``WorkerLoop.serve_one``:
  the grad switch, the model lock, weight sync's poll, the statistics);
* ``client``: ``client(td)``: the C++ side around it (the schema match,
  the inline gate, the call into Python).

Each line's step is its p50 minus the line above's.

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
from batchserve.bench import metrics as _metrics
from batchserve.bench import runner as _runner
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


def one_caller(scenario, rounds: int) -> None:
    """Takes one caller's call apart (see the module's docstring)."""
    scenario = scenario or _scenario.HEADLINE
    policy = _workload.make_policy(scenario)
    make, bare_call = _runner.bare_call(policy, scenario)
    leaves = _workload.make_leaves(scenario)
    server = InferenceServer(policy, ThreadingTransport(), **_systems.server_kwargs(scenario))
    server.start()
    client = server.client()
    with _workload.interaction_context(scenario):
        for _ in range(100):  # the schema is learned and the inline runner made
            client(_workload.request(leaves))
        loop, run = server._loop, server._run
        lone = loop._lone
        if lone is None or not lone.served or lone.stamp is not None or not lone._flat:
            server.shutdown()
            raise SystemExit("--one-caller: this scenario's requests are not served by "
                             "LoneRequests, or not flat (an interaction stamp, metadata, "
                             "nested keys)")
        keys = server._transport.request_spec.keys
        version_key = server.policy_version_key
        floor = _runner.floor_call(policy, scenario)

        def ordered(td):
            return tuple(td.get(key) for key in keys)

        def rows(row_leaves):
            output = policy(lone.model_input(row_leaves, None))
            return lone.result(output, row_leaves, version_key, 0)

        def timed(call, prepare, grad: bool):
            def one_call() -> int:
                argument = prepare()
                torch.set_grad_enabled(grad)
                t0 = _clock()
                call(argument)
                elapsed = _clock() - t0
                torch.set_grad_enabled(True)
                return elapsed
            return one_call

        direct = [0]  # serve_one's calls (recorded as inline calls too)

        def serve_one(td_and_leaves):
            td, row_leaves = td_and_leaves
            direct[0] += 1
            return loop.serve_one(run, td, row_leaves, lone.schema_id, 0)

        def request_and_leaves():
            td = _workload.request(leaves)
            return td, ordered(td)

        def request_leaves():
            return ordered(_workload.request(leaves))

        steps = [
            ("bare", timed(bare_call, make, False), "model(td), batch size [1]"),
            ("floor", timed(floor, lambda: _workload.request(leaves), False),
             "the row steps any server takes"),
            ("rows", timed(rows, request_leaves, False), "batchserve's row steps (LoneRequests)"),
            ("serve_one", timed(serve_one, request_and_leaves, True),
             "the inline runner around them"),
            ("client", timed(client, lambda: _workload.request(leaves), True),
             "client(td): the C++ match, gate and call"),
        ]
        times = [[] for _ in steps]
        inline0 = server.stats()["inline_requests"]
        for i in range(rounds + rounds // 10):  # the first tenth warms up, unrecorded
            for k in range(len(steps)):
                j = (i + k) % len(steps)
                elapsed = steps[j][1]()
                if i >= rounds // 10:
                    times[j].append(elapsed)
        inline = server.stats()["inline_requests"] - inline0 - direct[0]
    server.shutdown()
    p50 = [_metrics.nearest_rank(sorted(t), 0.5) / 1e3 for t in times]  # as the harness's
    print(f"one caller ({scenario.name}), {rounds:,} calls of each in turn, p50:")
    for j, (name, _, what) in enumerate(steps):
        step = "" if j == 0 else f"{p50[j] - p50[j - 1]:+7.1f} µs"
        print(f"  {name:10s} {p50[j]:8.1f} µs {step:>11s}  {what}")
    print(f"  overhead (client - bare) {p50[-1] - p50[0]:.1f} µs; the floor's steps "
          f"{p50[1] - p50[0]:.1f} µs; {inline:,} of {rounds + rounds // 10:,} client calls "
          "were served inline")


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
    parser.add_argument("--one-caller", type=int, metavar="ROUNDS", nargs="?", const=20000,
                        help="take one caller's call apart instead, over ROUNDS calls of each "
                             "step (default 20000)")
    parser.add_argument("--scenario", metavar="PATH",
                        help="a thread scenario of batchserve-bench (e.g. benchmarks/policy) "
                             "instead of the MLP")
    args = parser.parse_args()
    scenario = None if args.scenario is None else _scenario.load(args.scenario)
    if scenario is not None and (args.processes or scenario.actors != "threads"
                                 or scenario.device != "cpu"):
        parser.error("--scenario takes a thread scenario on the CPU, without --processes")
    torch.set_num_threads(args.torch_threads)
    if args.one_caller is not None:
        if scenario is not None and scenario.client != "direct":
            parser.error("--one-caller calls the scenario's model plainly: "
                         "take a scenario without a client wrapper")
        one_caller(scenario, args.one_caller)
        return
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

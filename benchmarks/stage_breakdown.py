"""Where the server's time goes, per batch: a per-stage timing breakdown.

    python benchmarks/stage_breakdown.py [--actors 1,8,32] [--seconds 2]

Runs the harness's MLP workload (obs float32[64], 64->256->8) with actor
threads calling a batchserve server, and times the server loop's stages by
wrapping them (so each figure includes a little timing overhead):

* ``wait``: ``collect()`` from the call to its return: waking the previous
  batch's callers, waiting for requests (the batching policy) and taking the
  GIL back, which the woken callers hold meanwhile;
* ``gather``: copying fast-path rows into staging;
* ``model``: the forward itself (torch releases and retakes the GIL around
  each op, so callers holding it stretch this too);
* ``hand-back``: output columns and one TensorDict per request;
* ``other``: the rest of the loop (stats, prefetch, checks).

It is a diagnostic for the figures in the README, not a benchmark: compare
systems with ``batchserve-bench``.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from batchserve import InferenceServer, ThreadingTransport
from batchserve import _batch_source, _fast_path, _server

_clock = time.perf_counter_ns


class Timings:
    def __init__(self):
        self.ns = dict.fromkeys(("wait", "gather", "model", "hand-back", "serve"), 0)
        self.batches = 0

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

    def reset(self) -> None:
        self.ns = dict.fromkeys(self.ns, 0)
        self.batches = 0


def run(actors: int, seconds: float, timings: Timings) -> None:
    policy = TensorDictModule(
        nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 8)),
        in_keys=["observation"],
        out_keys=["action"],
    )

    def model(td):
        t0 = _clock()
        out = policy(td)
        timings.ns["model"] += _clock() - t0
        return out

    transport = ThreadingTransport()
    server = InferenceServer(model, transport, max_batch_size=64, timeout=0.001).start()
    stop = threading.Event()
    counts = [0] * actors
    observation = torch.randn(64)

    def actor(i: int) -> None:
        client = transport.client()
        while not stop.is_set():
            client(TensorDict({"observation": observation}))
            counts[i] += 1

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(actors)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    timings.reset()
    done0, t0 = sum(counts), _clock()
    time.sleep(seconds)
    elapsed, done = _clock() - t0, sum(counts) - done0
    snapshot = dict(timings.ns)
    batches = max(timings.batches, 1)
    stop.set()
    for t in threads:
        t.join()
    server.shutdown()
    other = snapshot["serve"] - snapshot["gather"] - snapshot["model"] - snapshot["hand-back"]
    print(
        f"{actors:3d} actors: {done / seconds:9,.0f} req/s, mean batch {done / batches:5.1f}, "
        f"{elapsed / batches / 1e3:7.1f} µs per batch:"
    )
    for stage, ns in (
        ("wait", snapshot["wait"]),
        ("gather", snapshot["gather"]),
        ("model", snapshot["model"]),
        ("hand-back", snapshot["hand-back"]),
        ("other", other),
    ):
        print(f"      {stage:10s} {ns / batches / 1e3:8.1f} µs  {ns / elapsed * 100:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    timings = Timings()
    timings.wrap(_batch_source.NativeBatches, "next_batch", "wait")
    timings.wrap(_server.InferenceServer, "_serve_batch", "serve", count=True)
    timings.wrap(_fast_path.FastPath, "gather", "gather")
    timings.wrap(_fast_path.FastPath, "hand_back", "hand-back")
    for actors in (int(a) for a in args.actors.split(",")):
        run(actors, args.seconds, timings)


if __name__ == "__main__":
    main()

"""batchserve-bench: the latency/throughput harness (``python -m batchserve.bench``)."""

from batchserve.bench.cli import main

__all__ = ["main"]

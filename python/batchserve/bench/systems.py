"""The systems compared: how each one serves a scenario.

Thread actors use each system's ThreadingTransport. Process actors use
torchrl's MPTransport for both systems (batchserve's own cross-process
transport is not built yet), so that comparison measures the server loops
on the same transport.
"""

from __future__ import annotations

import importlib.util

from batchserve.bench.scenario import Scenario

SYSTEMS = ("batchserve", "torchrl")


class BenchError(RuntimeError):
    """A run that cannot go on; the CLI prints it and exits non-zero."""


def torchrl_available() -> bool:
    return importlib.util.find_spec("torchrl") is not None


def require_torchrl(why: str) -> None:
    if not torchrl_available():
        raise BenchError(f"{why} needs torchrl: pip install torchrl  (or pip install \"batchserve[bench]\")")


def server_kwargs(scenario: Scenario) -> dict:
    kwargs = dict(
        max_batch_size=scenario.max_batch_size,
        min_batch_size=scenario.min_batch_size,
        timeout=scenario.timeout,
    )
    if scenario.device != "cpu":
        kwargs.update(device=scenario.device, output_device="cpu")
    return kwargs


def make_transport(system: str, scenario: Scenario, mp_context=None):
    if scenario.actors == "processes":
        require_torchrl("process actors (torchrl's MPTransport)")
        from torchrl.modules.inference_server import MPTransport

        return MPTransport(ctx=mp_context)
    if system == "batchserve":
        import batchserve

        return batchserve.ThreadingTransport()
    require_torchrl("--vs torchrl")
    from torchrl.modules.inference_server import ThreadingTransport

    return ThreadingTransport()


def make_server(system: str, model, transport, scenario: Scenario):
    if system == "batchserve":
        import batchserve

        return batchserve.InferenceServer(model, transport, **server_kwargs(scenario))
    require_torchrl("--vs torchrl")
    from torchrl.modules.inference_server import InferenceServer

    return InferenceServer(model, transport, **server_kwargs(scenario))

"""torchrl's ``AsyncBatchedCollector``, serving its policy on batchserve.

:class:`AsyncBatchedCollector` takes torchrl's arguments and runs torchrl's
collection machinery (environment pool, coordinator threads, trajectory
assembly, replay-buffer writer, weight-update plumbing); only the thread-backed
inference server is batchserve's :class:`~batchserve.InferenceServer`, over
a batchserve transport.
"""

from __future__ import annotations

import inspect

import torch
from tensordict.nn import InteractionType
from torchrl.collectors import AsyncBatchedCollector as _TorchrlAsyncBatchedCollector
from torchrl.modules.inference_server import InferenceServer as _TorchrlInferenceServer
from torchrl.modules.inference_server._client import (
    _INTERACTION_TYPE_TO_CODE,
    _NO_INTERACTION_TYPE_CODE,
)

from batchserve.batching.collate import INTERACTION_TYPE_KEY
from batchserve.server.server import InferenceServer
from batchserve.transports.base import InferenceTransport
from batchserve.transports.threading import ThreadingTransport

_TORCHRL_SIGNATURE = inspect.signature(_TorchrlAsyncBatchedCollector.__init__)


class AsyncBatchedCollector(_TorchrlAsyncBatchedCollector):
    """torchrl's :class:`~torchrl.collectors.AsyncBatchedCollector` with the
    policy served by :class:`batchserve.InferenceServer`.

    Same arguments and behaviour as torchrl's collector. Where torchrl would
    serve the policy from a thread of this process, batchserve's server serves
    it instead, from the same resolved settings (batch sizes, timeout,
    ``collate_fn``, devices, ``weight_sync``, policy version and its key,
    stats):

    - with ``transport=None`` / ``"driver"`` (or ``"auto"`` falling back to
      the driver) and ``policy_backend="threading"`` (the default), over a
      :class:`batchserve.ThreadingTransport` in place of torchrl's
      ``SlotTransport``;
    - with a batchserve transport passed as ``transport=``, over that one.

    Each environment thread then reaches the server through a
    :class:`CollectorClient` (torchrl's ``PolicyClientModule`` contract: the
    collector's exploration type stamped on every request) whose call waits
    for its result in C++ with the GIL released, instead of through a
    ``concurrent.futures.Future``.

    Everything else is torchrl's own machinery, unchanged: environment worker
    processes that reach a dedicated inference process
    (``ProcessSlotTransport``, ``transport="auto"`` with
    ``env_backend="multiprocessing"``), ``InferenceServerConfig(
    service_backend="process")``, a torchrl transport passed as
    ``transport=``, and ``policy_backend="multiprocessing" | "ray" |
    "monarch"``. batchserve has no counterpart of the slot exchange those
    process workers use.

    Raises:
        ValueError: a ``static_batch_size`` (CUDA-graph capture) in
            ``server_config`` while batchserve's server does not take one.
    """

    def __init__(self, *args, **kwargs):
        bound = _TORCHRL_SIGNATURE.bind(self, *args, **kwargs)  # torchrl's TypeError
        transport = bound.arguments.get("transport")
        super().__init__(*args, **kwargs)
        torchrl_server = self._server
        if type(torchrl_server) is not _TorchrlInferenceServer:
            return  # a process server: torchrl's (see the class docstring)
        if isinstance(transport, InferenceTransport):
            served = transport
        elif transport in (None, "driver", "auto") and self._policy_backend == "threading":
            served = ThreadingTransport()
        else:
            return
        self._transport = served
        self._server = _serve_like(torchrl_server, served)
        if not self._uses_process_env_workers:
            self._clients = [
                CollectorClient(served.client(), self.exploration_type)
                for _ in range(self._num_envs)
            ]


class CollectorClient:
    """One environment's policy client in :class:`AsyncBatchedCollector`.

    What torchrl's ``PolicyClientModule`` does for the collector's loops,
    over a batchserve client: every request carries the collector's
    exploration type (torchrl's int8 stamp, so the server runs its forward
    under that mode and never batches it with another), ``client(td)``
    returns the policy's output and ``client.submit(td)`` a future of it.
    The call waits in C++ with the GIL released (a blocking caller's
    completion): no Future is made, claimed and resolved per step, and each
    environment has one request in flight by construction, which is what
    ``PolicyClientModule``'s in-flight bound gives the collector's loops.

    Args:
        client: the :class:`~batchserve.InferenceClient` of the served transport.
        interaction_type: the mode stamped on requests (None: the server's
            module default, torchrl's "no interaction type" code).
    """

    __slots__ = ("_client", "_stamp")

    def __init__(self, client, interaction_type: InteractionType | None):
        self._client = client
        code = (_NO_INTERACTION_TYPE_CODE if interaction_type is None
                else _INTERACTION_TYPE_TO_CODE[InteractionType(interaction_type).value])
        # Read by the server, never written: one tensor serves every request.
        self._stamp = torch.tensor(code, dtype=torch.int8)

    def _stamped(self, td):
        td = td.clone(recurse=False)  # the caller's TensorDict keeps its keys
        td.set(INTERACTION_TYPE_KEY, self._stamp.expand(td.batch_size))
        return td

    def __call__(self, td):
        return self._client(self._stamped(td))

    def submit(self, td):
        return self._client.submit(self._stamped(td))


def _serve_like(torchrl_server, transport) -> InferenceServer:
    """batchserve's server over ``transport`` with ``torchrl_server``'s
    resolved settings (the collector built that one and never started it)."""
    options = {}
    static_batch_size = torchrl_server.static_batch_size
    if static_batch_size is not None:
        if "static_batch_size" not in inspect.signature(InferenceServer).parameters:
            raise ValueError(
                f"static_batch_size={static_batch_size} (CUDA-graph capture) is not "
                "supported by batchserve's InferenceServer; leave "
                "InferenceServerConfig.static_batch_size as None."
            )
        options["static_batch_size"] = static_batch_size
    server = InferenceServer(
        torchrl_server.model,
        transport,
        max_batch_size=torchrl_server.max_batch_size,
        min_batch_size=torchrl_server.min_batch_size,
        timeout=torchrl_server.timeout,
        collate_fn=torchrl_server.collate_fn,
        policy_device=torchrl_server.policy_device,
        output_device=torchrl_server.output_device,
        weight_sync=torchrl_server.weight_sync,
        weight_sync_model_id=torchrl_server._weight_sync_model_id,
        collect_stats=torchrl_server.collect_stats,
        stats_window_size=torchrl_server.stats_window_size,
        policy_version=torchrl_server.policy_version,
        policy_version_key=torchrl_server.policy_version_key,
        **options,
    )
    if not hasattr(server, "static_batch_size"):
        # torchrl's collector reads it before starting the server.
        server.static_batch_size = None
    return server


AsyncBatchedCollector.__init__.__signature__ = _TORCHRL_SIGNATURE

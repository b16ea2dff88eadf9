"""torchrl's ``AsyncBatchedCollector``, serving its policy on batchserve.

:class:`AsyncBatchedCollector` takes torchrl's arguments and runs torchrl's
collection machinery (environment pool, coordinator threads, trajectory
assembly, replay-buffer writer, weight-update plumbing); only the thread-backed
inference server is batchserve's :class:`~batchserve.InferenceServer`, over
a batchserve transport. With environments in threads (``env_backend=
"threading"``), each environment thread also steps its own environment
instead of handing every step to the environment pool's executor.
"""

from __future__ import annotations

import functools
import inspect
import os
import queue
import threading

import torch
from tensordict import NonTensorData, TensorDict
from tensordict.nn import InteractionType
from torchrl.collectors import AsyncBatchedCollector as _TorchrlAsyncBatchedCollector
from torchrl.collectors._async_batched import (
    _ENV_IDX_KEY,
    _put_result,
    _wait_while_paused,
)
from torchrl.envs import AsyncEnvPool
from torchrl.envs.async_envs import ThreadingAsyncEnvPool
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
    ``concurrent.futures.Future``. With ``env_backend="threading"`` each
    environment thread also steps its own environment, with the functions
    torchrl's threading pool runs for a step and a reset, instead of
    submitting each step to the pool's ``ThreadPoolExecutor`` and waiting on
    its future: per step that skips a thread hand-off both ways and the
    pool's one-row stack and unbind around it. The transitions are the ones
    torchrl's loop yields (same keys, ``"env_index"`` included), and
    ``collector.env`` is still the pool, holding the same environments.

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
        # One environment per thread of this process: each env thread can step
        # its own (torchrl's batched coordinator and process workers differ).
        self._steps_envs_in_env_threads = (
            not self._uses_process_env_workers
            and self._env_backend == "threading"
            and self._envs_per_worker == 1
        )

    def _ensure_started(self) -> None:
        """torchrl's start-up for threads that step their own environment.

        What torchrl's ``_ensure_started`` does for environments in threads
        (the pool built under the driver's CPU mask, the server started, the
        pending weights applied, one coordinator thread per environment),
        except that each thread runs :func:`_env_thread_loop`.
        """
        if not getattr(self, "_steps_envs_in_env_threads", False):
            super()._ensure_started()
            return
        if self._workers and all(worker.is_alive() for worker in self._workers):
            return
        original_affinity = None
        try:
            if self._driver_affinity is not None:
                original_affinity = os.sched_getaffinity(0)
                os.sched_setaffinity(0, self._driver_affinity)
            kwargs = {}
            if self._create_env_kwargs is not None:
                kwargs["create_env_kwargs"] = self._create_env_kwargs
            self._env_pool = AsyncEnvPool(
                self._create_env_fn,
                backend=self._env_backend,
                envs_per_worker=self._envs_per_worker,
                exchange=self._env_exchange,
                worker_affinity=self._worker_affinity,
                **kwargs,
            )
            if not self._server.is_alive:
                self._server.start()
            self._apply_pending_weights()
            self._uses_batched_coordinator = False
            self._result_queue = queue.Queue(maxsize=self.frames_per_batch)
            self._shutdown_event = threading.Event()
            self._workers = [
                threading.Thread(
                    target=_env_thread_loop,
                    kwargs={
                        "pool": self._env_pool,
                        "env_id": env_id,
                        "client": self._clients[env_id],
                        "result_queue": self._result_queue,
                        "shutdown_event": self._shutdown_event,
                        "pause_request": self._pause_request,
                        "env_device": self._env_device,
                        "storing_device": self._storing_device,
                    },
                    daemon=True,
                    name=f"AsyncBatchedCollector-env-{env_id}",
                )
                for env_id in range(self._num_envs)
            ]
            for worker in self._workers:
                worker.start()
        except Exception:
            self.shutdown(raise_on_error=False)
            raise
        finally:
            if original_affinity is not None:
                os.sched_setaffinity(0, original_affinity)


def _env_thread_loop(
    pool: ThreadingAsyncEnvPool,
    env_id: int,
    client,
    result_queue: queue.Queue,
    shutdown_event: threading.Event,
    pause_request: list,
    env_device: torch.device | None,
    storing_device: torch.device | None,
) -> None:
    """One environment's coordinator thread, stepping that environment itself.

    torchrl's ``_env_loop`` (reset -> infer -> step -> put transition ->
    infer -> ...), with the step and the reset made here by the threading
    pool's own functions (``_step_and_maybe_reset_func``, ``_reset_func``:
    the same calls and ``"env_index"`` entries its executor would make).
    The environment is stepped by one thread at a time, as in the pool, where
    each step may run on any executor thread.
    """
    env = pool.envs[env_id]
    pause = functools.partial(_wait_while_paused, pause_request)
    try:
        # What the pool hands the environment for a reset it makes up: an
        # empty TensorDict of the environment's shape, carrying its index.
        reset_td = TensorDict(batch_size=env.batch_size, device=pool.device)
        reset_td.set(_ENV_IDX_KEY, NonTensorData(data=env_id))
        obs = pool._reset_func((env, reset_td, env_id))
        while not shutdown_event.is_set():
            pause()
            if shutdown_event.is_set():
                break
            # As torchrl's loop: a shallow copy without device, so requests
            # from streams that started or reset at different times collate.
            action_td = client.call_owned(obs.clear_device_())
            if env_device is not None:
                action_td = action_td.to(env_device)
            if _ENV_IDX_KEY not in action_td.keys():
                # The pool sets it on what it steps; most policies pass it on.
                action_td.set(_ENV_IDX_KEY, NonTensorData(data=env_id))
            cur_td, obs = pool._step_and_maybe_reset_func((env, action_td, env_id))
            cur_td.set(_ENV_IDX_KEY, env_id)
            if storing_device is not None:
                cur_td = cur_td.to(storing_device)
            if not _put_result(result_queue, cur_td, shutdown_event, pause=pause):
                break
    except Exception as exc:
        if not shutdown_event.is_set():
            _put_result(result_queue, exc, shutdown_event)


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

    def _stamp_in_place(self, td):
        td.set(INTERACTION_TYPE_KEY, self._stamp.expand(td.batch_size))
        return td

    def __call__(self, td):
        # A shallow copy: the caller's TensorDict keeps its keys.
        return self._client(self._stamp_in_place(td.clone(recurse=False)))

    def call_owned(self, td):
        """``self(td)`` for a TensorDict no one else holds: stamped in place."""
        return self._client(self._stamp_in_place(td))

    def submit(self, td):
        return self._client.submit(self._stamp_in_place(td.clone(recurse=False)))


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

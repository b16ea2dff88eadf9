"""InferenceServer, the public facade: its settings, its policy version and
weight updates, its lifecycle (start, shutdown), clients and statistics. The
worker loop is ``server.loop``; weight-sync binding ``weights.schemes``;
settings parsing ``config``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from tensordict.base import TensorDictBase
from tensordict.nn.probabilistic import interaction_type as current_interaction_type

from batchserve.batching.batch_source import batches_for
from batchserve.batching.collate import default_collate, interaction_context
from batchserve.batching.fast_path import schema_from_spec
from batchserve.config import (
    BatchingSetting,
    ServerSettings,
    as_device,
    nice_value,
    positive_int,
    seconds,
)
from batchserve.server.deployment import ServerDeployment, make_transport
from batchserve.server.lifecycle import ServerRun, running_servers
from batchserve.server.loop import WorkerLoop
from batchserve.server.static_batches import StaticBatches, check_static_batch_size
from batchserve.server.stats import ServerStats
from batchserve.server.version import PolicyVersion
from batchserve.transports.base import as_transport, transport_kind
from batchserve.weights.schemes import WeightSyncBinding
from batchserve.weights.updates import check_weights, copy_weights, flat_weights, model_weights

_log = logging.getLogger("batchserve")

# Seconds an idle server waits for work at a time when nothing else needs
# looking at (see InferenceServer._configure_batches); it bounds how late a
# worker whose transport a later server took over sees its stop.
IDLE_WAIT_S = 0.1


class InferenceServer(metaclass=ServerDeployment):
    """Auto-batching inference server.

    Actors submit single TensorDicts through a transport; a background worker
    collects them into batches, runs the model once per batch and hands each
    actor its row of the output. A drop-in for
    ``torchrl.modules.inference_server.InferenceServer``: same arguments,
    defaults and behaviour, with the queue, the batching policy and the
    hand-back of :class:`~batchserve.ThreadingTransport` in C++.

    Args:
        model (nn.Module or Callable): maps a batched TensorDict to a batched
            TensorDict (e.g. a ``TensorDictModule``).
        transport (InferenceTransport or str, optional): the communication
            backend: :class:`~batchserve.ThreadingTransport` or any object
            with torchrl's transport protocol (torchrl's own transports
            included), or a selector as torchrl's: ``"auto"`` (default),
            ``"thread"``/``"queue"`` (a :class:`~batchserve.ThreadingTransport`),
            ``"shared_memory"``, ``"ray"``, ``"process"``, ``"process_slot"``,
            ``"direct"``, ``"distributed"`` (see ``batchserve.server.deployment``).

    Keyword Args:
        policy_factory (Callable, optional): builds the policy where it is
            served; required for ``service_backend="process"`` / ``"ray"``
            (exclusive with ``model``).
        service_backend (str, optional): where the policy runs: ``"thread"``
            (default), ``"process"`` (a :class:`~batchserve.ProcessInferenceServer`
            is returned) or ``"ray"`` (a :class:`~batchserve.RayInferenceServer`).
            An enclosing ``torchrl.service_backend(...)`` context sets the default.
        service_backend_options (dict, optional): ``mp_context`` and
            ``startup_timeout`` for a process, ``ray_init_config`` and
            ``remote_config`` for Ray; anything else raises.
        transport_options (dict, optional): keyword arguments of the
            transport a selector names (not with a transport instance).
        request_spec, response_spec (TensorDictBase, optional): the layouts
            of one request and one result, required by the ``"shared_memory"``,
            ``"process_slot"`` and process ``"distributed"`` transports.
        num_clients (int, optional): the slots of the ``"direct"``,
            ``"shared_memory"`` and ``"process_slot"`` transports; an error
            with a transport that takes any number of clients.
        static_batch_size (int or sequence of int, optional): serve the
            policy as CUDA graphs of fixed batch sizes (see
            ``batchserve.server.static_batches``): an int is torchrl's one
            size, a sequence a set of buckets (a batch is padded to the
            smallest that holds it, by repeating its last request). The
            largest must be at least ``max_batch_size``; the policy device
            must be CUDA (``ValueError`` otherwise, as in torchrl). Graphs
            are captured from ``request_spec`` at :meth:`start`, or by
            :meth:`prepare_cudagraph` before it; weights must then be
            updated in place. ``stats()`` reports the padding. Default:
            ``None`` (eager forwards).
        shutdown_event (Event, optional): an event of the caller's; setting
            it stops the worker (as :meth:`shutdown`, checked between
            batches); :meth:`start` clears it and :meth:`shutdown` sets it.
        max_batch_size (int, optional): most requests per forward pass.
            Default: ``64``.
        min_batch_size (int, optional): after the first request, keep
            collecting until this many or until ``timeout`` seconds after the
            oldest request arrived. Default: ``1`` (dispatch at once).
        timeout (float, optional): seconds; the deadline above, and, with
            ``weight_sync`` or ``shutdown_event`` set, how long an idle server
            waits before polling them (without, it waits ``IDLE_WAIT_S`` =
            0.1 s at a time: requests, settings changes and shutdown wake it
            at once). Default: ``0.01``.
        collate_fn (Callable, optional): stacks a list of requests into a
            batch. Default: :func:`~tensordict.lazy_stack`.
        device (torch.device or str, optional): where batches (and the
            model) go before the forward. ``None``: no transfer.
        policy_device: alias of ``device`` (torchrl's newer name).
        output_device (torch.device or str, optional): where results go
            before they are handed back.
        weight_sync: where new weights come from, polled between batches:
            a :class:`~batchserve.SharedMemoryWeightReceiver` (a trainer
            process publishing with :class:`~batchserve.WeightPublisher`),
            or a torchrl ``WeightSyncScheme`` (or any object with its
            receiver methods).
        weight_sync_model_id (str, optional): model id used to initialise
            ``weight_sync`` on the receiver side. Default: ``"policy"``.
        policy_version (int, optional): initial policy version stamped on
            results. Default: ``0``.
        policy_version_key (NestedKey or None, optional): where results carry
            the policy version; ``None`` disables the stamp.
            Default: ``"policy_version"``.
        collect_stats (bool, optional): record :meth:`stats`. Default: ``True``.
        stats_window_size (int, optional): recent samples kept for latency
            percentiles. Default: ``1024``.
        server_config, device_config: torchrl's ``InferenceServerConfig`` /
            ``InferenceDeviceConfig`` (or objects with the same attributes),
            exclusive with the matching keyword arguments.
        request_spec (TensorDictBase, optional): a representative single
            request; with a :class:`~batchserve.ThreadingTransport`, requests
            are checked against it at submission (a missing key raises
            ``KeyError``, another dtype, shape or device ``ValueError``) and
            take the fast path. Default: the fast path learns the schema from
            traffic.
        inline_calls (bool, optional): a blocking ``client(td)`` (no
            ``timeout``) that finds the server idle, waiting on an empty
            queue, while no other caller is active runs its own request, a
            batch of one, on its own thread: the same model, under the same
            lock, no thread hand-off (see ``csrc/core/inline_gate.h``; counted
            in ``stats()["inline_requests"]``). Only fast-path requests, and
            only for a model on the CPU without ``static_batch_size``.
            ``False`` keeps every forward on the server's thread (a model
            bound to it). Default: ``True``.
        worker_nice (int, optional): the nice value the server's worker
            thread runs at (Linux, where each thread has its own), set when
            it starts. With more actor processes than cores, every
            actor the server wakes takes a core from it at once, while the
            server is the thread all their requests wait for; a value below
            the actors' (``-10``) gives it precedence (see
            ``docs/benchmarks.md``, "The server's priority"). Going below the
            process's own value takes ``CAP_SYS_NICE`` or an ``RLIMIT_NICE``
            that allows it: ``start()`` raises when the system refuses.
            Inline calls run on their caller's thread, at its priority.
            Default: ``None``, the thread's as it is.

    Requests of one fixed schema with the default ``collate_fn`` take the
    fast path: copied without the GIL into staging memory, one forward over
    a dense batch, rows copied back by each caller's thread (see
    ``batchserve.batching.fast_path``). Others take the general path, ``collate_fn``
    and ``unbind``, on the same server.

    Example:
        >>> from tensordict.nn import TensorDictModule
        >>> from batchserve import InferenceServer, ThreadingTransport
        >>> import torch.nn as nn
        >>> policy = TensorDictModule(nn.Linear(4, 2), in_keys=["obs"], out_keys=["act"])
        >>> transport = ThreadingTransport()
        >>> server = InferenceServer(policy, transport, max_batch_size=8)
        >>> server.start()
        >>> client = transport.client()
        >>> # client(td) can now be called from any thread
        >>> server.shutdown()
    """

    def __init__(
        self,
        model: torch.nn.Module | Callable[[TensorDictBase], TensorDictBase] | None = None,
        transport: Any = "auto",
        *,
        policy_factory: Callable[[], Any] | None = None,
        service_backend: str = "thread",
        service_backend_options: dict | None = None,
        transport_options: dict | None = None,
        response_spec=None,
        num_clients: int | None = None,
        static_batch_size: int | None = None,
        shutdown_event=None,
        max_batch_size: int | None = None,
        min_batch_size: int | None = None,
        timeout: float | None = None,
        collate_fn: Callable | None = None,
        device: torch.device | str | None = None,
        policy_device: torch.device | str | None = None,
        output_device: torch.device | str | None = None,
        weight_sync=None,
        weight_sync_model_id: str = "policy",
        policy_version: int = 0,
        policy_version_key="policy_version",
        collect_stats: bool | None = None,
        stats_window_size: int | None = None,
        server_config=None,
        device_config=None,
        request_spec=None,
        inline_calls: bool = True,
        worker_nice: int | None = None,
    ):
        # The deployment keywords were resolved by ServerDeployment (they stay
        # in the signature for help() and type checkers); a subclass built
        # directly takes only a thread transport's.
        if service_backend != "thread" or policy_factory is not None or service_backend_options:
            raise ValueError(
                f"{type(self).__name__} runs in a thread of this process: pass "
                "service_backend/policy_factory/service_backend_options to InferenceServer."
            )
        if model is None:
            raise ValueError("InferenceServer needs a model.")
        if response_spec is not None:
            raise ValueError(
                "response_spec is for the 'shared_memory', 'process_slot' and 'distributed' "
                "transports; a thread server's results take the model's layout."
            )
        transport = make_transport(
            "auto" if transport is None else transport,
            service_backend="thread",
            transport_options=transport_options,
            num_clients=num_clients,
        )
        served = as_transport(transport)  # raises TypeError unless it has torchrl's protocol
        settings = ServerSettings.parse(
            max_batch_size=max_batch_size, min_batch_size=min_batch_size, timeout=timeout,
            collect_stats=collect_stats, stats_window_size=stats_window_size,
            device=device, policy_device=policy_device, output_device=output_device,
            server_config=server_config, device_config=device_config,
        )
        self.static_batch_size, static_sizes = _static_batch_size(
            static_batch_size, server_config, settings
        )
        self.model = model
        self.transport = transport
        self._shutdown_event = shutdown_event
        self._transport = served  # the declared interface, adapted once
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.device = settings.device
        self.output_device = settings.output_device
        self.weight_sync = weight_sync
        self.policy_version_key = policy_version_key
        self.collect_stats = settings.collect_stats
        self.inline_calls = bool(inline_calls)
        self.worker_nice = nice_value("worker_nice", worker_nice)
        self._stats = ServerStats(settings.stats_window_size)
        self._versions = PolicyVersion(policy_version, self._stats)
        self._batches = batches_for(served)
        self._graphs = (
            StaticBatches(model, static_sizes, settings.device,
                          record_padding=self._stats.record_padding)
            if static_sizes is not None else None
        )
        self._graph_request_spec = request_spec if static_sizes is not None else None
        self._graph_mode = None  # the interaction type the graphs are captured under
        if request_spec is not None and (static_sizes is None or served.request_queue is not None):
            if served.request_queue is None:
                raise ValueError(
                    "request_spec needs a batchserve transport (ThreadingTransport, "
                    "SharedMemoryTransport); "
                    f"{type(transport).__name__} has its own request format."
                )
            served.set_request_schema(schema_from_spec(request_spec), strict=True)
        self._max_batch_size = settings.max_batch_size
        self._min_batch_size = settings.min_batch_size
        self._timeout = settings.timeout
        self._configure_batches()
        weight_sync_binding = WeightSyncBinding(
            self, weight_sync_model_id, self._versions, self._stats
        )
        self._loop = WorkerLoop(
            self, served, self._batches, self._versions, self._stats, weight_sync_binding,
            graphs=self._graphs,
        )
        self._lifecycle_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._last_worker: threading.Thread | None = None  # may outlive a shutdown
        self._run: ServerRun | None = None
        self._last_run: ServerRun | None = None
        self._started_in: int | None = None  # the pid of the process serving
        if self.device is not None and hasattr(self.model, "to"):
            self.model.to(self.device)

    # -- settings (may change while serving; a waiting server applies them now)

    @property
    def policy_device(self) -> torch.device | None:
        """Alias of :attr:`device`."""
        return self.device

    @policy_device.setter
    def policy_device(self, device) -> None:
        self.device = as_device(device)

    # Batching settings: checked, then applied to the batch source at once.
    max_batch_size = BatchingSetting(positive_int)
    min_batch_size = BatchingSetting(positive_int)
    timeout = BatchingSetting(seconds)

    def _configure_batches(self) -> None:
        # An idle server wakes every `timeout` only when something is to be
        # looked at then (weights to poll, the user's shutdown_event); else
        # every IDLE_WAIT_S: new requests, settings changes and closing wake
        # it anyway, and fewer wake-ups leave a lone caller the idle server
        # its inline calls need.
        idle_wait = (self._timeout
                     if self.weight_sync is not None or self._shutdown_event is not None
                     else max(self._timeout, IDLE_WAIT_S))
        self._batches.configure(self._max_batch_size, self._min_batch_size, self._timeout,
                                idle_wait)

    # -- policy version and weights ------------------------------------------

    @property
    def policy_version(self) -> int:
        """The policy version stamped on results."""
        return self._versions.value

    def update_policy_weights_(self, model_id=None, policy_or_weights=None, **kwargs):
        """Weight-sync cascade hook: records one applied update.

        torchrl's schemes call this on their ``context`` after applying
        weights; the server installs itself as the context of a torchrl
        scheme that has none, so the version bumps exactly once per update
        (an update applied under the model lock was counted already).
        """
        self._versions.cascade()
        self._check_graphs()

    def update_model(
        self, update_fn: Callable[[Any], Any], *, mark_weight_update: bool = True
    ) -> Any:
        """Run ``update_fn(model)`` between batches, under the model lock.

        Args:
            update_fn (Callable): called with the served model; no forward
                runs while it does.
            mark_weight_update (bool, optional): bump the policy version and
                the weight-update count when ``update_fn`` returns.
                Default: ``True``.

        Returns:
            what ``update_fn`` returned.
        """
        with self._versions.model_lock:
            result = update_fn(self.model)
            if mark_weight_update:
                self._versions.mark_update()
            self._check_graphs()
        return result

    def update_weights(self, weights, *, version: int | None = None) -> int:
        """Copy new weights into the served model, between batches.

        The weights are checked in full first (names, shapes, dtypes); a
        bad update raises and leaves the model as it was. They are then
        copied in place under the model lock, so no forward sees a model
        half updated and a forward waits at most for this copy; results
        of later batches carry the new version.

        Args:
            weights: a TensorDict of parameters and buffers (as from
                ``TensorDict.from_module(model)``, on any device) or a
                ``state_dict``.
            version (int, optional, keyword-only): the policy version to
                stamp from now on; ``None`` adds one to the current one.

        Returns:
            the policy version now stamped on results.

        Raises:
            ValueError: a parameter is missing, unexpected, or of another
                shape or dtype (named in the message).
            TypeError: ``weights`` is neither, or the model is not an
                ``nn.Module``.
        """
        given = flat_weights(weights)
        served, skipped = model_weights(self.model)
        check_weights(served, given, skipped)

        def copy_in() -> int | None:
            copy_weights(served, given)
            self._check_graphs()  # copied in place: the graphs stay valid
            return version

        return self._versions.apply_update(copy_in)

    def update_model_weights(self, weights, *, mark_weight_update: bool = True) -> None:
        """torchrl's name for a weight update (as its process and Ray
        servers have it): ``weights`` copied into the served model between
        batches, checked in full first (see :meth:`update_weights`).

        Args:
            weights: a TensorDict of parameters and buffers or a ``state_dict``.
            mark_weight_update (bool, optional, keyword-only): bump the policy
                version. Default: ``True``.
        """
        given = flat_weights(weights, "update_model_weights")
        served, skipped = model_weights(self.model, "update_model_weights")
        check_weights(served, given, skipped)
        if mark_weight_update:
            self._versions.apply_update(lambda: copy_weights(served, given))
        else:
            self.update_model(lambda _: copy_weights(served, given), mark_weight_update=False)

    # -- lifecycle ------------------------------------------------------------

    def start(self, *, setup_timeout: float | None = 1.0) -> InferenceServer:
        """Start the background worker.

        Weight-sync set-up (``init_on_receiver``, ``connect``) runs on the
        worker, and ``start`` waits up to ``setup_timeout`` seconds for it: a
        set-up that fails by then makes ``start`` raise, with nothing left
        running. A set-up still in progress then (``connect`` waiting for the
        trainer's first weights, say) goes on in the background: requests
        queue and are served once it completes; if it fails later, the
        waiting requests get its error, later ones raise
        :class:`~batchserve.ServerClosedError`, and :attr:`is_alive` turns
        false.

        Args:
            setup_timeout (float or None, keyword-only): seconds to wait for
                the set-up; ``None`` waits until it finishes. Default: ``1.0``.

        Returns:
            self, for chaining.

        Raises:
            RuntimeError: the server is already running (or its previous
                worker is still finishing a forward), or its set-up failed.
        """
        with self._lifecycle_lock:
            if self.is_alive:
                raise RuntimeError("InferenceServer is already running.")
            if self._graphs is not None and not self._graphs.captured:
                if self._graph_request_spec is None:
                    raise RuntimeError(
                        "static_batch_size requires request_spec so the CUDA graph "
                        "can be captured before the serve loop starts."
                    )
                self._capture(self._graph_request_spec, self._graph_mode)
            if self._last_worker is not None and self._last_worker.is_alive():
                raise RuntimeError(
                    "InferenceServer is already running: the previous worker is "
                    "still finishing a forward; shutdown(timeout=None) waits for it."
                )
            if self._shutdown_event is not None:
                self._shutdown_event.clear()
            self._configure_batches()  # weight_sync may have been set since
            run, worker = self._loop.start(setup_timeout)
            self._run, self._worker, self._last_worker = run, worker, worker
            self._last_run = run
            self._started_in = os.getpid()
            running_servers.add(self)
        return self

    def prepare_cudagraph(self, request_spec: TensorDictBase, *, interaction_type=None) -> None:
        """Capture the CUDA graphs of ``static_batch_size`` (every bucket,
        each warmed up) before :meth:`start`; without ``static_batch_size``
        it does nothing, as in torchrl.

        Args:
            request_spec (TensorDictBase): one representative, unbatched
                request.

        Keyword Args:
            interaction_type (InteractionType, optional): the sampling mode
                the graphs are captured under; every request must then carry
                it. Default: the mode stamped on ``request_spec`` if any,
                else the one in force now (tensordict's
                ``set_interaction_type``).

        Raises:
            RuntimeError: the server is running.
        """
        if self._graphs is None:
            return
        with self._lifecycle_lock:
            if self.is_alive:
                raise RuntimeError("The CUDA graph must be prepared before server start.")
            self._capture(request_spec, interaction_type)

    def _capture(self, request_spec, mode) -> None:
        """Captures every bucket; ``mode`` as prepare_cudagraph's
        interaction_type (lifecycle lock held)."""
        if not isinstance(request_spec, TensorDictBase):
            raise TypeError(
                f"request_spec must be a TensorDict; got {type(request_spec).__name__}."
            )
        context, request = interaction_context(request_spec)
        if mode is None:
            with context:
                mode = current_interaction_type()
        # Kept with the mode: a later start() captures them again the same
        # way after an update dropped the graphs.
        self._graph_request_spec, self._graph_mode = request_spec.clone(), mode
        with self._versions.model_lock:
            self._graphs.model = self.model
            self._graphs.prepare(request, mode)

    def _check_graphs(self) -> None:
        """After a weight update: the graphs' storage is still the model's
        (else they are dropped and this raises; see static_batches). Under
        the model lock, so that no forward replays them in between."""
        if self._graphs is not None:
            with self._versions.model_lock:
                self._graphs.check_storage()

    def _validate_batching(self, name: str, value) -> None:
        """A batching setting changed on a running server: a batch must still
        fit the largest CUDA graph."""
        if name == "max_batch_size" and self._graphs is not None:
            largest = self._graphs.sizes[-1]
            if value > largest:
                raise ValueError(
                    "static_batch_size must be at least max_batch_size, got "
                    f"{largest} and {value}."
                )

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop the worker; every request not yet served gets an error.

        Later submissions raise :class:`~batchserve.ServerClosedError` at once.
        A forward in progress is allowed to finish for up to ``timeout``
        seconds; past that its callers get the shutdown error too.

        Args:
            timeout (float or None): seconds to wait for the worker to finish;
                ``None`` waits indefinitely.
        """
        if self._shutdown_event is not None:
            self._shutdown_event.set()
        with self._lifecycle_lock:
            run, worker = self._run, self._worker or self._last_worker
            self._run = self._worker = None
            running_servers.discard(self)
            self._loop.stop(run, worker, self._last_run, timeout)

    def health(self) -> dict:
        """A snapshot that never raises: ``alive`` (the worker runs),
        ``service_backend``, ``transport_kind``, ``policy_version``,
        ``requests`` and ``batches`` served so far (as ``stats()``), the
        same keys :class:`~batchserve.ProcessInferenceServer` reports from
        its child."""
        stats = self.stats()
        return {
            "alive": self.is_alive,
            "service_backend": self.service_backend,
            "transport_kind": self.transport_kind,
            "policy_version": self.policy_version,
            "requests": stats["requests"],
            "batches": stats["batches"],
        }

    @property
    def service_backend(self) -> str:
        """Where the policy runs: a thread of this process."""
        return "thread"

    @property
    def transport_kind(self) -> str:
        """torchrl's selector for the transport ("thread", "process", ...,
        "custom" for a user transport)."""
        return transport_kind(self.transport)

    @property
    def is_alive(self) -> bool:
        """Whether the background worker is running."""
        worker = self._worker
        return worker is not None and worker.is_alive()

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if getattr(self, "_started_in", None) != os.getpid():
            return  # a forked copy: the server runs in the parent
        if getattr(self, "_worker", None) is not None and self.is_alive:
            self.shutdown(timeout=1.0)

    # -- clients ----------------------------------------------------------------

    def client(self):
        """An actor-side client of this server's transport."""
        return self._transport.client()

    def clients(self, num_clients: int) -> list:
        """One client per concurrent consumer."""
        if isinstance(num_clients, bool) or not isinstance(num_clients, int):
            raise TypeError("num_clients must be an integer.")
        if num_clients < 1:
            raise ValueError("num_clients must be at least 1.")
        return [self.client() for _ in range(num_clients)]

    # -- statistics -------------------------------------------------------------

    def stats(self, *, reset: bool = False) -> dict:
        """Throughput and latency statistics.

        Keys: ``requests``, ``fast_path_requests`` (those served by the
        fixed-schema fast path), ``batches``, ``failed_batches``,
        ``requests_per_s``, ``batches_per_s``, ``avg_batch_size``,
        ``p50/p95/p99_queue_ms`` (submission to dispatch; 0 for a blocking
        caller's inline call, served on its own thread without queueing),
        ``p50/p95/p99_forward_ms`` (collation, forward and hand-back
        preparation), ``batch_size_histogram`` (size -> batches),
        ``policy_version``, ``weight_updates``, ``weight_sync_errors``,
        ``p50/max_weight_apply_ms`` (how long copying an update in held the
        model lock, for ``update_weights`` and batchserve's receiver),
        ``p50/p95/mean_server_ms`` (per request, submission to the end of its
        batch's hand-back: how long a caller waited on the server),
        ``p50/mean_client_gap_ms`` (per calling thread of a
        ``ThreadingTransport``, per slot of a ``SharedMemoryTransport``, its
        result to its next request: the env step
        and the rest outside the server), ``inference_bound_fraction``
        (mean server time / (that + mean gap): near 1 the actors wait on
        inference, near 0 they are env-bound; NaN until a gap is measured),
        ``interaction_split_batches`` (collected batches
        whose requests asked for different interaction types, served as one
        forward per type, each forward counted in ``batches``),
        ``fast_path_fraction`` (``fast_path_requests / requests``) and
        ``fast_path_refusals`` (``{reason: count}``: why the general path's
        requests could not take the fast path).

        Args:
            reset (bool, optional): clear the counters after the snapshot.
        """
        result = self._stats.snapshot(self._versions.value, reset=reset)
        spin_us = getattr(self._batches, "spin_us", None)  # a batchserve queue's
        if spin_us is not None:
            result["server_spin_us"] = spin_us
        return result


def _static_batch_size(static_batch_size, server_config, settings):
    """``static_batch_size`` (or ``server_config.static_batch_size``) checked
    as torchrl checks it: (the value given, its bucket sizes), (None, None)
    when not set."""
    if static_batch_size is not None and server_config is not None:
        raise ValueError(
            "server_config is mutually exclusive with the static_batch_size keyword argument."
        )
    if static_batch_size is None:
        static_batch_size = getattr(server_config, "static_batch_size", None)
    sizes = check_static_batch_size(static_batch_size, settings.max_batch_size, settings.device)
    return (None, None) if sizes is None else (static_batch_size, sizes)

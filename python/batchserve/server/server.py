"""InferenceServer: the server loop (model call, model lock, weight sync,
policy version, statistics) over a batch source.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from tensordict.base import TensorDictBase

from batchserve import _core
from batchserve.batching.batch_source import batches_for
from batchserve.batching.collate import default_collate, interaction_context
from batchserve.batching.fast_path import FastPath, schema_from_spec
from batchserve.server.stats import ServerStats
from batchserve.transports.base import as_transport
from batchserve.weights.updates import check_weights, copy_weights, flat_weights, model_weights

_log = logging.getLogger("batchserve")

ServerClosedError = _core.ServerClosedError

_SHUTDOWN_MESSAGE = "InferenceServer is shutting down; the request was not served."
_WEIGHT_SYNC_LOG_INTERVAL_S = 10.0

# Servers still running when the interpreter exits are shut down before
# Python waits for non-daemon threads, so callers blocked on them get an
# error instead of keeping the process alive. Only in the process that
# started them: a forked child (an actor process) holds a copy of the server
# object, whose shutdown would close the shared-memory transport for all.
_running_servers: weakref.WeakSet = weakref.WeakSet()


# Workers still finishing a forward after a shutdown that timed out: the
# exit waits a little for them, since a daemon thread still running torch or
# the C++ core when the interpreter finalizes can abort the process.
_finishing_workers: weakref.WeakSet = weakref.WeakSet()
_EXIT_GRACE_S = 5.0


def _shutdown_running_servers() -> None:
    for server in list(_running_servers):
        if server._started_in != os.getpid():
            continue
        try:
            server.shutdown(timeout=1.0)
        except Exception:  # exiting anyway: never block the exit on one server
            _log.exception("batchserve: shutdown at exit failed")
    deadline = time.monotonic() + _EXIT_GRACE_S
    for worker in list(_finishing_workers):
        worker.join(max(0.0, deadline - time.monotonic()))


_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_shutdown_running_servers)
else:  # pragma: no cover - CPython < 3.9
    import atexit

    atexit.register(_shutdown_running_servers)


def _torchrl_scheme_class(name: str):
    """torchrl's weight-sync class `name` if torchrl's weight_update module is
    loaded (an instance of it cannot exist otherwise), else None."""
    module = sys.modules.get("torchrl.weight_update")
    return getattr(module, name, None) if module is not None else None


def _is_scheme(weight_sync, name: str) -> bool:
    cls = _torchrl_scheme_class(name)
    return cls is not None and isinstance(weight_sync, cls)


def _plain_strategy(strategy):
    return strategy


class _ApplyUnderModelLock:
    """Wraps the weight strategy of a torchrl scheme whose own receiver
    thread applies updates (SharedMemWeightSyncScheme and its subclass
    MultiProcessWeightSyncScheme): each in-place apply runs under the
    server's model lock, between batches, and bumps the version in the same
    critical section, so no forward sees a half-applied update or new
    weights stamped with the old version. The scheme's cascade into
    ``update_policy_weights_`` that follows is then not counted again."""

    def __init__(self, strategy, server: InferenceServer):
        self._strategy, self._server = strategy, server

    def __getattr__(self, name):
        if name in ("_strategy", "_server"):  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self._strategy, name)

    def __reduce__(self):
        # A scheme sent to another process (a restarted trainer) carries the
        # plain strategy: the server and its lock stay here.
        return _plain_strategy, (self._strategy,)

    def apply_weights(self, destination, weights, inplace=True):
        server = self._server
        with server._model_lock:
            self._strategy.apply_weights(destination, weights, inplace=inplace)
            if inplace and weights is not None:  # an update; connect()'s first apply is not
                server._mark_weight_update()
                with server._version_lock:
                    server._cascades_to_skip += 1


def _transport_named(name: str | None):
    """The transport a torchrl-style selector names; in-process kinds only."""
    if name in (None, "auto", "thread", "threading"):
        from batchserve.transports.threading import ThreadingTransport

        return ThreadingTransport()
    raise ValueError(
        f"transport={name!r} is not available in batchserve yet; pass a "
        "transport instance (any object with torchrl's transport protocol) "
        "or one of 'auto', 'thread'."
    )


def _closed_error(message: str, cause: BaseException) -> BaseException:
    """The ServerClosedError callers get when `cause` stopped the server."""
    error = ServerClosedError(message)
    error.__cause__ = cause
    return error


def _positive_int(name: str, value) -> int:
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be at least 1.")
    return value


def _as_device(device) -> torch.device | None:
    return torch.device(device) if device is not None else None


class _Run:
    """One start()..shutdown() of the worker thread."""

    __slots__ = ("stop", "ready", "lock", "start_returned", "startup_error", "inflight")

    def __init__(self):
        self.stop = threading.Event()
        self.ready = threading.Event()  # weight-sync set-up finished
        self.lock = threading.Lock()  # start() and a late set-up failure
        self.start_returned = False
        self.startup_error: BaseException | None = None
        self.inflight = None  # the batch being served, for a timed-out shutdown


class InferenceServer:
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
            included); ``"auto"`` (default) or ``"thread"`` make a new
            :class:`~batchserve.ThreadingTransport`.

    Keyword Args:
        max_batch_size (int, optional): most requests per forward pass.
            Default: ``64``.
        min_batch_size (int, optional): after the first request, keep
            collecting until this many or until ``timeout`` seconds after the
            oldest request arrived. Default: ``1`` (dispatch at once).
        timeout (float, optional): seconds; the deadline above, and how long
            an idle server waits before polling weight sync. Default: ``0.01``.
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
        model: torch.nn.Module | Callable[[TensorDictBase], TensorDictBase],
        transport: Any = "auto",
        *,
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
    ):
        if model is None:
            raise ValueError("InferenceServer needs a model.")
        if transport is None or isinstance(transport, str):
            transport = _transport_named(transport)
        served = as_transport(transport)  # raises TypeError unless it has torchrl's protocol
        batching = {
            "max_batch_size": max_batch_size,
            "min_batch_size": min_batch_size,
            "timeout": timeout,
            "collect_stats": collect_stats,
            "stats_window_size": stats_window_size,
        }
        if server_config is not None:
            given = [k for k, v in batching.items() if v is not None]
            if given:
                raise ValueError(
                    "server_config is mutually exclusive with the "
                    f"{', '.join(given)} keyword argument(s)."
                )
            for key in batching:
                batching[key] = getattr(server_config, key, None)
        if device is not None and policy_device is not None and (
            torch.device(device) != torch.device(policy_device)
        ):
            raise ValueError("device and policy_device disagree; pass one of them.")
        policy_device = policy_device if policy_device is not None else device
        if device_config is not None:
            if policy_device is not None or output_device is not None:
                raise ValueError(
                    "device_config is mutually exclusive with device, "
                    "policy_device and output_device."
                )
            if getattr(device_config, "storing_device", None) is not None:
                raise ValueError(
                    "storing_device is a collector-level setting; the server "
                    "does not use it."
                )
            policy_device = getattr(device_config, "policy_device", None)
            server_output = getattr(device_config, "server_output_device", None)
            output_device = (
                server_output()
                if callable(server_output)
                else getattr(device_config, "output_device", None)
            )

        self.model = model
        self.transport = transport
        self._transport = served  # the declared interface, adapted once
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.device = _as_device(policy_device)
        self.output_device = _as_device(output_device)
        self.weight_sync = weight_sync
        self._weight_sync_model_id = weight_sync_model_id
        self._next_weight_sync_log = 0.0
        self.policy_version_key = policy_version_key
        self._policy_version = int(policy_version)
        self.collect_stats = (
            True if batching["collect_stats"] is None else bool(batching["collect_stats"])
        )
        self._stats = ServerStats(
            1024 if batching["stats_window_size"] is None else batching["stats_window_size"]
        )

        self._batches = batches_for(served)
        if request_spec is not None:
            if served.request_queue is None:
                raise ValueError(
                    "request_spec needs a batchserve transport (ThreadingTransport, "
                    "SharedMemoryTransport); "
                    f"{type(transport).__name__} has its own request format."
                )
            served.set_request_schema(schema_from_spec(request_spec), strict=True)
        self._max_batch_size, self._min_batch_size, self._timeout = 64, 1, 0.01
        for key in ("max_batch_size", "min_batch_size", "timeout"):
            if batching[key] is not None:
                setattr(self, key, batching[key])  # validated by the setter
        self._configure_batches()

        self._model_lock = threading.RLock()
        self._lifecycle_lock = threading.Lock()
        self._version_lock = threading.Lock()
        self._cascades_to_skip = 0  # see _ApplyUnderModelLock
        self._fast: FastPath | None = None
        self._worker: threading.Thread | None = None
        self._last_worker: threading.Thread | None = None  # may outlive a shutdown
        self._run: _Run | None = None
        self._last_run: _Run | None = None
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
        self.device = _as_device(device)

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self._max_batch_size = _positive_int("max_batch_size", value)
        self._configure_batches()

    @property
    def min_batch_size(self) -> int:
        return self._min_batch_size

    @min_batch_size.setter
    def min_batch_size(self, value: int) -> None:
        self._min_batch_size = _positive_int("min_batch_size", value)
        self._configure_batches()

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        value = float(value)
        if not value >= 0:
            raise ValueError("timeout must be a non-negative number of seconds.")
        self._timeout = value
        self._configure_batches()

    def _configure_batches(self) -> None:
        self._batches.configure(self._max_batch_size, self._min_batch_size, self._timeout)

    # -- policy version and weights ------------------------------------------

    @property
    def policy_version(self) -> int:
        """The policy version stamped on results."""
        return self._policy_version

    def _mark_weight_update(
        self, version: int | None = None, locked_since_ns: int | None = None
    ) -> None:
        """Bumps (or sets) the policy version; `locked_since_ns`: when the
        model lock was taken to copy the update in (stats: apply time)."""
        with self._version_lock:
            self._policy_version = (
                self._policy_version + 1 if version is None else int(version)
            )
        apply_ms = None
        if locked_since_ns is not None:
            apply_ms = (_core.monotonic_ns() - locked_since_ns) / 1e6
        self._stats.record_weight_update(apply_ms)

    def update_policy_weights_(self, model_id=None, policy_or_weights=None, **kwargs):
        """Weight-sync cascade hook: records one applied update.

        torchrl's schemes call this on their ``context`` after applying
        weights; the server installs itself as the context of a torchrl
        scheme that has none, so the version bumps exactly once per update
        (an update applied under the model lock was counted already).
        """
        with self._version_lock:
            if self._cascades_to_skip:
                self._cascades_to_skip -= 1
                return
        self._mark_weight_update()

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
        with self._model_lock:
            result = update_fn(self.model)
            if mark_weight_update:
                self._mark_weight_update()
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
            return version

        return self._apply_update(copy_in)

    def _apply_update(self, apply: Callable[[], int | None]) -> int:
        """Runs ``apply()`` (it copies an update into the model and returns
        its version, ``None`` for one more) under the model lock, between
        batches, and sets the version in the same critical section; stats
        record how long the lock was held. Returns the version now stamped."""
        with self._model_lock:
            locked_ns = _core.monotonic_ns()
            self._mark_weight_update(apply(), locked_ns)
            return self._policy_version

    def _init_weight_sync(self) -> None:
        ws = self.weight_sync
        if ws is None:
            return
        # batchserve's receiver (it stages updates) is (re)bound to this
        # server's model at each start, so the newest version is applied
        # before the first batch; a torchrl scheme is set up once.
        if hasattr(ws, "stage_update") or not getattr(ws, "initialized_on_receiver", False):
            ws.init_on_receiver(
                model_id=self._weight_sync_model_id, model=self.model, worker_idx=0
            )
        if _is_scheme(ws, "WeightSyncScheme"):
            self._bind_scheme(ws)
        if not getattr(ws, "synchronized_on_receiver", False):
            ws.connect(worker_idx=0)

    def _bind_scheme(self, ws) -> None:
        """Makes this server the context of a torchrl scheme: after
        init_on_receiver, which resets a scheme set up as a sender in this
        process (the trainer's child holds the sending end), context
        included. A scheme bound to an earlier server of the same model
        moves to this one; one bound to another model is refused (its
        receiver thread would go on updating that model)."""
        context = getattr(ws, "context", None)
        if isinstance(context, InferenceServer) and context is not self:
            if getattr(ws, "model", self.model) is not self.model:
                raise ValueError(
                    "this weight_sync scheme applies weights to another server's model; "
                    "give each server (and model) a scheme of its own"
                )
            ws.context = context = None
        if context is None:
            ws.context = self
        if _is_scheme(ws, "SharedMemWeightSyncScheme") and ws.context is self:
            strategy = getattr(ws, "_strategy", None)
            if isinstance(strategy, _ApplyUnderModelLock):
                strategy._server = self
            elif strategy is not None:
                ws._strategy = _ApplyUnderModelLock(strategy, self)

    def _poll_weight_sync(self, passive: bool) -> None:
        ws = self.weight_sync
        if ws is None or passive:
            return
        try:
            stage = getattr(ws, "stage_update", None)
            if stage is not None:
                # batchserve's receiver: take the newest version and start its
                # device copies outside the lock; hold the lock only to apply.
                staged = stage()
                if staged is not None:
                    self._apply_update(staged.apply)
                return
            with self._model_lock:
                weights = ws.receive(timeout=0.0)
                if weights is not None and getattr(ws, "context", None) is not self:
                    self._mark_weight_update()
        except Exception:
            # The model keeps its previous weights and serving goes on;
            # the failure is counted in stats() and logged (with its
            # traceback at most every _WEIGHT_SYNC_LOG_INTERVAL_S).
            self._stats.record_weight_sync_error()
            now = time.monotonic()
            if now >= self._next_weight_sync_log:
                self._next_weight_sync_log = now + _WEIGHT_SYNC_LOG_INTERVAL_S
                _log.exception(
                    "batchserve: weight_sync failed to receive (%d failures so far)",
                    self._stats.weight_sync_errors,
                )

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
            if self._last_worker is not None and self._last_worker.is_alive():
                raise RuntimeError(
                    "InferenceServer is already running: the previous worker is "
                    "still finishing a forward; shutdown(timeout=None) waits for it."
                )
            run = _Run()
            self._fast = self._make_fast_path()
            previous_run = self._transport.serve_with(run)
            try:
                self._batches.open()
            except BaseException:  # the transport refused (a closed RayTransport)
                self._transport.serve_with(previous_run)
                raise
            worker = threading.Thread(
                target=self._worker_main,
                args=(run,),
                daemon=True,
                name="batchserve-worker",
            )
            worker.start()
            run.ready.wait(setup_timeout)
            with run.lock:
                run.start_returned = True
                startup_error = run.startup_error
            if startup_error is not None:
                worker.join()
                raise RuntimeError(
                    "InferenceServer failed to start: weight_sync set-up raised "
                    f"{startup_error!r}"
                ) from startup_error
            self._run, self._worker, self._last_worker = run, worker, worker
            self._last_run = run
            self._started_in = os.getpid()
            _running_servers.add(self)
        return self

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop the worker; every request not yet served gets an error.

        Later submissions raise :class:`~batchserve.ServerClosedError` at once.
        A forward in progress is allowed to finish for up to ``timeout``
        seconds; past that its callers get the shutdown error too.

        Args:
            timeout (float or None): seconds to wait for the worker to finish;
                ``None`` waits indefinitely.
        """
        with self._lifecycle_lock:
            run, worker = self._run, self._worker or self._last_worker
            self._run = self._worker = None
            _running_servers.discard(self)
            if run is not None:
                run.stop.set()
            # A server started on the transport since then keeps it open.
            serves = self._transport.is_served_by(run or self._last_run)
            if serves:
                self._batches.close()
            # Called from the model (on the worker): its forward goes on and
            # hands back its results after this returns; the worker then stops.
            from_worker = worker is threading.current_thread()
            if worker is not None and not from_worker:
                worker.join(timeout)
            still_running = worker is not None and worker.is_alive() and not from_worker
            error = ServerClosedError(_SHUTDOWN_MESSAGE)
            if serves:
                self._batches.fail_pending(error, worker_running=still_running)
            if still_running:
                _finishing_workers.add(worker)
            # Read once: the worker clears it when its forward ends.
            inflight = run.inflight if still_running and run is not None else None
            if inflight is not None:
                _log.warning(
                    "batchserve: the worker did not finish its forward within "
                    "%s s; failing that batch's requests", timeout,
                )
                inflight.fail(error)

    def _make_fast_path(self) -> FastPath | None:
        """The fast path, for a batchserve transport and the default collation."""
        if self._transport.request_queue is None or self.collate_fn is not default_collate:
            return None
        return FastPath(self._transport, self.device, self.output_device)

    @property
    def service_backend(self) -> str:
        """Where the policy runs: a thread of this process."""
        return "thread"

    @property
    def transport_kind(self) -> str:
        """torchrl's selector for the transport ("thread", "process", ...,
        "custom" for a user transport)."""
        from batchserve.transports.shared_memory import SharedMemoryTransport
        from batchserve.transports.threading import ThreadingTransport

        if isinstance(self.transport, ThreadingTransport):
            return "thread"
        if isinstance(self.transport, SharedMemoryTransport):
            return "shared_memory"
        if type(self.transport).__module__.startswith("torchrl"):
            from torchrl.modules.inference_server._factory import _inference_transport_kind

            return _inference_transport_kind(self.transport)
        return "custom"

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
        ``p50/p95/p99_queue_ms`` (submission to dispatch),
        ``p50/p95/p99_forward_ms`` (collation, forward and hand-back
        preparation), ``batch_size_histogram`` (size -> batches),
        ``policy_version``, ``weight_updates``, ``weight_sync_errors``,
        ``p50/max_weight_apply_ms`` (how long copying an update in held the
        model lock, for ``update_weights`` and batchserve's receiver).

        Args:
            reset (bool, optional): clear the counters after the snapshot.
        """
        return self._stats.snapshot(self._policy_version, reset=reset)

    # -- the worker -------------------------------------------------------------

    def _worker_main(self, run: _Run) -> None:
        try:
            self._init_weight_sync()
            # torchrl's SharedMemWeightSyncScheme applies weights from its own
            # thread: polling its receive() would re-apply and re-count them.
            passive = _is_scheme(self.weight_sync, "SharedMemWeightSyncScheme")
        except BaseException as exc:
            with run.lock:
                run.startup_error = exc
                reported = not run.start_returned  # start() raises it
            run.ready.set()
            if not reported:
                _log.error("batchserve: weight_sync set-up failed: %r", exc)
                self._stop_serving(
                    run, _closed_error(f"InferenceServer weight_sync set-up failed: {exc!r}", exc)
                )
            return
        run.ready.set()
        error = ServerClosedError(_SHUTDOWN_MESSAGE)
        try:
            with torch.no_grad():
                error = self._serve(run, passive) or error
        except BaseException as exc:  # the transport failed, or was interrupted
            _log.exception("batchserve: the worker stopped")
            error = _closed_error(f"InferenceServer stopped: {exc!r}", exc)
        finally:
            self._stop_serving(run, error)

    def _stop_serving(self, run: _Run, error: BaseException) -> None:
        """Worker exit: reject new requests, fail the waiting ones (unless
        another server has started on the transport meanwhile: an overdue
        worker must not close the queue under it)."""
        if self._transport.is_served_by(run):
            self._batches.close()
            self._batches.fail_pending(error, worker_running=False)
        _running_servers.discard(self)

    def _serve(self, run: _Run, passive_weight_sync: bool) -> BaseException | None:
        """Serves until stopped; returns the error that the requests left
        waiting get when a BaseException from the model stopped it."""
        batches = self._batches
        while not run.stop.is_set():
            if self.weight_sync is not None and not passive_weight_sync:
                batches.wake_resolved()  # applying new weights may take a while
            self._poll_weight_sync(passive_weight_sync)
            batch = batches.next_batch()
            if batch is None:
                if batches.closed:
                    return None
                continue
            if run.stop.is_set():
                batch.fail(ServerClosedError(_SHUTDOWN_MESSAGE))
                return None
            run.inflight = batch
            try:
                self._serve_batch(batch)
            except Exception as exc:
                self._stats.record_failed_batch()
                batch.fail(exc)
            except BaseException as exc:
                # SystemExit, KeyboardInterrupt...: end this batch and stop
                # serving cleanly rather than leave callers waiting.
                error = _closed_error(f"InferenceServer stopped: the model raised {exc!r}", exc)
                batch.fail(error)
                _log.error("batchserve: worker stopped by %r", exc)
                return error
            finally:
                run.inflight = None
        return None

    def _serve_batch(self, batch) -> None:
        """Serves one collected batch: its fast-path rows with one forward
        over staging memory, the rest (if any) through ``collate_fn``."""
        dispatch_ns = _core.monotonic_ns()
        fast = self._fast
        had_rows = False
        if fast is not None:
            buffer = fast.gather(batch, self._max_batch_size)
            if buffer is not None:
                had_rows = True
                try:
                    self._serve_rows(batch, buffer, dispatch_ns)
                except Exception as exc:
                    self._stats.record_failed_batch()
                    batch.fail_rows(exc)
        # General-path requests remain; read once: a shutdown past its
        # timeout may fail the batch meanwhile, and then there are none.
        items = batch.items if len(batch) else []
        if items:
            if had_rows:
                self._batches.wake_resolved()  # the fast rows' callers need not wait for them
            if fast is not None:
                fast.learn(items, had_rows)
            self._serve_items(batch, items, dispatch_ns)

    def _queue_ms(self, dispatch_ns: int, submitted_ns) -> list:
        if not self.collect_stats:
            return []
        return [(dispatch_ns - s) * 1e-6 for s in submitted_ns if s is not None]

    @staticmethod
    def _check_output(output, n: int) -> None:
        if not isinstance(output, TensorDictBase):
            raise TypeError(
                f"The model returned {type(output).__name__}; expected a "
                f"TensorDict with batch size [{n}]."
            )
        if output.batch_dims == 0 or output.batch_size[0] != n:
            raise RuntimeError(
                f"The model returned batch size {list(output.batch_size)} for "
                f"a batch of {n} requests; expected a leading dimension of {n}."
            )

    def _serve_rows(self, batch, buffer, dispatch_ns: int) -> None:
        """The fast path: the model runs on the staging rows, callers get
        their rows back (see ``batchserve.batching.fast_path``)."""
        n = batch.rows
        queue_ms = self._queue_ms(dispatch_ns, batch.rows_submitted_ns)
        fast = self._fast
        with self._model_lock:
            model_input = fast.model_input(buffer, n)
            fast.prefetch()  # the next batch is gathered while the model runs
            output = self.model(model_input)
            self._check_output(output, n)
            version = self._policy_version
        if self.collect_stats:  # before the hand-back: a caller with its result sees it counted
            self._stats.record_batch(
                n, queue_ms, (_core.monotonic_ns() - dispatch_ns) * 1e-6, fast_path=True
            )
        fast.hand_back(batch, output, n, buffer, self.policy_version_key, version)

    def _serve_items(self, batch, items: list, dispatch_ns: int) -> None:
        """The general path: ``collate_fn``, the model, ``unbind``."""
        if self.collate_fn is default_collate:
            malformed = [
                i for i, item in enumerate(items) if not isinstance(item, TensorDictBase)
            ]
            if malformed:
                kinds = sorted({type(items[i]).__name__ for i in malformed})
                batch.fail_some(
                    malformed,
                    TypeError(
                        "InferenceServer expects each request to be a TensorDict; "
                        f"got {', '.join(kinds)}."
                    ),
                )
                items = batch.items
                if not items:
                    return
        n = len(items)
        queue_ms = self._queue_ms(dispatch_ns, batch.submitted_ns)
        collated = self.collate_fn(items)
        if self.device is not None:
            collated = collated.to(self.device)
        with self._model_lock:
            context, collated = interaction_context(collated)
            with context:
                output = self.model(collated)
            self._check_output(output, n)
            if self.output_device is not None:
                output = output.to(self.output_device)
            if self.policy_version_key is not None:
                output.set(
                    self.policy_version_key,
                    torch.full(
                        output.batch_size,
                        self._policy_version,
                        dtype=torch.long,
                        device=output.device or self.output_device or self.device,
                    ),
                )
        results = output.unbind(0)
        if self.collect_stats:  # before the hand-back: a caller with its result sees it counted
            self._stats.record_batch(n, queue_ms, (_core.monotonic_ns() - dispatch_ns) * 1e-6)
        batch.resolve(results)

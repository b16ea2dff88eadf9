"""Binding a server's ``weight_sync`` to it: batchserve's
:class:`~batchserve.SharedMemoryWeightReceiver` or a torchrl
``WeightSyncScheme`` (or any object with its receiver methods).

:class:`WeightSyncBinding` sets the receiver up on the worker when a server
starts (``init_on_receiver``, ``connect``), makes the server the context of
a torchrl scheme, and polls for new weights between batches, applying them
under the server's model lock. A torchrl scheme whose own thread applies
updates (``SharedMemWeightSyncScheme``) is passive: it is never polled, and
its strategy is wrapped so each apply runs under the model lock.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchserve.server.server import InferenceServer
    from batchserve.server.stats import ServerStats
    from batchserve.server.version import PolicyVersion

_log = logging.getLogger("batchserve")

_WEIGHT_SYNC_LOG_INTERVAL_S = 10.0


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

    def __init__(self, strategy, versions: PolicyVersion):
        self._strategy, self._versions = strategy, versions

    def __getattr__(self, name):
        if name in ("_strategy", "_versions"):  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self._strategy, name)

    def __reduce__(self):
        # A scheme sent to another process (a restarted trainer) carries the
        # plain strategy: the server and its lock stay here.
        return _plain_strategy, (self._strategy,)

    def apply_weights(self, destination, weights, inplace=True):
        versions = self._versions
        with versions.model_lock:
            self._strategy.apply_weights(destination, weights, inplace=inplace)
            if inplace and weights is not None:  # an update; connect()'s first apply is not
                versions.mark_update()
                versions.skip_next_cascade()


class WeightSyncBinding:
    """The server's end of its ``weight_sync`` (read from the server at each
    call: it is a public, settable attribute).

    Args:
        server: the :class:`~batchserve.InferenceServer` whose model the
            updates go to (and a torchrl scheme's context).
        model_id: the model id ``init_on_receiver`` is given.
        versions: the server's policy version and model lock.
        stats: the server's statistics (weight-sync errors).
    """

    def __init__(self, server: InferenceServer, model_id: str, versions: PolicyVersion,
                 stats: ServerStats):
        self._server = server
        self._model_id = model_id
        self._versions = versions
        self._stats = stats
        self._next_log = 0.0
        self.passive = False

    def set_up(self) -> None:
        """On the worker at each start: initialises the receiver (batchserve's
        receiver is rebound at each start, so the newest version is applied
        before the first batch; a torchrl scheme is set up once), binds a
        torchrl scheme to the server and connects."""
        server = self._server
        ws = server.weight_sync
        if ws is not None:
            if hasattr(ws, "stage_update") or not getattr(ws, "initialized_on_receiver", False):
                ws.init_on_receiver(model_id=self._model_id, model=server.model, worker_idx=0)
            if _is_scheme(ws, "WeightSyncScheme"):
                self._bind_scheme(ws)
            if not getattr(ws, "synchronized_on_receiver", False):
                ws.connect(worker_idx=0)
        # torchrl's SharedMemWeightSyncScheme applies weights from its own
        # thread: polling its receive() would re-apply and re-count them.
        self.passive = _is_scheme(ws, "SharedMemWeightSyncScheme")

    @property
    def polled(self) -> bool:
        """Whether :meth:`poll` looks for updates between batches."""
        return self._server.weight_sync is not None and not self.passive

    def _bind_scheme(self, ws) -> None:
        """Makes the server the context of a torchrl scheme: after
        init_on_receiver, which resets a scheme set up as a sender in this
        process (the trainer's child holds the sending end), context
        included. A scheme bound to an earlier server of the same model
        moves to this one; one bound to another model is refused (its
        receiver thread would go on updating that model)."""
        from batchserve.server.server import InferenceServer

        server = self._server
        context = getattr(ws, "context", None)
        if isinstance(context, InferenceServer) and context is not server:
            if getattr(ws, "model", server.model) is not server.model:
                raise ValueError(
                    "this weight_sync scheme applies weights to another server's model; "
                    "give each server (and model) a scheme of its own"
                )
            ws.context = context = None
        if context is None:
            ws.context = server
        if _is_scheme(ws, "SharedMemWeightSyncScheme") and ws.context is server:
            strategy = getattr(ws, "_strategy", None)
            if isinstance(strategy, _ApplyUnderModelLock):
                strategy._versions = self._versions
            elif strategy is not None:
                ws._strategy = _ApplyUnderModelLock(strategy, self._versions)

    def poll(self) -> None:
        """Between batches: applies the newest update, if any. A failure
        leaves the model as it was and serving goes on; it is counted in
        ``stats()`` and logged (with its traceback at most every
        ``_WEIGHT_SYNC_LOG_INTERVAL_S``)."""
        server = self._server
        ws = server.weight_sync
        if ws is None or self.passive:
            return
        try:
            stage = getattr(ws, "stage_update", None)
            if stage is not None:
                # batchserve's receiver: take the newest version and start its
                # device copies outside the lock; hold the lock only to apply.
                staged = stage()
                if staged is not None:
                    self._versions.apply_update(staged.apply)
                    server._check_graphs()  # worker thread: no forward in between
                return
            with self._versions.model_lock:
                weights = ws.receive(timeout=0.0)
                if weights is not None:
                    if getattr(ws, "context", None) is not server:
                        self._versions.mark_update()
                    server._check_graphs()  # a cascade to the server checked already
        except Exception:
            self._stats.record_weight_sync_error()
            now = time.monotonic()
            if now >= self._next_log:
                self._next_log = now + _WEIGHT_SYNC_LOG_INTERVAL_S
                _log.exception(
                    "batchserve: weight_sync failed to receive (%d failures so far)",
                    self._stats.weight_sync_errors,
                )

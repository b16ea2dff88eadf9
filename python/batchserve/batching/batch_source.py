"""Where the server loop gets its batches from.

Two sources behind one small interface (``configure``, ``next_batch``,
``wake_resolved``, ``open``, ``close``, ``closed``, ``fail_pending``):

* :class:`NativeBatches` for transports backed by the C++ request queue: the
  batching policy (``csrc/core/batch_policy.h``) runs in C++ with the GIL
  released and hands back a ``NativeBatch`` (``batchserve.batching.native``:
  C++ ends the callers waiting in C++, Python resolves the Futures).
* :class:`ProtocolBatches` for any other object with torchrl's transport
  protocol (torchrl's own transports, user transports). It applies the same
  policy in Python over ``wait_for_work`` / ``drain_with_timing``.

A batch has ``items``, ``submitted_ns`` (None where unknown),
``resolve(results)``, ``fail(exc)`` and ``fail_some(indices, exc)``; its
source's ``items_of(batch)`` gives its general-path requests as
``collate_fn`` takes them.
"""

from __future__ import annotations

import logging

from batchserve import _core
from batchserve.batching import native

_log = logging.getLogger("batchserve")

_MAX_WAIT_S = 0.1


class NativeBatches:
    """Batches from a transport whose queue is the C++ core. The transport's
    ``server_started`` and ``server_stopped`` run when the server starts and
    stops taking requests (a shared-memory transport removes its segment's
    name at close; a Ray transport starts and stops bringing in its remote
    requests)."""

    def __init__(self, transport):
        self._queue = transport.request_queue
        self._transport = transport

    def configure(self, max_batch_size: int, min_batch_size: int, timeout: float,
                  idle_wait: float | None = None) -> None:
        """Applies at once, even to a server asleep in next_batch().
        ``idle_wait``: how long next_batch() waits for a first request
        before it returns None (None: ``timeout``)."""
        self._queue.configure(max_batch_size, min_batch_size, timeout, idle_wait)

    def next_batch(self):
        return native.collect(self._queue)

    def items_of(self, batch) -> list:
        """The batch's general-path requests (the C++ batch hands out what
        the transport makes them from: shared-memory slots give their leaves)."""
        return self._transport.request_items(batch.items)

    def wake_resolved(self) -> None:
        """Wakes the callers of resolved requests now rather than when the
        next batch is collected (the GIL-free moment the core waits for)."""
        self._queue.wake_resolved()

    @property
    def spin_us(self) -> float:
        """How long the server spins for its next request before it sleeps,
        as the core last set it from the gaps it measured (see
        ``csrc/core/spin_budget.h``)."""
        return self._queue.server_spin_ns / 1e3

    @property
    def closed(self) -> bool:
        return self._queue.closed

    def open(self) -> None:
        self._queue.reopen()
        try:
            self._transport.server_started()
        except BaseException:
            self._queue.close()  # nothing will serve what it would accept
            raise

    def close(self) -> None:
        self._queue.close()
        self._transport.server_stopped()

    def fail_pending(self, exc: BaseException, worker_running: bool) -> int:
        # The C++ queue serialises consumers, so this is safe while the
        # worker still runs.
        return native.fail_pending(self._queue, exc)


class ProtocolBatch:
    """A batch drained through torchrl's transport protocol.

    Like the C++ batch, each method takes the callbacks it ends out of the
    batch before calling the transport, so a second call (a shutdown failing
    the batch of an overdue worker) never ends a request twice.
    """

    __slots__ = ("items", "callbacks", "submitted_ns", "_transport")

    def __init__(self, transport, items, callbacks, submitted_ns):
        self._transport = transport
        self.items = items
        self.callbacks = callbacks
        self.submitted_ns = submitted_ns

    def __len__(self) -> int:
        return len(self.callbacks)

    def _take(self, indices=None) -> list:
        if indices is None:
            taken = self.callbacks
            self.items, self.callbacks, self.submitted_ns = [], [], []
            return taken
        drop = set(indices)
        keep = [i for i in range(len(self.callbacks)) if i not in drop]
        taken = [self.callbacks[i] for i in sorted(drop)]
        self.items = [self.items[i] for i in keep]
        self.callbacks = [self.callbacks[i] for i in keep]
        self.submitted_ns = [self.submitted_ns[i] for i in keep]
        return taken

    def resolve(self, results) -> None:
        if not self.callbacks:
            return  # already failed (e.g. by a shutdown)
        if len(results) != len(self.callbacks):
            raise ValueError(
                f"resolve: expected {len(self.callbacks)} results, got {len(results)}"
            )
        for callback, result in zip(self._take(), results):
            try:
                self._transport.resolve(callback, result)
            except Exception:  # a caller that went away must not stop the rest
                _log.exception("batchserve: transport.resolve failed")

    def fail(self, exc: BaseException) -> None:
        self._fail(self._take(), exc)

    def fail_some(self, indices, exc: BaseException) -> None:
        self._fail(self._take(indices), exc)

    def _fail(self, callbacks, exc: BaseException) -> None:
        for callback in callbacks:
            try:
                self._transport.resolve_exception(callback, exc)
            except Exception:
                _log.exception("batchserve: transport.resolve_exception failed")


class ProtocolBatches:
    """Batches from any transport with torchrl's protocol.

    Same policy as the C++ one: wait up to ``timeout`` for work, take up to
    ``max_batch_size``, and below ``min_batch_size`` keep draining until the
    oldest request's submission time plus ``timeout`` (the drain time of the
    first request when the transport does not report submission times).
    Each wait lasts at most ``_MAX_WAIT_S``: such a transport cannot be woken,
    so this is how soon the worker notices a shutdown.
    """

    def __init__(self, transport):
        self._transport = transport
        self._closed = False
        self._settings = (64, 1, 0.01)

    def _drain_ns(self, max_items: int):
        """Drains; submission times in ns, None where the transport has none."""
        items, callbacks, submitted_at = self._transport.drain_with_timing(max_items)
        submitted_ns = [None if s is None else int(s * 1e9) for s in submitted_at]
        return list(items), list(callbacks), submitted_ns

    def wake_resolved(self) -> None:
        """Resolved callers are woken at once here."""

    @staticmethod
    def items_of(batch) -> list:
        return batch.items

    def configure(self, max_batch_size: int, min_batch_size: int, timeout: float,
                  idle_wait: float | None = None) -> None:
        """Applies from the next batch (a protocol transport cannot be woken,
        so an idle server waits ``timeout`` at a time, whatever ``idle_wait``)."""
        self._settings = (max_batch_size, min_batch_size, timeout)

    def next_batch(self):
        max_batch_size, min_batch_size, timeout = self._settings
        transport = self._transport
        transport.wait_for_work(timeout=min(timeout, _MAX_WAIT_S))
        batch = ProtocolBatch(transport, *self._drain_ns(max_batch_size))
        if not batch.callbacks:
            return None
        if len(batch) >= min_batch_size:
            return batch
        known = [s for s in batch.submitted_ns if s is not None]
        oldest_ns = min(known) if known else _core.monotonic_ns()
        deadline_s = oldest_ns * 1e-9 + timeout
        try:
            while len(batch) < min_batch_size and not self._closed:
                remaining = deadline_s - _core.monotonic_ns() * 1e-9
                if remaining <= 0:
                    break
                transport.wait_for_work(timeout=min(remaining, _MAX_WAIT_S))
                items, callbacks, submitted_ns = self._drain_ns(
                    max_batch_size - len(batch)
                )
                batch.items.extend(items)
                batch.callbacks.extend(callbacks)
                batch.submitted_ns.extend(submitted_ns)
        except BaseException as exc:  # what was drained must not be lost
            batch.fail(exc)
            raise
        return batch

    @property
    def closed(self) -> bool:
        return self._closed

    def open(self) -> None:
        self._closed = False

    def close(self) -> None:
        self._closed = True

    def fail_pending(self, exc: BaseException, worker_running: bool) -> int:
        # drain() is single-consumer by contract: leave it to the worker
        # (which fails what is pending when it exits) while it runs.
        if worker_running:
            return 0
        failed = 0
        while True:
            try:
                items, callbacks = self._transport.drain(1024)
            except Exception:  # a broken transport: nothing more to reach
                _log.exception("batchserve: transport.drain failed at shutdown")
                return failed
            if not callbacks:
                return failed
            ProtocolBatch(self._transport, items, callbacks, [None] * len(items)).fail(exc)
            failed += len(callbacks)


def batches_for(transport):
    """The batch source that fits ``transport`` (an
    :class:`~batchserve.transports.base.InferenceTransport`)."""
    if transport.request_queue is not None:
        return NativeBatches(transport)
    return ProtocolBatches(transport)

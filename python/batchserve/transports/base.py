"""The transport interface, its adapter for foreign transports, and the
actor-side client.

A transport carries single requests from actors to the server and results
back. :class:`InferenceTransport` is torchrl's
``torchrl.modules.inference_server.InferenceTransport`` protocol (``submit``,
``drain``, ``wait_for_work``, ``resolve``, ``resolve_exception``,
``drain_with_timing``, ``client``) plus what batchserve's server asks of a
transport, each declared here with the default that fits a transport without
the C++ core. The server reads a transport only through these members.

Any other object with torchrl's protocol (torchrl's own transports, a user's
duck-typed object) is served through :func:`as_transport`, which wraps it
once in a :class:`ForeignTransport` supplying those defaults.
"""

from __future__ import annotations

import abc
import asyncio
import weakref
from concurrent.futures import Future
from typing import Any

_PROTOCOL = ("submit", "drain", "wait_for_work", "resolve", "resolve_exception")


class InferenceTransport(abc.ABC):
    """Abstract base class for inference server transports.

    Subclasses implement :meth:`submit` (actor side) and :meth:`drain`,
    :meth:`wait_for_work`, :meth:`resolve`, :meth:`resolve_exception` (server
    side). :meth:`drain_with_timing` may be overridden to report when each
    request was submitted (seconds on the ``time.monotonic`` clock), which the
    server uses for its batching deadline and its queue-wait statistics.

    The other members are what :class:`batchserve.InferenceServer` asks of a
    transport beyond torchrl's protocol; their defaults describe a transport
    the server drives through that protocol alone. Transports backed by the
    C++ request queue (``batchserve.transports.native``) override them.
    """

    # The server run serving this transport (see serve_with); a class-level
    # None until a server records itself.
    _serving_run: object | None = None

    # torchrl's ABC declares these; batchserve registers this class with it
    # (batchserve.torchrl_compat), so torchrl's servers read them here. A
    # client needs no set-up before a server starts, and no transport has
    # torchrl's fixed request/response slot banks.
    _clients_require_registration: bool = False
    _batched_slot_io: bool = False

    # -- torchrl's protocol ---------------------------------------------------

    @abc.abstractmethod
    def submit(self, td) -> Future:
        """Submit one (unbatched) request; returns a Future for its result."""

    @abc.abstractmethod
    def drain(self, max_items: int) -> tuple[list, list]:
        """Dequeue up to ``max_items`` requests: ``(inputs, callbacks)``."""

    @abc.abstractmethod
    def wait_for_work(self, timeout: float) -> None:
        """Block until a request may be pending or ``timeout`` seconds pass."""

    @abc.abstractmethod
    def resolve(self, callback, result) -> None:
        """Send ``result`` to the actor that owns ``callback``."""

    @abc.abstractmethod
    def resolve_exception(self, callback, exc: BaseException) -> None:
        """Send ``exc`` to the actor that owns ``callback``."""

    def drain_with_timing(self, max_items: int) -> tuple[list, list, list]:
        """Like :meth:`drain`, plus each request's submission time (or None)."""
        items, callbacks = self.drain(max_items)
        return items, callbacks, [None] * len(items)

    def client(self) -> InferenceClient:
        """Return an actor-side :class:`InferenceClient` bound to this transport."""
        return InferenceClient(self)

    def _set_peer_alive(self, alive_event) -> None:  # noqa: B027 - torchrl's optional hook
        """torchrl's hook for a liveness flag of a server in another process;
        batchserve's clients learn of a closed server from the transport itself."""

    # -- the C++ request queue ------------------------------------------------

    @property
    def request_queue(self):
        """The ``_core.RequestQueue`` the server batches from in C++, or None
        (default): the server batches through :meth:`drain_with_timing` and
        :meth:`wait_for_work`, and serves every request on the general path."""
        return None

    @property
    def blocking_call(self):
        """``call(td, timeout)``: a blocking request that waits for its result
        without a Future (the C++ queue's futex wait), or None (default): a
        blocking client call waits on the Future :meth:`submit` returns."""
        return None

    def server_started(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Called when a server starts taking requests from this transport;
        raising refuses the start. Default: nothing to do."""

    def server_stopped(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Called when the server serving this transport stops taking
        requests. Default: nothing to do."""

    # -- which server serves this transport -----------------------------------

    def serve_with(self, run: object | None) -> object | None:
        """Records ``run`` (one start of a server) as the one serving this
        transport, so that of two servers on one transport only the one that
        started last closes it; returns the run recorded before."""
        previous, self._serving_run = self._serving_run, run
        return previous

    def is_served_by(self, run: object | None) -> bool:
        """Whether ``run`` is the run recorded by :meth:`serve_with`, or no
        run was ever recorded."""
        return self._serving_run in (None, run)

    # -- the fast path (requests of one fixed schema) --------------------------

    @property
    def request_spec(self):
        """The fixed schema (``batchserve.batching.fast_path.RequestSchema``)
        that fast-path requests are matched against, given or learned; None
        (default) when there is none."""
        return None

    @property
    def schema_id(self) -> int:
        """The C++ queue's id of :attr:`request_spec` (0: none)."""
        return 0

    @property
    def schema_strict(self) -> bool:
        """Whether :attr:`request_spec` was given (requests are checked at
        submission) rather than learned from traffic. Default: False."""
        return False

    def set_request_schema(self, schema, *, strict: bool) -> None:
        """Sets the schema fast-path requests are matched against; ``strict``:
        mismatching requests raise at submission.

        Raises:
            ValueError: this transport has no fast path (default).
        """
        raise ValueError(
            f"{type(self).__name__} has no fast path: its requests have their own format."
        )

    @property
    def result_keys(self) -> frozenset | None:
        """The output keys results carry (the rest is dropped before the
        hand-back), or None (default): every output key."""
        return None

    @property
    def copies_results(self) -> bool:
        """Whether the hand-back copies each result out at once (so output
        columns may stay in staging memory until then). Default: False."""
        return False

    @property
    def prefetch_pays(self) -> bool:
        """Whether gathering the next batch on a helper thread while the model
        runs pays for the hand-off. Default: True."""
        return True


# The server run serving each foreign transport (see ForeignTransport).
_foreign_serving_runs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ForeignTransport(InferenceTransport):
    """An object with torchrl's transport protocol that does not derive from
    :class:`InferenceTransport` (torchrl's own transports, a user's
    duck-typed object), seen through the declared interface: the protocol
    calls go to it, every other member has its default.

    Made by :func:`as_transport`, once per server. Which server serves the
    object is recorded per object (weakly: nothing is written onto it, and
    the record does not keep it alive), so that two servers on one foreign
    transport know which of them serves it, as they do on a batchserve one.
    """

    def __init__(self, inner: Any):
        missing = [name for name in _PROTOCOL if not callable(getattr(inner, name, None))]
        if missing:
            raise TypeError(
                "transport must implement the InferenceTransport protocol "
                f"(submit, drain, wait_for_work, resolve, resolve_exception); got {inner!r}."
            )
        self.inner = inner
        drain_with_timing = getattr(inner, "drain_with_timing", None)
        self._drain_with_timing = drain_with_timing if callable(drain_with_timing) else None
        inner_client = getattr(inner, "client", None)
        self._inner_client = inner_client if callable(inner_client) else None

    def submit(self, td) -> Future:
        return self.inner.submit(td)

    def drain(self, max_items: int) -> tuple[list, list]:
        return self.inner.drain(max_items)

    def drain_with_timing(self, max_items: int) -> tuple[list, list, list]:
        if self._drain_with_timing is not None:
            return self._drain_with_timing(max_items)
        return super().drain_with_timing(max_items)

    def wait_for_work(self, timeout: float) -> None:
        self.inner.wait_for_work(timeout=timeout)

    def resolve(self, callback, result) -> None:
        self.inner.resolve(callback, result)

    def resolve_exception(self, callback, exc: BaseException) -> None:
        self.inner.resolve_exception(callback, exc)

    def serve_with(self, run: object | None) -> object | None:
        try:
            previous = _foreign_serving_runs.get(self.inner)
            _foreign_serving_runs[self.inner] = run
        except TypeError:  # not weakly referenceable, or unhashable: kept here
            return super().serve_with(run)
        return previous

    def is_served_by(self, run: object | None) -> bool:
        try:
            recorded = _foreign_serving_runs.get(self.inner)
        except TypeError:
            return super().is_served_by(run)
        return recorded in (None, run)

    def client(self):
        """The wrapped transport's own client, if it has one."""
        if self._inner_client is not None:
            return self._inner_client()
        return InferenceClient(self.inner)


def as_transport(transport: Any) -> InferenceTransport:
    """``transport`` seen through the declared interface: itself if it is an
    :class:`InferenceTransport`, else a :class:`ForeignTransport` over it.

    Raises:
        TypeError: ``transport`` lacks a method of torchrl's protocol.
    """
    if isinstance(transport, InferenceTransport):
        return transport
    return ForeignTransport(transport)


def transport_kind(transport: Any) -> str:
    """torchrl's selector for ``transport`` ("thread", "process", ...,
    "custom" for a user transport)."""
    from batchserve.transports.shared_memory import SharedMemoryTransport
    from batchserve.transports.threading import ThreadingTransport

    if isinstance(transport, ThreadingTransport):
        return "thread"
    if isinstance(transport, SharedMemoryTransport):
        return "shared_memory"
    if type(transport).__module__.startswith("torchrl"):
        from torchrl.modules.inference_server._factory import _inference_transport_kind

        return _inference_transport_kind(transport)
    return "custom"


class InferenceClient:
    """Actor-side handle of an inference server.

    ``client(td)`` looks like a plain policy call but is batched on the
    server; ``client.submit(td)`` returns a future; ``await client.acall(td)``
    suits asyncio actors.

    This class owns those three calls for every transport. What differs per
    transport is supplied by it: :meth:`_submit` (how a request is sent, and
    the type of future it returns, :attr:`future_type`) and
    ``_blocking_call`` (a ``call(td, timeout)`` that waits for the result
    without a future, or None). :class:`~batchserve.SharedMemoryClient` and
    :class:`~batchserve.RayClient` are the subclasses for those transports.

    Args:
        transport: the transport shared with the server (its ``submit``
            sends requests, its ``blocking_call`` waits for results).

    Example:
        >>> client = transport.client()
        >>> td_out = client(td_in)                 # blocking
        >>> td_out = client(td_in, timeout=0.5)    # TimeoutError after 0.5 s
        >>> future = client.submit(td_in)          # non-blocking
        >>> td_out = future.result()
    """

    __slots__ = ("_transport", "_blocking_call")

    # What submit() returns. A concurrent.futures.Future is awaited by
    # acall(); a future of another type (one that waits on a futex) is not,
    # and acall() runs the blocking call on the event loop's executor instead.
    future_type: type = Future

    def __init__(self, transport: Any):
        self._transport = transport
        # Transports backed by the C++ queue wait for the result without a
        # Future and with the GIL released.
        self._blocking_call = (
            transport.blocking_call if isinstance(transport, InferenceTransport) else None
        )

    def _submit(self, td, timeout: float | None):
        """Sends ``td``; returns a :attr:`future_type` for its result.
        ``timeout`` bounds a wait for room to send it (None: no bound)."""
        if timeout is None:
            return self._transport.submit(td)
        return self._transport.submit(td, timeout=timeout)

    def __call__(self, td, timeout: float | None = None):
        """Submit ``td`` and block until its result is ready.

        Args:
            td: one unbatched request.
            timeout (float, optional): seconds to wait for the result. On
                expiry a request that was not batched yet is withdrawn and
                :class:`TimeoutError` is raised. ``None`` waits forever.
        """
        if self._blocking_call is not None:
            return self._blocking_call(td, timeout)
        future = self._submit(td, None)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def submit(self, td, timeout: float | None = None):
        """Submit a request and return a future immediately.

        Args:
            td: one unbatched request.
            timeout (float, optional): bound on a wait for room to send it
                (a full queue, all shared-memory slots taken). ``None``
                waits as long as it takes.
        """
        return self._submit(td, timeout)

    async def acall(self, td):
        """Submit ``td`` and await its result from an asyncio event loop."""
        if issubclass(self.future_type, Future):
            return await asyncio.wrap_future(self._submit(td, None))
        return await asyncio.get_running_loop().run_in_executor(None, self, td, None)

    @property
    def transport(self):
        """The transport this client submits to (None for a client that holds
        only its way to the server, as a pickled one does)."""
        return self._transport

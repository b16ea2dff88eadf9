"""The transport protocol and the actor-side client.

A transport carries single requests from actors to the server and results
back. :class:`InferenceTransport` is the same protocol as torchrl's
``torchrl.modules.inference_server.InferenceTransport``: any object with
``submit``, ``drain``, ``wait_for_work``, ``resolve`` and ``resolve_exception``
(torchrl's own transports included) can be served by
:class:`batchserve.InferenceServer`.
"""

from __future__ import annotations

import abc
import asyncio
from concurrent.futures import Future
from typing import Any


class InferenceTransport(abc.ABC):
    """Abstract base class for inference server transports.

    Subclasses implement :meth:`submit` (actor side) and :meth:`drain`,
    :meth:`wait_for_work`, :meth:`resolve`, :meth:`resolve_exception` (server
    side). :meth:`drain_with_timing` may be overridden to report when each
    request was submitted (seconds on the ``time.monotonic`` clock), which the
    server uses for its batching deadline and its queue-wait statistics.
    """

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


class InferenceClient:
    """Actor-side handle of an inference server.

    ``client(td)`` looks like a plain policy call but is batched on the
    server; ``client.submit(td)`` returns a :class:`concurrent.futures.Future`;
    ``await client.acall(td)`` suits asyncio actors.

    Args:
        transport: the transport shared with the server.

    Example:
        >>> client = transport.client()
        >>> td_out = client(td_in)                 # blocking
        >>> td_out = client(td_in, timeout=0.5)    # TimeoutError after 0.5 s
        >>> future = client.submit(td_in)          # non-blocking
        >>> td_out = future.result()
    """

    __slots__ = ("_transport", "_blocking_call")

    def __init__(self, transport: Any):
        self._transport = transport
        # Transports backed by the C++ queue wait for the result without a
        # Future and with the GIL released.
        self._blocking_call = getattr(transport, "_blocking_call", None)

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
        future = self._transport.submit(td)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def submit(self, td) -> Future:
        """Submit a request and return a Future immediately."""
        return self._transport.submit(td)

    async def acall(self, td):
        """Submit ``td`` and await its result from an asyncio event loop."""
        return await asyncio.wrap_future(self._transport.submit(td))

    @property
    def transport(self):
        """The transport this client submits to."""
        return self._transport

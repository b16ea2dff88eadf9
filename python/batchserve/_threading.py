"""ThreadingTransport: in-process actors, queued through the C++ core."""

from __future__ import annotations

from concurrent.futures import Future

from batchserve import _core
from batchserve._transport import InferenceTransport


class ThreadingTransport(InferenceTransport):
    """In-process transport for actors that are threads.

    Requests go into a bounded lock-free C++ queue; the server takes them in
    batches chosen by the C++ batching policy with the GIL released, and a
    blocking ``client(td)`` waits for its result on a futex (no Future, no
    lock, no GIL held while waiting).

    Args:
        max_queue_size (int, optional): how many requests may wait to be
            batched (rounded up to a power of two). A full queue blocks
            ``client(td)`` and ``submit(td)`` until room frees (bounded by
            their ``timeout``), or makes ``submit(td, block=False)`` raise
            :class:`batchserve.QueueFull`. Default: ``65536``.

    Example:
        >>> transport = ThreadingTransport()
        >>> server = InferenceServer(policy, transport, max_batch_size=8).start()
        >>> client = transport.client()   # usable from any thread
    """

    def __init__(self, max_queue_size: int = 65536):
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1.")
        self._queue = _core.RequestQueue(max_queue_size)
        self._blocking_call = self._queue.call

    # -- actor side -------------------------------------------------------

    def submit(
        self, td, *, block: bool = True, timeout: float | None = None
    ) -> Future:
        """Enqueue a request and return a Future for its result.

        Args:
            td: one unbatched request.
            block (bool, optional): wait for room when the queue is full
                (default) instead of raising :class:`batchserve.QueueFull`.
            timeout (float, optional): bound on that wait; ``None`` waits
                forever.

        Raises:
            ServerClosedError: the server was shut down.
            QueueFull: the queue is full and ``block`` is false (or the wait
                for room timed out).
        """
        future: Future = Future()
        self._queue.submit(td, future, block, timeout)
        return future

    # -- server side (torchrl's protocol) -------------------------------------

    def drain(self, max_items: int) -> tuple[list, list]:
        """Dequeue up to ``max_items`` pending requests without waiting."""
        items, callbacks, _ = self._queue.drain(max_items)
        return items, callbacks

    def drain_with_timing(self, max_items: int) -> tuple[list, list, list]:
        """Like :meth:`drain`, plus ``time.monotonic()`` submission times."""
        return self._queue.drain(max_items)

    def wait_for_work(self, timeout: float) -> None:
        """Block until a request is queued or ``timeout`` seconds pass."""
        self._queue.wait_for_work(timeout)

    def resolve(self, callback, result) -> None:
        """Hand ``result`` to the request's caller."""
        callback.set_result(result)

    def resolve_exception(self, callback, exc: BaseException) -> None:
        """Hand ``exc`` to the request's caller."""
        callback.set_exception(exc)

    def __len__(self) -> int:
        """Requests waiting to be batched."""
        return len(self._queue)

    @property
    def max_queue_size(self) -> int:
        return self._queue.capacity

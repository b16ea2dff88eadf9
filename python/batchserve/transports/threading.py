"""ThreadingTransport: in-process actors, queued through the C++ core."""

from __future__ import annotations

import weakref

from batchserve import _core
from batchserve.batching.fast_path import RequestSchema, schema_from_spec
from batchserve.batching.native import fail_pending
from batchserve.transports.native import NativeTransport
from batchserve.transports.queued_future import QueuedFuture


class ThreadingTransport(NativeTransport):
    """In-process transport for actors that are threads.

    Requests go into a bounded lock-free C++ queue; the server takes them in
    batches chosen by the C++ batching policy with the GIL released, and a
    blocking ``client(td)`` waits for its result on a futex (no Future, no
    lock, no GIL held while waiting).

    Requests whose TensorDicts share one fixed schema (flat keys, CPU
    tensors of fixed dtypes and shapes) take the fast path: their leaves are
    copied by the server, without the GIL, straight into batch staging
    memory, and each caller gets its row of the output, built by the server
    (see ``batchserve.batching.fast_path``). The schema is learned from traffic, or given
    by ``request_spec``. Other requests take the general path
    (``collate_fn``, ``unbind``) on the same server.

    Args:
        max_queue_size (int, optional): how many requests may wait to be
            batched (rounded up to a power of two). A full queue blocks
            ``client(td)`` and ``submit(td)`` until room frees (bounded by
            their ``timeout``), or makes ``submit(td, block=False)`` raise
            :class:`batchserve.QueueFull`. Default: ``65536``.
        request_spec (TensorDictBase, optional): a representative single
            request. Requests are then checked at submission: a missing key
            raises ``KeyError`` and a leaf of another dtype, shape or device
            raises ``ValueError`` naming the key; only the declared keys
            travel to the model. Default: learn the schema from traffic.
        single_file (bool, optional): how the blocking callers of one batch
            are woken. ``False`` (default): one after the other, each as
            soon as the one before holds the GIL again. ``True``: each when
            the one before calls again, so that one actor thread runs its
            loop between calls at a time. Faster for many thread actors
            whose loops hold the GIL (at 32 threads on 2 cores: an MLP
            policy +30-48% in 3 runs of 4, p99 about half); slower when actors
            sleep, block or compute with the GIL released between calls, as
            each then holds up the next (by at most ~0.5 ms: the server
            wakes a caller the one before did not wake by then). The same
            setting as :class:`~batchserve.SharedMemoryTransport`'s.

    Example:
        >>> transport = ThreadingTransport()
        >>> server = InferenceServer(policy, transport, max_batch_size=8).start()
        >>> client = transport.client()   # usable from any thread
    """

    def __init__(self, max_queue_size: int = 65536, *, request_spec=None,
                 single_file: bool = False):
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1.")
        self._queue = _core.RequestQueue(max_queue_size, bool(single_file))
        # Requests still queued when the transport goes end with an error
        # rather than never, their futures' callbacks run (C++ never calls a
        # Future).
        weakref.finalize(self, _fail_queued, self._queue).atexit = False
        self._schema: RequestSchema | None = None
        self._schema_id = 0
        if request_spec is not None:
            self.set_request_schema(schema_from_spec(request_spec), strict=True)

    # -- actor side -------------------------------------------------------

    def submit(
        self, td, *, block: bool = True, timeout: float | None = None
    ) -> QueuedFuture:
        """Enqueue a request and return a Future for its result.

        The future is a :class:`~batchserve.transports.queued_future.QueuedFuture`:
        a ``concurrent.futures.Future`` whose request the server ends in
        C++ and whose ``result()`` waits on a futex, the GIL released.

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
        return QueuedFuture(self._queue.submit_pending(td, block, timeout))

    @property
    def blocking_call(self):
        """The queue's ``call(td, timeout)``: it waits on a futex, GIL released
        (entered without pybind11's dispatcher: ``RequestQueue.blocking_call``)."""
        return self._queue.blocking_call

    @property
    def max_queue_size(self) -> int:
        return self._queue.capacity

    @property
    def single_file(self) -> bool:
        """Whether blocking callers pass their wake-up on at their next call."""
        return self._queue.single_file


def _fail_queued(queue) -> None:
    fail_pending(queue, RuntimeError("batchserve: the request queue was destroyed"))

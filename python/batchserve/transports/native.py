"""Transports whose queue is the C++ core: the server's side they share.

The server takes their requests in batches with ``RequestQueue.collect``
(``batchserve.batching.batch_source.NativeBatches``) and matches fast-path requests
against their schema; torchrl's transport protocol (``drain``,
``wait_for_work``, ``resolve``, ``resolve_exception``) is here too, so
torchrl's own server can drive them.
"""

from __future__ import annotations

from batchserve.batching.collate import INTERACTION_TYPE_KEY
from batchserve.batching.fast_path import RequestSchema
from batchserve.transports.base import InferenceTransport


class NativeTransport(InferenceTransport):
    """Base of :class:`ThreadingTransport` and :class:`SharedMemoryTransport`:
    subclasses provide ``_queue`` (a ``_core.RequestQueue``), ``_schema`` and
    ``_schema_id``."""

    # -- the C++ request queue ------------------------------------------------

    @property
    def request_queue(self):
        """The ``_core.RequestQueue`` the server batches from."""
        return self._queue

    # -- fast-path schema ---------------------------------------------------

    @property
    def request_spec(self) -> RequestSchema | None:
        """The fixed schema of fast-path requests (given or learned), if any."""
        return self._schema

    @property
    def schema_id(self) -> int:
        return self._schema_id

    @property
    def schema_strict(self) -> bool:
        return self._queue.schema_strict

    def set_request_schema(self, schema: RequestSchema, *, strict: bool) -> None:
        """Sets the schema fast-path requests are matched against."""
        # A request stamped with torchrl's interaction type matches only a
        # schema that has the stamp (the server reads it from staging); else it
        # takes the general path, which honours it.
        general_keys = [] if INTERACTION_TYPE_KEY in schema.keys else [INTERACTION_TYPE_KEY]
        self._schema_id = self._queue.set_schema(
            list(schema.keys), list(schema.dtypes), list(schema.shapes),
            list(schema.leaf_bytes), strict, schema.device, general_keys, list(schema.extras),
        )
        self._schema = schema

    def request_items(self, items: list) -> list:
        """The requests (as ``collate_fn`` takes them) for what the C++ queue
        hands out for them (``Batch.items``, ``RequestQueue.drain``): here the
        submitted objects themselves."""
        return items

    # -- server side (torchrl's protocol) -------------------------------------

    def drain(self, max_items: int) -> tuple[list, list]:
        """Dequeue up to ``max_items`` pending requests without waiting (a
        request its caller withdrew is dropped)."""
        items, callbacks, _ = self._queue.drain(max_items)
        return self.request_items(items), callbacks

    def drain_with_timing(self, max_items: int) -> tuple[list, list, list]:
        """Like :meth:`drain`, plus ``time.monotonic()`` submission times."""
        items, callbacks, submitted_at = self._queue.drain(max_items)
        return self.request_items(items), callbacks, submitted_at

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

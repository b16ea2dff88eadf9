"""Batches from the C++ request queue.

The C++ core ends every request: its caller waits in C++ (a blocking
``client(td)`` or a ``QueuedFuture`` on its completion's futex, a
shared-memory slot). A ``QueuedFuture`` with done callbacks or waiters is
also notified in Python: every ``_core.Batch`` method that ends requests
takes them out of the batch first, then hands back those futures (as
``(i, future)`` pairs where each request has its own result ``i``), and they
are notified here. A shutdown failing the batch meanwhile (another thread,
while a callback runs) therefore finds only requests nobody has taken.

* :func:`collect` takes the server's next batch.
* :class:`NativeBatch` is that batch as the server loop sees it; it builds
  the fast path's per-row results on the server thread.
* :func:`fail_pending` does the same for what is still queued.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

_EMPTY = torch.Size([])

DROPPED_MESSAGE = "batchserve: a batch was dropped before it was resolved"


def _leaf_dict_type():
    """The type of the leaf dict ``TensorDict._new_unsafe`` gives a flat
    TensorDict, when ``_new_unsafe`` only sets the four attributes
    :func:`new_tensordict` sets (checked once, on this tensordict); else None."""
    probe = TensorDict._new_unsafe({"x": torch.zeros(())}, _EMPTY, None)
    plain = TensorDict.__setattr__ is object.__setattr__
    if plain and vars(probe).keys() == {"_device", "_tensordict", "_batch_size", "_td_dim_names"}:
        return type(probe._tensordict)
    return None


_LEAF_DICT = _leaf_dict_type()


def new_tensordict(leaves, batch_size: torch.Size, device: torch.device | None):
    """A TensorDict of ``leaves`` (a dict, or ``(key, value)`` pairs; values
    are tensors or TensorDicts already of ``batch_size`` and on ``device``:
    nothing is checked), as ``TensorDict._new_unsafe`` builds it.

    ``_new_unsafe``'s own steps are taken here (when :func:`_leaf_dict_type`
    found them to be the ones it takes): the call costs ~2.5x more (keyword
    handling, a torch.compile check), and the fast path builds one
    TensorDict per batch and one per request.
    """
    if _LEAF_DICT is None:
        return TensorDict._new_unsafe(dict(leaves), batch_size, device)
    td = _NEW(TensorDict)
    td._device = device
    td._tensordict = _LEAF_DICT(leaves)
    td._batch_size = batch_size
    td._td_dim_names = None
    return td


_NEW = TensorDict.__new__


def row_results(keys, views: list, device: torch.device | None) -> list:
    """One TensorDict of batch size ``[]`` per row: ``keys[j] -> views[j][i]``
    for row ``i``, on ``device`` (see :func:`new_tensordict`)."""
    new, empty = new_tensordict, _EMPTY
    return [new(zip(keys, row), empty, device) for row in zip(*views)]


def _end(outcomes) -> None:
    """Calls each ``set_outcome(outcome)`` of ``outcomes``. A Future resolved
    or cancelled elsewhere is skipped (its caller has left); a callback that
    raises a BaseException (SystemExit...) does not stop the rest, and its
    exception is raised after them."""
    error = None
    for set_outcome, outcome in outcomes:
        try:
            set_outcome(outcome)
        except Exception:
            pass
        except BaseException as exc:
            if error is None:
                error = exc
    if error is not None:
        raise error


def _set_results(taken: list, results) -> None:
    """Sets ``results[i]`` on each Future of ``taken``'s ``(i, future)``."""
    if taken:
        _end((future.set_result, results[i]) for i, future in taken)


def _set_exception(futures: list, exc: BaseException) -> None:
    if futures:
        _end((future.set_exception, exc) for future in futures)


def collect(queue):
    """The server's next batch from ``queue`` (a ``_core.RequestQueue``) as
    a :class:`NativeBatch`; None when nothing came (or only requests whose
    callers withdrew them)."""
    batch = queue.collect()
    return None if batch is None else NativeBatch(batch)


def fail_pending(queue, exc: BaseException) -> int:
    """Ends every request still queued in ``queue`` (or taken by a prefetch)
    with ``exc``; returns how many."""
    failed, ended = queue.fail_pending(exc)
    _set_exception(ended, exc)  # the watched QueuedFutures among them
    return failed


class NativeBatch:
    """A ``_core.Batch`` (requests the server took together), whose watched
    ``QueuedFuture``s are notified here.

    Its fast-path rows were gathered into staging by ``gather`` (see
    ``batchserve.batching.fast_path``); the other requests (``items``) take
    the general path. Dropped with requests left, it fails them.
    """

    __slots__ = ("_batch",)

    def __init__(self, batch):
        self._batch = batch

    def __del__(self):
        if len(self._batch):
            self.fail(RuntimeError(DROPPED_MESSAGE))

    def __len__(self) -> int:
        """Requests not yet ended, on both paths."""
        return len(self._batch)

    @property
    def rows(self) -> int:
        """The fast path's gathered rows."""
        return self._batch.rows

    @property
    def items(self) -> list:
        """The general path's requests."""
        return self._batch.items

    @property
    def submitted_ns(self) -> list:
        return self._batch.submitted_ns

    @property
    def callers(self) -> list:
        """Who sent each general-path request (the submitting thread's id)."""
        return self._batch.callers

    @property
    def rows_extras(self) -> list:
        """The fast path's non-tensor metadata, in row order: per row a tuple
        in the schema's ``extras`` order, as at submission."""
        return self._batch.rows_extras

    @property
    def prefetched_into(self) -> int:
        """The first staging column the prefetched rows are in (0: none)."""
        return self._batch.prefetched_into

    def record_rows(self, stats, dispatch_ns: int, forward_sizes: list, inline_call: bool) -> None:
        """Counts the fast path's rows in ``stats`` (a ``_core.ServerStatsCore``)
        before their hand-back (see ``_core.Batch.record_rows``)."""
        self._batch.record_rows(stats, dispatch_ns, forward_sizes, inline_call)

    def record_rows_hand_back(self, stats) -> None:
        """Their server times and callers' gaps, after the hand-back."""
        self._batch.record_rows_hand_back(stats)

    def gather(self, schema_id: int, columns: list, leaf_bytes, capacity: int) -> int:
        """Moves the requests of schema ``schema_id`` into the staging
        ``columns`` (see ``_core.Batch.gather``); returns the row count."""
        return self._batch.gather(schema_id, columns, leaf_bytes, capacity)

    def ungather(self) -> None:
        """Gives the fast path's rows back to the general path."""
        self._batch.ungather()

    def resolve(self, results) -> None:
        """The general path: ``results[i]`` to request ``i`` of ``items``."""
        _set_results(self._batch.resolve(results), results)

    def resolve_rows(self, keys: list, columns: list, device) -> None:
        """The fast path: row ``i`` of each column (``keys[j] ->
        columns[j][i]``) to the ``i``-th gathered request, as a TensorDict of
        batch size ``[]`` on ``device``, or copied into its slot when the rows
        came from shared memory.

        Every result is built here, on the server thread, before any caller
        is woken (see ``_core.Batch.resolve_rows_with``): one ``unbind`` per
        column, then one TensorDict per row.

        Raises:
            ValueError: a column without one row per request.
        """
        batch = self._batch
        if batch.rows_in_slots:
            batch.scatter_rows(keys, columns)
            return
        n = batch.rows
        if not n:
            return  # already failed (e.g. by a shutdown)
        for column in columns:  # a list column holds metadata objects, one per row
            if (len(column) if type(column) is list else column.shape[0]) != n:
                raise ValueError(f"resolve_rows: every column must have {n} rows")
        # unbind makes n views in one call; for one row, indexing is cheaper.
        # A list column (non-tensor metadata) holds one object per row already.
        views = [(c[0],) for c in columns] if n == 1 else [
            c if type(c) is list else c.unbind(0) for c in columns]
        if device is not None:
            device = torch.device(device)  # once, not per result as _new_unsafe would
        self.resolve_rows_with(row_results(keys, views, device))

    def resolve_rows_with(self, results) -> None:
        """The fast path, with one result object per gathered request."""
        _set_results(self._batch.resolve_rows_with(results), results)

    def fail(self, exc: BaseException) -> None:
        """Ends every request still in the batch with ``exc``."""
        _set_exception(self._batch.fail(exc), exc)

    def fail_rows(self, exc: BaseException) -> None:
        """Ends the fast path's requests with ``exc``."""
        _set_exception(self._batch.fail_rows(exc), exc)

    def fail_some(self, indices, exc: BaseException) -> None:
        """Ends requests ``items[i]`` for ``i`` in ``indices`` with ``exc``,
        leaving the rest to a later :meth:`resolve` (malformed inputs)."""
        _set_exception(self._batch.fail_some(indices, exc), exc)

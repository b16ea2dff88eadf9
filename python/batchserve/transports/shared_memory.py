"""SharedMemoryTransport: actors in other processes, through shared memory.

The same constructor and semantics as torchrl's
``torchrl.modules.inference_server.SharedMemoryTransport``; underneath,
nothing is pickled and no pipe is crossed per request:

* One POSIX shared-memory segment, laid out by C++ (``csrc/shared_slots.h``):
  ``num_slots`` request rows and response rows per declared leaf, a slot
  header per slot (owner process, state, a futex word) and a bitmap of
  submitted slots.
* A client (any process) matches its TensorDict against ``request_spec`` in
  C++, takes a free slot, copies its leaves into the slot's rows, sets the
  slot's ready bit and wakes the server, then sleeps on the slot's futex, all
  without the GIL.
* The server process takes submitted slots as requests of its C++
  ``RequestQueue``: the batching policy, the gather into staging memory
  (straight from the request rows) and the prefetch of the next batch are
  the fast path's own (``batchserve.batching.fast_path``). Results are copied from
  the output columns into the response rows without the GIL, and each client
  is woken on its slot.

Faults: a client process that dies holding a slot does not keep it (the
server frees slots whose owner process is gone, every 0.1 s); clients that
wait on a server process that died raise
:class:`~batchserve.ServerClosedError` within about 0.2 s; the server's
shutdown makes every later call raise it at once and removes the segment's
name from ``/dev/shm`` (processes that mapped it keep their mapping).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import multiprocessing as mp
import os
import secrets
import threading
import weakref
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from tensordict.base import TensorDictBase

from batchserve import _core
from batchserve.batching.fast_path import MAX_LEAVES, RequestSchema, spec_leaves, tensordict_of
from batchserve.transports.base import InferenceClient
from batchserve.transports.exception_codec import decode_exception, encode_exception
from batchserve.transports.native import NativeTransport

_RESOURCE_TYPE = "shared_memory"  # multiprocessing's resource tracker unlinks leftovers
_names = itertools.count()
_NO_BATCH = torch.Size([])


ResultTimeout = _core.ResultTimeout
"""A request through a :class:`SharedMemoryTransport` ran out of time: both a
:class:`TimeoutError` and the :class:`queue.Empty` torchrl's client raises."""


@dataclass(frozen=True)
class SlotSpec(RequestSchema):
    """The leaves of one side (request or response) of the slots: the fields
    and ``leaf_bytes`` of a fast-path schema (keys may be nested, as tuples;
    shapes are whole leaf shapes), the spec's batch size, plus where they lie
    in a segment."""

    batch_size: torch.Size = _NO_BATCH

    @classmethod
    def of(cls, spec, argname: str) -> SlotSpec:
        keys, dtypes, shapes, device = spec_leaves(spec, argname, MAX_LEAVES, nested=True)
        return cls(keys, dtypes, shapes, device, batch_size=spec.batch_size)

    def describe(self) -> str:
        leaves = zip(self.keys, self.dtypes, self.shapes)
        text = ";".join(f"{k}:{d}:{list(s)}" for k, d, s in leaves)
        return f"{list(self.batch_size)}/{text}"

    def tensordict(self, leaves) -> TensorDict:
        """A TensorDict of this side's batch size holding ``leaves`` (one
        tensor per key, in key order), on this side's device."""
        return tensordict_of(self.keys, leaves, self.batch_size, self.device)

    def banks(self, segment, offsets: list[int], num_slots: int) -> list[torch.Tensor]:
        """Per leaf, the tensor [num_slots, *shape] over its rows in ``segment``."""
        memory = torch.frombuffer(segment, dtype=torch.uint8)
        out = []
        for offset, nbytes, dtype, shape in zip(offsets, self.leaf_bytes, self.dtypes, self.shapes):
            rows = memory[offset:offset + nbytes * num_slots]
            out.append(rows.view(dtype).view(num_slots, *shape))
        return out


def _fingerprint(request: SlotSpec, response: SlotSpec, num_slots: int) -> int:
    text = f"{request.describe()}|{response.describe()}|{num_slots}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") or 1


# One mapping per segment per process, shared by its clients and transports
# while any of them lives (tensors over it hold it too).
_mapped: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_mapped_lock = threading.Lock()


def _attach(name: str, fingerprint: int) -> _core.SharedSlots:
    key = (os.getpid(), name)
    with _mapped_lock:
        segment = _mapped.get(key)
        if segment is None:
            try:
                segment = _core.SharedSlots.attach(name, fingerprint)
            except RuntimeError:
                if os.path.exists("/dev/shm" + name):
                    raise
                raise _core.ServerClosedError(
                    f"the SharedMemoryTransport's shared memory {name!r} is gone: its "
                    "server was shut down (or its creating process exited)"
                ) from None
            _mapped[key] = segment
        return segment


def _unlink(segment: _core.SharedSlots) -> None:
    """Removes the segment's name (creator only; idempotent)."""
    if segment.unlink():
        try:
            from multiprocessing import resource_tracker

            resource_tracker.unregister(segment.name, _RESOURCE_TYPE)
        except Exception:  # the tracker may be gone at interpreter exit
            pass


@dataclass(frozen=True)
class _SlotLayout:
    """Where the slots of one segment are and what they hold: its name and
    fingerprint, the slot count, the request and response leaves; what both
    ends need to find their way in it (picklable)."""

    name: str
    fingerprint: int
    num_slots: int
    request: SlotSpec
    response: SlotSpec
    copy_result: bool

    def segment(self) -> _core.SharedSlots:
        return _attach(self.name, self.fingerprint)


class SharedMemoryFuture:
    """One request in flight from :meth:`SharedMemoryClient.submit`.

    ``result(timeout)`` raises :class:`ResultTimeout` (a ``TimeoutError``
    and a ``queue.Empty``) when the time runs out and keeps the request in
    flight, so ``result`` can be called again, as torchrl's future does.
    A future dropped unread gives its slot back.
    """

    __slots__ = ("_client", "_pending", "_outcome", "_is_error", "_settled", "_cancelled")

    def __init__(self, client: SharedMemoryClient, pending):
        self._client = client
        self._pending = pending  # owns the slot until the result is read
        self._outcome = None
        self._is_error = False
        self._settled = False
        self._cancelled = False

    def done(self) -> bool:
        """Whether ``result()`` returns without waiting."""
        return self._settled or self._client._core.done(self._pending)

    def result(self, timeout: float | None = None):
        """The result, or raises the server's exception."""
        self._settle(timeout)
        if self._is_error:
            raise self._outcome
        return self._outcome

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The server's exception for this request, or None."""
        self._settle(timeout)
        return self._outcome if self._is_error else None

    def cancel(self) -> bool:
        """Withdraws the request if the server has not taken it yet; a request
        being served or answered is left as it is (False)."""
        if self._settled or not self._client._core.cancel(self._pending):
            return False
        self._settled = self._is_error = self._cancelled = True
        self._outcome = concurrent.futures.CancelledError()
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def _settle(self, timeout) -> None:
        if self._settled:
            return
        try:
            outcome = self._client._core.result(self._pending, timeout)
            if outcome is not None:
                outcome = self._client._result_of(outcome)
        except (KeyboardInterrupt, SystemExit):
            raise  # the caller's signal, not the request's outcome
        except BaseException as exc:  # the server's exception, or closed / dead
            self._outcome, self._is_error = exc, True
        else:
            if outcome is None:
                raise ResultTimeout("no result within the timeout; the request is still in flight")
            self._outcome = outcome
        self._settled = True


class SharedMemoryClient(InferenceClient):
    """Actor-side handle of a :class:`SharedMemoryTransport`, usable in any
    process (pickle it to a child: it maps the segment there) and from
    several threads.

    ``client(td)`` blocks for the result; ``client.submit(td)`` returns a
    :class:`SharedMemoryFuture`; ``await client.acall(td)`` suits asyncio.

    Raises (from each call):
        KeyError: ``td`` lacks a key of ``request_spec`` (no slot used).
        ValueError: a leaf of another dtype or shape, or not on the CPU.
        ResultTimeout: no result within ``timeout`` seconds (a
            ``TimeoutError`` and a ``queue.Empty``); the request was
            withdrawn, or its result will be discarded.
        ServerClosedError: the server shut down or its process died.
    """

    __slots__ = ("_layout", "_segment", "_core")
    future_type = SharedMemoryFuture

    def __init__(self, layout: _SlotLayout):
        self._transport = None  # a client holds the segment, not the transport
        self._layout = layout
        self._segment = segment = layout.segment()
        request, response = layout.request, layout.response
        offsets = [segment.response_offset(j) for j in range(len(response.keys))]
        self._core = _core.SlotClient(
            segment,
            list(request.keys), list(request.dtypes), list(request.shapes), request.device,
            response.banks(segment, offsets, layout.num_slots), layout.copy_result,
            self._normalise, request.batch_size if request.batch_size else None,
        )
        self._blocking_call = self._call

    def _call(self, td: TensorDictBase, timeout: float | None) -> TensorDict:
        """Takes a slot, copies the leaves in and waits on the slot's futex
        (in C++, without the GIL), then reads the outcome."""
        return self._result_of(self._core.call(td, timeout))

    def _result_of(self, outcome) -> TensorDict:
        """A finished slot's outcome as ``SlotClient`` hands it: its response
        leaves become the result TensorDict, here in the client's own
        process; the bytes of an encoded exception are raised decoded."""
        if type(outcome) is bytes:
            raise decode_exception(outcome)
        return self._layout.response.tensordict(outcome)

    def _submit(self, td: TensorDictBase, timeout: float | None) -> SharedMemoryFuture:
        """Copies ``td`` into a free slot; blocks while all ``num_slots``
        slots hold requests in flight (up to ``timeout``)."""
        return SharedMemoryFuture(self, self._core.submit(td, timeout))

    def __reduce__(self):
        return (SharedMemoryClient, (self._layout,))

    def _normalise(self, td) -> TensorDict:
        """``td`` as the exact TensorDict the C++ matcher takes (called only
        when it did not take ``td`` as it is)."""
        if not isinstance(td, TensorDictBase):
            raise TypeError(
                f"SharedMemoryTransport requests are TensorDicts; got {type(td).__name__}."
            )
        request = self._layout.request
        if td.batch_size != request.batch_size:
            raise ValueError(
                f"a request has request_spec's batch size {list(request.batch_size)}; got "
                f"{list(td.batch_size)}."
            )
        leaves = []
        for key in request.keys:
            value = td.get(key, None)
            if value is None:
                raise KeyError(f"request is missing key {key!r} of request_spec")
            if not isinstance(value, torch.Tensor) or isinstance(value, TensorDictBase):
                raise ValueError(
                    f"request key {key!r} must be a tensor (request_spec); "
                    f"got {type(value).__name__}"
                )
            if value.is_cpu:
                value = value.resolve_neg().resolve_conj().contiguous()
            leaves.append(value)
        return tensordict_of(request.keys, leaves, request.batch_size, request.device)


class SharedMemoryTransport(NativeTransport):
    """Cross-process transport backed by shared-memory slots.

    Clients write each request into a preallocated shared-memory slot and
    wait on that slot's futex; the server batches submitted slots in C++,
    copies their rows straight into its staging memory, and writes each
    result into the slot's response rows. Only the keys declared in the
    specs travel. Drop-in for torchrl's ``SharedMemoryTransport``.

    A slot is owned by one in-flight request: ``num_slots`` bounds the
    requests in flight across all clients, and a submitter blocks while all
    are taken. Slots live in CPU shared memory: clients submit CPU tensors (a
    CUDA leaf raises :class:`ValueError`) and the server moves batches to the
    policy's device.

    Args:
        request_spec (TensorDictBase): a representative single request: its
            keys (nested ones too), dtypes, shapes and batch size define the
            request slots; 1 to ``batchserve._core.MAX_LEAVES`` CPU tensor
            leaves (non-tensor leaves raise :class:`TypeError`). A request of
            batch size ``[3]`` is one request (one slot) whose rows the model
            sees as a ``[3, ...]`` block of each leaf.
        response_spec (TensorDictBase): a representative single response,
            including server-added keys to forward such as
            ``"policy_version"``; the same rules.

    Keyword Args:
        num_slots (int): preallocated slots: the most requests in flight.
        ctx (multiprocessing context, optional): accepted for torchrl
            compatibility; the slots need no multiprocessing primitive, so
            clients work in children started with ``spawn``, ``fork`` or
            ``forkserver`` and with ``torch.multiprocessing`` alike.
        copy_result (bool, optional): ``True`` (default): results are copies.
            ``False``: a result is a view of its response slot, valid until
            that slot serves another request (the same client's next request,
            as a client reuses its slot); consume or copy it before then.
        single_file (bool, optional): how the waiting threads of one client
            process are woken. ``False`` (default): one after the other, each
            as soon as the one before holds the GIL again. ``True``: each
            when the one before calls again, so that one thread of a process
            runs its loop between calls at a time. Faster for many thread
            actors whose loops hold the GIL (Python environments and
            policies: at 32 threads on 2 cores, 3-5x the requests per
            second); slower when actors sleep, block or compute with the GIL
            released between calls, as each then holds up the next (by at
            most ~0.5 ms: the server wakes a result not passed on by then).
            Process actors (one calling thread each) are served the same
            either way.

    .. note::
        Extra keys on requests and on model outputs are dropped; a request
        missing a declared key raises :class:`KeyError` before it takes a
        slot; an output missing a declared response key fails those requests
        with :class:`KeyError`. Output leaves are cast to the response
        dtype; a shape that differs raises :class:`ValueError` to the caller.

    .. note::
        Create the transport in the parent and pass clients (or the
        transport) to children; a child maps the segment by name when it
        unpickles them. The server's shutdown removes that name, so children
        started after it cannot attach; those already running get
        :class:`~batchserve.ServerClosedError` on their next call.

    Example:
        >>> transport = SharedMemoryTransport(
        ...     TensorDict({"observation": torch.zeros(4)}),
        ...     TensorDict({"action": torch.zeros(2),
        ...                 "policy_version": torch.zeros((), dtype=torch.long)}),
        ...     num_slots=8,
        ... )
        >>> client = transport.client()   # pass to mp.Process(args=(client,))
        >>> with InferenceServer(policy, transport, max_batch_size=8):
        ...     action = client(TensorDict({"observation": torch.randn(4)}))["action"]
    """

    def __init__(
        self,
        request_spec: TensorDictBase,
        response_spec: TensorDictBase,
        *,
        num_slots: int,
        ctx: mp.context.BaseContext | None = None,
        copy_result: bool = True,
        single_file: bool = False,
    ):
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive integer, got {num_slots}.")
        request = SlotSpec.of(request_spec, "request_spec")
        response = SlotSpec.of(response_spec, "response_spec")
        self._ctx = ctx
        name = f"/batchserve-{os.getpid()}-{next(_names)}-{secrets.token_hex(4)}"
        fingerprint = _fingerprint(request, response, num_slots)
        segment = _core.SharedSlots.create(
            name, num_slots, request.leaf_bytes, response.leaf_bytes, _core.SLOT_ERROR_BYTES,
            fingerprint, bool(single_file)
        )
        try:
            from multiprocessing import resource_tracker

            resource_tracker.register(name, _RESOURCE_TYPE)  # unlinks it if we are killed
        except Exception:
            pass
        with _mapped_lock:
            _mapped[(os.getpid(), name)] = segment
        self._finalizer = weakref.finalize(self, _unlink, segment)
        self._segment = segment
        self._layout = _SlotLayout(
            name, fingerprint, num_slots, request, response, bool(copy_result)
        )
        self._init_common()

    # The server's fast path keeps only the output columns the response rows
    # take, leaves them where the model put them (even in staging: they are
    # copied into the slots before the next batch), and gathers on its own
    # thread: taking slots is a few atomics, and
    # handing that to the Prefetcher's thread cost more than it saved
    # (measured, 8 actor processes on 2 cores: 35.7 k vs 33.5 k req/s for the
    # MLP, 8.4 k vs 8.7 k for uint8[3,84,84] frames, i.e. noise).
    prefetch_pays = False
    copies_results = True  # the hand-back copies rows into the slots at once

    def _init_common(self) -> None:
        request = self._layout.request
        self._schema = RequestSchema(request.keys, request.dtypes, request.shapes, request.device)
        self._result_keys = frozenset(self._layout.response.keys)
        self._server_end = None
        self._server_end_lock = threading.Lock()
        self._default_client = None

    def __getstate__(self) -> dict:
        return {"layout": self._layout, "ctx": None}

    def __setstate__(self, state: dict) -> None:
        self._layout = state["layout"]
        self._ctx = None
        self._finalizer = None  # the creator owns the name
        self._segment = self._layout.segment()  # now: fail early if it is gone
        self._init_common()

    # -- properties -------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return self._layout.num_slots

    @property
    def name(self) -> str:
        """The segment's name under ``/dev/shm`` (without the leading slash there)."""
        return self._layout.name

    @property
    def copy_result(self) -> bool:
        return self._layout.copy_result

    @property
    def single_file(self) -> bool:
        return self._segment.single_file

    @property
    def segment(self) -> _core.SharedSlots:
        """The shared-memory segment, as mapped in this process."""
        return self._segment

    @property
    def response_layout(self) -> SlotSpec:
        """The response leaves in slot order: keys, dtypes, shapes (per
        request), as each slot's response rows hold them."""
        return self._layout.response

    @property
    def _response_slots(self) -> TensorDict:
        """The response rows of every slot, as torchrl's transport names its
        bank: a TensorDict of batch size ``[num_slots, *response batch size]``
        over the shared memory (a ``copy_result=False`` result is a view of
        its slot's row)."""
        layout, segment = self._layout, self._segment
        response = layout.response
        offsets = [segment.response_offset(j) for j in range(len(response.keys))]
        banks = response.banks(segment, offsets, layout.num_slots)
        batch_size = torch.Size([layout.num_slots, *response.batch_size])
        return tensordict_of(response.keys, banks, batch_size, response.device)

    # -- actor side ---------------------------------------------------------------

    def client(self) -> SharedMemoryClient:
        """An actor-side client; pass it to a child process as an argument."""
        return SharedMemoryClient(self._layout)

    def submit(self, td: TensorDictBase) -> SharedMemoryFuture:
        """Submit from this process through a shared default client."""
        if self._default_client is None:
            self._default_client = self.client()
        return self._default_client.submit(td)

    # -- server side --------------------------------------------------------------

    @property
    def result_keys(self) -> frozenset:
        """The response keys: the only output columns the slots take."""
        return self._result_keys

    @property
    def _queue(self) -> _core.RequestQueue:
        """The server end, made on first use by a server (in whatever process
        the server runs): a RequestQueue whose intake is the slots."""
        end = self._server_end
        return end[0] if end is not None else self._make_server_end()[0]

    @property
    def _schema_id(self) -> int:
        end = self._server_end
        return end[1] if end is not None else self._make_server_end()[1]

    def _make_server_end(self) -> tuple:
        with self._server_end_lock:
            if self._server_end is None:
                request, response = self._layout.request, self._layout.response
                segment = self._segment
                queue_ = _core.RequestQueue(max(2, self._layout.num_slots))
                schema_id = queue_.set_schema(
                    list(request.keys), list(request.dtypes), list(request.shapes),
                    request.leaf_bytes, True, request.device, [],
                )
                offsets = [segment.request_offset(j) for j in range(len(request.keys))]
                queue_.attach_slots(_core.SlotServer(
                    segment, schema_id, request.banks(segment, offsets, self._layout.num_slots),
                    list(response.keys), list(response.dtypes), list(response.shapes),
                    encode_exception,
                ))
                self._server_end = (queue_, schema_id)
            return self._server_end

    @property
    def schema_strict(self) -> bool:
        return True

    def request_items(self, items: list) -> list:
        """Each general-path request as a TensorDict of views of its slot's
        request rows (the C++ batch hands out those views)."""
        request = self._layout.request
        return [request.tensordict(leaves) for leaves in items]

    def set_request_schema(self, schema: RequestSchema, *, strict: bool) -> None:
        if schema != self._schema:
            raise ValueError(
                "a SharedMemoryTransport's request format is its request_spec, fixed when "
                "it is made; pass request_spec to SharedMemoryTransport, not the server."
            )

    def server_stopped(self) -> None:
        """The server shut down: remove the segment's name from /dev/shm."""
        if self._finalizer is not None:
            self._finalizer()

    def close(self) -> None:
        """Remove the segment's name now (the creating process only). Clients
        already attached keep working while a server runs."""
        self.server_stopped()

    def __len__(self) -> int:
        """Requests submitted and not yet taken by the server."""
        return self._segment.ready_count

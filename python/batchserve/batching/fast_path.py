"""The fast path: requests of one fixed schema batched in staging memory.

A schema is a flat set of keys, each a CPU tensor of fixed dtype and shape.
A request that matches the transport's schema carries its leaves to the
server in C++ (``csrc/python/schema.h``: ``match_schema``); the server

1. copies the rows into one of two staging buffers (``Batch.gather``, C++,
   the GIL released for large copies): the only copy of the request bytes on
   the CPU. While the model runs on one buffer, a C++ helper thread gathers
   the requests already waiting into the other (``FastPath.prefetch``).
2. runs the model on a dense TensorDict of batch size ``[n]`` whose leaves
   are views of the staging columns (moved to the model's device on a copy
   stream when that is a GPU),
3. resolves each request with its row of the output
   (``NativeBatch.resolve_rows``: one ``unbind`` per output column, one
   TensorDict per request, built on the server thread before any caller is
   woken; a shared-memory slot's row is copied into its slot in C++).

No Python object is created per request on the intake side. A result never
shares memory the server reuses: output columns that lie in staging memory
(a ``TensorDictModule`` returns its input with the outputs added, a model may
return a view of its input) are copied out once per batch first; every
other column is memory the model allocated for that batch.

The schema is given (``request_spec=``, strict: a mismatching TensorDict
raises at submission) or learned from traffic: the first request of a
general-path batch that could take the fast path sets it. Anything else
(nested keys, non-tensor entries, other dtypes or shapes, a custom
``collate_fn``, a user transport) takes the general path on the same server.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from tensordict import NonTensorStack, TensorDict
from tensordict.base import TensorDictBase, _is_leaf_nontensor, is_non_tensor

from batchserve import _core
from batchserve.batching.collate import INTERACTION_TYPE_KEY
from batchserve.batching.native import new_tensordict

# Leaves a fast-path schema may have (RowSource::kMaxLeaves in C++).
MAX_LEAVES = _core.MAX_LEAVES


@dataclass(frozen=True)
class RequestSchema:
    """The keys, dtypes and shapes of one request on the fast path, and the
    device its TensorDict declares (None or the CPU)."""

    keys: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[torch.Size, ...]
    device: torch.device | None = None
    # Keys holding non-tensor metadata (NonTensorData): each request's own
    # object travels beside its rows, the model sees them stacked.
    extras: tuple = ()

    def difference(self, other: RequestSchema) -> str:
        """How ``other`` differs from this schema, in words ("" when it does not)."""
        if set(self.keys + self.extras) != set(other.keys + other.extras):
            extra = [k for k in other.keys + other.extras if k not in self.keys + self.extras]
            missing = [k for k in self.keys + self.extras if k not in other.keys + other.extras]
            parts = ([f"extra keys {extra}"] if extra else []) + (
                [f"missing keys {missing}"] if missing else [])
            return ", ".join(parts)
        mine = dict(zip(self.keys, zip(self.dtypes, self.shapes)))
        for key, dtype, shape in zip(other.keys, other.dtypes, other.shapes):
            if key not in mine:
                return f"key {key!r} holds a tensor, served non-tensor metadata"
            if mine[key][0] != dtype:
                return f"key {key!r} has dtype {dtype}, served {mine[key][0]}"
            if mine[key][1] != shape:
                return f"key {key!r} has shape {list(shape)}, served {list(mine[key][1])}"
        if self.device != other.device:
            return f"TensorDict device {other.device}, served {self.device}"
        return ""

    @functools.cached_property
    def leaf_bytes(self) -> tuple[int, ...]:
        return tuple(
            s.numel() * torch.empty((), dtype=d).element_size()
            for d, s in zip(self.dtypes, self.shapes)
        )


def schema_of(td) -> RequestSchema | None:
    """The schema of request ``td`` if the fast path can take it, else None
    (the rules are the C++ matcher's: ``_core.fast_path_schema``). torchrl's
    interaction-type stamp is a leaf like any other: the server reads it from
    staging (:meth:`StagingBuffer.interaction_codes`)."""
    leaves = _core.fast_path_schema(td)
    return None if leaves is None else RequestSchema(*leaves)


def learn_schema(transport, item) -> None:
    """Makes the schema of ``item`` (a request) ``transport``'s fast-path
    schema, learned (not strict), if it fits the fast path and is not the
    schema already."""
    schema = schema_of(item)
    if schema is not None and schema != transport.request_spec:
        transport.set_request_schema(schema, strict=False)


def spec_leaves(spec, argname: str, max_leaves: int | None = None, *, nested: bool = False):
    """The keys, dtypes, shapes and TensorDict device (None or the CPU) of a
    spec: a TensorDict describing one request or response, with 1 to
    ``max_leaves`` CPU tensor leaves; flat keys and batch size ``[]``, or,
    with ``nested``, nested keys (as tuples) and any batch size (the shapes
    are then the leaves' whole shapes, batch dims included).

    Raises:
        TypeError: not a TensorDict, or a leaf that is not a tensor.
        ValueError: a batch size or nested keys (without ``nested``), a
            non-CPU leaf, an unsupported dtype, no leaves or too many.
    """
    if not isinstance(spec, TensorDictBase):
        raise TypeError(
            f"{argname} must be a TensorDict (a representative single item); got "
            f"{type(spec).__name__}."
        )
    if spec.batch_dims != 0 and not nested:
        raise ValueError(
            f"{argname} must describe one request (batch size []); got {list(spec.batch_size)}."
        )
    if nested:
        # _is_leaf_nontensor surfaces NonTensorData leaves so that they are
        # rejected, as torchrl's _make_slot_bank does, instead of ignored.
        entries = spec.items(include_nested=True, leaves_only=True, is_leaf=_is_leaf_nontensor)
    else:
        entries = ((key, spec.get(key)) for key in spec.keys())
    keys, dtypes, shapes = [], [], []
    for key, value in entries:
        if isinstance(value, TensorDictBase) and not is_non_tensor(value):
            raise ValueError(
                f"{argname} key {key!r}: only flat tensor leaves are supported; it holds a "
                "nested TensorDict (flatten it, e.g. with flatten_keys())."
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{argname} key {key!r}: only tensor leaves are supported; got "
                f"{type(value).__name__}. Encode small metadata as tensors."
            )
        if value.device.type != "cpu":
            raise ValueError(
                f"{argname} key {key!r} is a {value.device} tensor; requests and results "
                "travel as CPU tensors (the server moves batches to its device); slots "
                "live in CPU shared memory."
            )
        if value.dtype.is_complex or value.is_quantized:
            raise ValueError(f"{argname} key {key!r}: dtype {value.dtype} is not supported.")
        keys.append(key)
        dtypes.append(value.dtype)
        shapes.append(value.shape)
    if not keys:
        raise ValueError(f"{argname} must contain at least one tensor leaf.")
    if max_leaves is not None and len(keys) > max_leaves:
        raise ValueError(
            f"{argname} has {len(keys)} tensor leaves; at most {max_leaves} are supported "
            "(batchserve._core.MAX_LEAVES)."
        )
    device = spec.device if spec.device is not None and spec.device.type == "cpu" else None
    return tuple(keys), tuple(dtypes), tuple(shapes), device


def tensordict_of(keys, values, batch_size: torch.Size, device) -> TensorDict:
    """A TensorDict holding ``values`` under ``keys`` (str, or tuples for
    nested keys: the nested TensorDicts get ``batch_size`` too)."""
    if all(type(key) is str for key in keys):
        return new_tensordict(zip(keys, values), batch_size, device)
    root: dict = {}
    for key, value in zip(keys, values):
        if type(key) is str:
            key = (key,)
        node = root
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return _nest(root, batch_size, device)


def _nest(tree: dict, batch_size: torch.Size, device) -> TensorDict:
    leaves = {k: _nest(v, batch_size, device) if type(v) is dict else v for k, v in tree.items()}
    return new_tensordict(leaves, batch_size, device)


def schema_from_spec(spec) -> RequestSchema:
    """The strict schema of ``request_spec`` (a representative single request).

    A spec that declares torchrl's interaction-type stamp (as torchrl's
    ``prepare_cudagraph(..., interaction_type=)`` stamps it) makes every
    request carry one; a spec without it sends stamped requests to the general
    path, which honours their stamp.

    Raises:
        TypeError, ValueError: the spec cannot describe fast-path requests
            (see :func:`spec_leaves`).
    """
    return RequestSchema(*spec_leaves(spec, "request_spec", MAX_LEAVES))


class StagingBuffer:
    """``rows`` rows of every leaf of a schema, one column tensor per leaf.

    torchrl's interaction-type stamp, when the schema has it, is gathered
    like any leaf but is not the model's: :meth:`batch` leaves it out and
    :meth:`interaction_codes` reads it.
    """

    __slots__ = ("keys", "extras", "device", "columns", "pointers", "rows", "copied",
                 "_model_keys", "_model_columns", "_spans", "_codes", "_stamps")

    def __init__(self, schema: RequestSchema, rows: int, pin: bool):
        self.keys = schema.keys
        self.extras = schema.extras
        self.device = schema.device
        self.columns = tuple(
            torch.empty((rows, *shape), dtype=dtype, pin_memory=pin)
            for dtype, shape in zip(schema.dtypes, schema.shapes)
        )
        self.pointers = [c.data_ptr() for c in self.columns]
        self.rows = rows
        self.copied = None  # CUDA event: the last host-to-device copy from here is done
        stamp = schema.keys.index(INTERACTION_TYPE_KEY) if INTERACTION_TYPE_KEY in schema.keys \
            else None
        self._codes = None if stamp is None else self.columns[stamp].view(rows, -1)
        # The same memory through numpy, whose slicing and tobytes() cost a
        # tenth of torch's indexing: the stamps are read every batch.
        self._stamps = None if stamp is None else self._codes.numpy()
        model = [j for j in range(len(self.keys)) if j != stamp]
        self._model_keys = [self.keys[j] for j in model]
        self._model_columns = [self.columns[j] for j in model]
        # Each column's memory as [start, end) addresses, for clone_if_owned.
        self._spans = tuple((base, base + c.nbytes) for c, base in zip(self.columns, self.pointers))

    def batch(self, n: int) -> TensorDict:
        """A new TensorDict of batch size [n] over the first n rows (new
        views each time: a model may reshape its input in place), without
        the interaction-type stamp."""
        return tensordict_of(self._model_keys, [c[:n] for c in self._model_columns],
                             torch.Size([n]), self.device)

    def interaction_codes(self, n: int) -> int | torch.Tensor | None:
        """The interaction-type code the first n rows are stamped with: one
        int when they all share it (the usual batch), else each row's code
        (a tensor of shape ``[n]``); None when the schema has no stamp.

        Raises:
            RuntimeError: a batched request whose own rows mix interaction
                types (it cannot be served as asked).
        """
        if self._codes is None:
            return None
        stamps = self._stamps[:n]
        raw = stamps.tobytes()
        if raw == raw[:stamps.itemsize] * stamps.size:  # one code in every row
            return int(stamps[0, 0])
        codes = self._codes[:n]
        if codes.shape[1] != 1 and not bool(codes.eq(codes[:, :1]).all()):
            raise RuntimeError(
                "InferenceServer received a request whose rows mix interaction types "
                f"({INTERACTION_TYPE_KEY!r}); stamp one interaction type per request."
            )
        return codes[:, 0]

    def clone_if_owned(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, or a copy of it if it lies in this buffer's memory (the
        next batches overwrite that)."""
        return clone_if_within(tensor, self._spans)


def stamp_version(output: TensorDictBase, version_key, version: int) -> None:
    """Sets ``version`` under ``version_key`` (None: none) in every row of
    ``output``, a new long tensor on its device, as the general path stamps
    it: a TensorDict whose entries are not flat tensor columns."""
    if version_key is not None:
        output.set(version_key, torch.full(output.batch_size, version, dtype=torch.long,
                                           device=output.device))


def clone_if_within(tensor: torch.Tensor, spans) -> torch.Tensor:
    """``tensor``, or a copy of it if it starts in one of ``spans`` (CPU
    memory as ``[start, end)`` addresses)."""
    if tensor.is_cpu:
        start = tensor.data_ptr()
        for base, end in spans:
            if base <= start < end:
                return tensor.clone()
    return tensor


class FastPath:
    """The server's side of the fast path: staging, device hand-off, hand-back.

    Args:
        transport: a transport with a C++ request queue (its queue holds the
            schema requests are matched against; see
            ``batchserve.transports.base.InferenceTransport``).
        device: where the model runs (``None``: where the batch is).
        output_device: where results go (``None``: where the model left them).
    """

    def __init__(self, transport, device: torch.device | None, output_device: torch.device | None):
        self._transport = transport
        self.device = device
        self.output_device = output_device
        self._cuda = device is not None and device.type == "cuda"
        self._pin = torch.cuda.is_available()
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        # What the transport hands back (None: every output key), and whether
        # gathering the next batch on a helper thread pays for the hand-off.
        self._result_keys = transport.result_keys
        self._nested_result_keys = self._result_keys is not None and any(
            type(key) is tuple for key in self._result_keys)
        # The transport copies each result out during the hand-back (shared
        # memory): output columns may stay in staging until then.
        self._copies_results = transport.copies_results
        self._prefetch_pays = transport.prefetch_pays
        self._schema_id = 0
        self._buffers: list[StagingBuffer] = []
        # The current batch's metadata: key -> (the stack the model saw, the
        # requests' own objects), for the hand-back.
        self._extras: dict = {}
        self._next = 0
        # A model on a GPU with results wanted on the CPU: outputs come back
        # through pinned memory.
        self._to_pinned_host = (
            self._cuda and output_device is not None and output_device.type == "cpu"
        )

    # -- schema -----------------------------------------------------------------

    def learn(self, items: list, had_rows: bool) -> None:
        """Sets the schema from a general-path batch: its first request, if it
        fits the fast path, unless requests of the current schema are still
        coming (``had_rows``) or the schema was given by ``request_spec``."""
        if had_rows or self._transport.schema_strict or not items:
            return
        learn_schema(self._transport, items[0])

    def refusal(self, item) -> str:
        """Why ``item``, served on the general path, did not take the fast
        path (for ``stats()["fast_path_refusals"]``)."""
        why = _core.fast_path_refusal(item)
        if why is not None:
            return why
        schema = self._transport.request_spec
        mine = schema_of(item)
        if schema is None or mine is None:
            return "the first request of its schema (the fast path learns the schema from it)"
        if INTERACTION_TYPE_KEY in mine.keys and INTERACTION_TYPE_KEY not in schema.keys:
            if self._transport.schema_strict:
                return (f"stamped with {INTERACTION_TYPE_KEY!r}, which request_spec does not "
                        "declare")
        difference = schema.difference(mine)
        if difference:
            return f"another schema than the served one: {difference}"
        return "queued before the fast path learned its schema"

    # -- one batch --------------------------------------------------------------

    def gather(self, batch, max_rows: int) -> StagingBuffer | None:
        """Copies the batch's requests of the current schema into the next
        staging buffer, after the rows a prefetch already put there; None
        when the batch has none."""
        schema = self._transport.request_spec
        if schema is None:
            if batch.rows:
                batch.ungather()
            return None
        schema_id = self._transport.schema_id
        if schema_id != self._schema_id or max_rows > self._buffers[0].rows:
            if batch.rows:  # gathered for a schema or a size that is gone
                batch.ungather()
            # Allocate before switching: when this raises (out of memory),
            # the batch fails with the error and the next batch allocates
            # again; the old buffers are never taken for the new schema.
            buffers = [StagingBuffer(schema, max_rows, self._pin) for _ in range(2)]
            self._schema_id, self._buffers, self._next = schema_id, buffers, 0
        buffer = self._next_buffer()
        self._next = (self._next + 1) % len(self._buffers)
        if batch.rows and batch.prefetched_into != buffer.pointers[0]:
            batch.ungather()  # prefetched for another server on this transport
        if batch.gather(schema_id, buffer.pointers, schema.leaf_bytes, buffer.rows) == 0:
            return None
        return buffer

    def prefetch(self) -> bool:
        """Starts gathering the next batch into the buffer the current batch
        does not use, while the model runs (see ``Prefetcher`` in C++).
        Returns whether requests were waiting and a prefetch started."""
        schema = self._transport.request_spec
        if (not self._prefetch_pays or schema is None
                or self._transport.schema_id != self._schema_id):
            return False
        buffer = self._next_buffer()
        return self._transport.request_queue.prefetch(
            self._schema_id, buffer.pointers, schema.leaf_bytes, buffer.rows
        )

    def _next_buffer(self) -> StagingBuffer:
        buffer = self._buffers[self._next]
        if buffer.copied is not None:
            buffer.copied.synchronize()  # its last host-to-device copy must be done
            buffer.copied = None
        return buffer

    def model_input(self, buffer: StagingBuffer, n: int, batch) -> TensorDictBase:
        """The batch the model sees: views of staging, or their copy on the
        model's GPU made by one non-blocking copy per leaf on the copy stream
        (the compute stream waits on an event, nothing else is synchronised);
        the requests' non-tensor metadata stacked beside them."""
        model_input = self._model_input(buffer, n)
        self._extras = {}
        if buffer.extras:
            for key, objects in zip(buffer.extras, zip(*batch.rows_extras)):
                objects = list(objects)
                stack = NonTensorStack(*objects)
                model_input.set(key, stack)
                self._extras[key] = (stack, objects)
        return model_input

    def _model_input(self, buffer: StagingBuffer, n: int) -> TensorDictBase:
        batch = buffer.batch(n)
        if not self._cuda:
            return batch if self.device is None else batch.to(self.device)
        compute = torch.cuda.current_stream(self.device)
        copy_stream = self._copy_stream
        with torch.cuda.stream(copy_stream):
            on_device = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        compute.wait_event(copied)
        for tensor in on_device.values():
            tensor.record_stream(compute)  # allocated on the copy stream, used on compute
        buffer.copied = copied
        return TensorDict._new_unsafe(on_device, batch_size=torch.Size([n]), device=self.device)

    def hand_back(self, batch, output: TensorDictBase, n: int, buffer: StagingBuffer,
                  version_key, version: int) -> None:
        """Resolves the gathered requests with the rows of ``output``, moved
        to ``output_device`` when one is set."""
        if self.output_device is not None and not self._to_pinned_host:
            output = output.to(self.output_device)
        columns = self._columns(output, buffer, version_key, version, n)
        if columns is None:  # nested or non-tensor entries: TensorDict's own unbind
            output = output.apply(buffer.clone_if_owned)  # nothing may point into staging
            if self._to_pinned_host:
                output = output.to(self.output_device)
            stamp_version(output, version_key, version)
            batch.resolve_rows_with(output.unbind(0))
            return
        keys, values, device = columns
        batch.resolve_rows(keys, values, device)

    def _columns(self, output: TensorDictBase, buffer: StagingBuffer, version_key,
                 version: int, n: int):
        """The output's keys and columns (plus the policy version), none of
        them in staging memory, and the device the results are on; None when
        the output has nested or non-tensor entries."""
        if type(output) is not TensorDict or output.batch_dims != 1:
            return None  # results keep the output's further batch dims this way
        if isinstance(version_key, tuple):
            if len(version_key) != 1:
                return None  # a nested stamp: TensorDict's own set and unbind
            version_key = version_key[0]
        keys, values = [], []
        wanted = self._result_keys
        if self._nested_result_keys:  # the transport's keys, looked up in the output
            entries = [(key, output.get(key, None)) for key in wanted if key != version_key]
        else:
            entries = output._tensordict.items()  # exact TensorDict: its leaves
        for key, value in entries:
            if wanted is not None and key not in wanted:
                continue  # dropped by the transport: no need to keep it
            if type(value) is not torch.Tensor:
                carried = self._extras.get(key)
                if carried is None or value is not carried[0]:
                    return None
                keys.append(key)  # each request gets its own metadata object back
                values.append(carried[1])
                continue
            keys.append(key)
            values.append(value if self._copies_results else buffer.clone_if_owned(value))
        device = output.device
        if self._to_pinned_host:
            values = self._to_host(values)
            device = self.output_device
        if version_key is not None and wanted is not None and version_key not in wanted \
                and (version_key,) not in wanted:
            version_key = None  # the transport drops it: no column to make (~9 µs a batch)
        if version_key is not None:
            # New per batch, like every column: a caller may write to its result.
            # (device=None is parsed slower than no device: ~2 µs a batch)
            column = (torch.full((n,), version, dtype=torch.long) if device is None
                      else torch.full((n,), version, dtype=torch.long, device=device))
            if version_key in keys:
                values[keys.index(version_key)] = column
            else:
                keys.append(version_key)
                values.append(column)
        return keys, values, device

    def _to_host(self, values: list) -> list:
        """GPU columns copied into pinned memory (a fresh block per batch from
        torch's caching host allocator), waiting on the compute stream only."""
        pinned = []
        for v in values:
            if type(v) is not torch.Tensor or v.is_cpu:  # metadata objects stay as they are
                pinned.append(v)
                continue
            host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            host.copy_(v, non_blocking=True)
            pinned.append(host)
        torch.cuda.current_stream(self.device).synchronize()
        return pinned


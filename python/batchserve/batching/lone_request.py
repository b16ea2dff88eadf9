"""A lone caller's fast-path request, served without staging.

When a blocking caller finds the server idle it serves its own request on
its own thread (an inline call, ``csrc/core/inline_gate.h``). A batch of one
needs none of the batch machinery, which cost ~30 µs a call on the 2-core
VM: no ``_core.Batch``, no staging copy (the request's own leaves, each
unsqueezed to a row, are the model's input), no per-column ``unbind``.
:class:`LoneRequests` builds that input and the caller's result; the server
loop's ``WorkerLoop.serve_one`` runs the model between the two.

The result is the one the staged path hands back:

* the output's row, none of it in the caller's memory: a column that is the
  request's own leaf (a ``TensorDictModule`` returns its input with the
  outputs added), or lies in one (a model may return a view of its input),
  is copied, since the caller goes on refilling its tensors;
* the policy version stamped under ``policy_version_key``;
* only the transport's result keys, when it names them.

A request this plan does not take (non-tensor metadata, which the staged
path stacks; an interaction-type stamp of more than one element, which may
mix types) is served as a batch of one by the staged path instead.

One difference remains: the model reads the caller's own tensors, as with
torchrl's ``lazy_stack`` collation, where the staged path gives it a copy.
A model that writes into its input in place writes into the caller's
tensors here.

A submitted request its caller claims while it waits for the result (see
``RequestQueue::serve_claimed``) is served the same way, from the bytes
copied at submission (:meth:`LoneRequests.copied_leaves`): the caller may
have refilled its tensors since.
"""

from __future__ import annotations

import sys

import torch
from tensordict import TensorDict

from batchserve.batching.collate import INTERACTION_TYPE_KEY
from batchserve.batching.fast_path import (
    RequestSchema,
    clone_if_within,
    stamp_version,
    tensordict_of,
)
from batchserve.batching.native import new_tensordict

# Version stamps made at once (see LoneRequests._version_stamp).
STAMPS_PER_COLUMN = 256

_ONE = torch.Size([1])
_EMPTY = torch.Size([])


class LoneRequests:
    """The requests of one fast-path schema, served one at a time.

    Args:
        schema_id: the transport's id of ``schema`` (requests carry it).
        schema: the schema.
        result_keys: the keys the transport hands back (None: all).
    """

    __slots__ = ("schema_id", "served", "stamp", "_model_keys", "_flat", "_leaf_index",
                 "_leaf_rows", "_device", "_result_keys", "_stamp_key", "_stamps", "_layouts",
                 "_stamp_leaves")

    def __init__(self, schema_id: int, schema: RequestSchema, result_keys):
        self.schema_id = schema_id
        # Metadata is stacked beside the rows by the staged path only.
        self.served = not schema.extras
        keys = schema.keys
        # The index of torchrl's interaction-type stamp among the leaves (None: unstamped).
        self.stamp = keys.index(INTERACTION_TYPE_KEY) if INTERACTION_TYPE_KEY in keys else None
        self._model_keys = tuple(k for j, k in enumerate(keys) if j != self.stamp)
        self._flat = all(type(key) is str for key in keys)
        self._leaf_index = {key: j for j, key in enumerate(keys)}
        # Whether a leaf itself could be a column of the output (batch size
        # [1]): only one whose shape starts with 1.
        self._leaf_rows = any(shape[:1] == (1,) for shape in schema.shapes)
        self._device = schema.device
        self._result_keys = result_keys
        self._stamp_key = (None, None)  # the (version, device) of the stamps below
        self._stamps = iter(())  # the version stamps left for the next calls
        # Per leaf: its dtype, and its shape when frombuffer's 1-d tensor
        # needs a view (None: it is the leaf as is; an empty leaf: no bytes).
        self._layouts = tuple(
            (dtype, None if len(shape) == 1 and shape.numel() > 0 else shape)
            for dtype, shape in zip(schema.dtypes, schema.shapes))
        # A one-element stamp's leaf per interaction code (the model never
        # sees the stamp: only its code is read).
        self._stamp_leaves = {}

    def copied_leaves(self, copies: tuple) -> tuple:
        """A submitted request's leaves (in schema order) as tensors over the
        bytes its submission copied (``bytearray`` objects, kept alive by the
        tensors)."""
        leaves = []
        for j, (copy, (dtype, shape)) in enumerate(zip(copies, self._layouts)):
            if j == self.stamp and len(copy) == dtype.itemsize and not dtype.is_floating_point:
                # ~5 us of frombuffer and view saved; read as torch would.
                code = int.from_bytes(copy, sys.byteorder, signed=dtype.is_signed)
                leaf = self._stamp_leaves.get(code)
                if leaf is None:
                    leaf = self._stamp_leaves[code] = torch.tensor(code, dtype=dtype).view(shape)
                leaves.append(leaf)
            elif shape is None:
                leaves.append(torch.frombuffer(copy, dtype=dtype))
            elif shape.numel() == 0:
                leaves.append(torch.empty(shape, dtype=dtype))
            else:
                leaves.append(torch.frombuffer(copy, dtype=dtype).view(shape))
        return tuple(leaves)

    def interaction_code(self, leaves: tuple) -> int | None:
        """The interaction-type code a stamped request (see :attr:`stamp`)
        carries, or None when its stamp has several elements (served staged:
        they may mix types)."""
        stamp = leaves[self.stamp]
        return int(stamp) if stamp.numel() == 1 else None

    def model_input(self, leaves: tuple, device: torch.device | None) -> TensorDict:
        """The model's batch of one: the request's leaves (in schema order)
        as rows, without the stamp; on ``device`` (the CPU: the leaves are CPU
        tensors), or None: on the requests' TensorDict device, as staged."""
        if device is None:
            device = self._device
        if self.stamp is not None:
            leaves = leaves[:self.stamp] + leaves[self.stamp + 1:]
        rows = [leaf.unsqueeze(0) for leaf in leaves]
        if self._flat:
            return new_tensordict(zip(self._model_keys, rows), _ONE, device)
        return tensordict_of(self._model_keys, rows, _ONE, device)

    def result(self, output, leaves: tuple, version_key, version: int) -> TensorDict:
        """The caller's result from ``output``, the model's output for the
        request of ``leaves`` (checked: a TensorDict of batch size ``[1, ...]``)."""
        if type(output) is TensorDict and output.batch_dims == 1 and (
                version_key is None or type(version_key) is str):
            row = self._row(output, leaves)
            if row is not None:
                device = output.device
                if version_key is not None:
                    row[version_key] = self._version_stamp(version, device)
                return new_tensordict(row, _EMPTY, device)
        # Nested or non-tensor entries, further batch dims, a nested stamp:
        # TensorDict's own steps, as the staged path takes them.
        spans = _spans(leaves)
        output = output.apply(lambda tensor: clone_if_within(tensor, spans))
        stamp_version(output, version_key, version)
        return output[0]

    def _version_stamp(self, version: int, device) -> torch.Tensor:
        """A 0-d long tensor holding ``version``, its own element of a
        column of :data:`STAMPS_PER_COLUMN` made for the calls to come (one
        torch op per column instead of one per call: ~2 µs a call after a
        forward). A caller may write to its result's stamp: it is nobody
        else's element, as a result's stamp in a staged batch's column."""
        if version != self._stamp_key[0] or device != self._stamp_key[1]:
            self._stamp_key = (version, device)
            self._stamps = iter(())
        stamp = next(self._stamps, None)
        if stamp is None:
            column = (torch.full((STAMPS_PER_COLUMN,), version, dtype=torch.long)
                      if device is None  # (device=None is parsed slower)
                      else torch.full((STAMPS_PER_COLUMN,), version, dtype=torch.long,
                                      device=device))
            self._stamps = iter(column.unbind(0))
            stamp = next(self._stamps)
        return stamp

    def _row(self, output: TensorDict, leaves: tuple) -> dict | None:
        """Row 0 of each column of a flat output, copied where it lies in the
        caller's memory; None when an entry is not a tensor."""
        wanted = self._result_keys
        spans = None
        row = {}
        for key, value in output._tensordict.items():
            if type(value) is not torch.Tensor:
                return None
            if wanted is not None and key not in wanted:
                continue
            j = self._leaf_index.get(key)
            if j is not None and value._base is leaves[j]:  # the model passed its input through
                row[key] = leaves[j].clone()
                continue
            if value._base is None and not (self._leaf_rows
                                            and any(value is leaf for leaf in leaves)):
                row[key] = value[0]  # not a view: memory the model allocated
                continue
            if spans is None:
                spans = _spans(leaves)
            row[key] = clone_if_within(value, spans)[0]
        return row


def _spans(leaves: tuple) -> list:
    """The caller's leaves' memory, as ``[start, end)`` addresses."""
    return [(leaf.data_ptr(), leaf.data_ptr() + leaf.nbytes) for leaf in leaves]

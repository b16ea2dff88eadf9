"""Turning a list of requests into the model's batch (the general path).

torchrl's ``PolicyClientModule`` stamps the caller's exploration mode
(``tensordict.nn.interaction_type()``, or its explicit ``interaction_type``)
on each request under :data:`INTERACTION_TYPE_KEY`. Requests stamped with
different modes never share a forward: :func:`interaction_groups` splits
such a batch and each part runs under its own ``set_interaction_type``.
A request submitted straight to a transport or to a client
(``transport.client()``, ``InferenceClient``) is not stamped, as in torchrl:
its forward runs under the server's ambient mode. tensordict keeps that
mode process-wide, so in a thread server it is whatever some thread set at
the moment of the forward (a blocking caller's own context only while no
other thread changes it), and in a server in another process it is that
process's own: a caller's ``set_interaction_type`` does not travel with an
unstamped request. Callers that need their mode honoured go through
``PolicyClientModule`` (or stamp the key themselves).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from tensordict import LazyStackedTensorDict, TensorDict, lazy_stack, maybe_dense_stack
from tensordict.base import TensorDictBase
from tensordict.nn.probabilistic import InteractionType, set_interaction_type

# torchrl's PolicyClientModule stamps the caller's exploration mode on each
# request under this key; the server runs the forward under that mode.
INTERACTION_TYPE_KEY = "_torchrl_inference_interaction_type"
_NO_INTERACTION_TYPE = -1
_INTERACTION_TYPES = {
    0: InteractionType.MODE,
    1: InteractionType.MEDIAN,
    2: InteractionType.MEAN,
    3: InteractionType.RANDOM,
    4: InteractionType.DETERMINISTIC,
}


def _common_device(td: TensorDictBase) -> torch.device | None:
    """The one device of all leaves (or td.device), None if mixed or unknown."""
    device = td.device
    for leaf in td.values(include_nested=True, leaves_only=True):
        leaf_device = getattr(leaf, "device", None)
        if leaf_device is None:
            continue
        if device is None:
            device = leaf_device
        elif torch.device(leaf_device) != torch.device(device):
            return None
    return torch.device(device) if device is not None else None


def _with_device_metadata(td: TensorDictBase) -> TensorDictBase:
    """Gives ``td`` (and its sub-tensordicts) the device its leaves live on.

    Requests built with and without ``device=`` then stack together.
    """
    device = _common_device(td)
    if device is None:
        return td
    if td.device == device and all(
        sub.device == device
        for sub in td.values(include_nested=True, leaves_only=False)
        if isinstance(sub, TensorDictBase)
    ):
        return td
    td = td.copy()
    td.clear_device_()
    return td.to(device)


def default_collate(items: list) -> TensorDictBase:
    """``lazy_stack`` of the requests (torchrl's default collation).

    Requests whose device metadata differ (``device="cpu"`` next to none)
    are normalised first; the common case, one device for all, skips that
    per-leaf walk, which would cost more than the stack itself.
    """
    first = items[0].device
    if any(item.device != first for item in items):
        items = [_with_device_metadata(item) for item in items]
    return lazy_stack(items)


def stacks_requests(collate_fn) -> bool:
    """Whether ``collate_fn`` only stacks the requests, so that the fast path's
    batch (the requests' rows side by side in staging memory, a dense
    TensorDict of batch size ``[n]``) is what it would build: batchserve's
    :func:`default_collate`, ``tensordict.lazy_stack``,
    ``tensordict.maybe_dense_stack`` (what torchrl's ``AsyncBatchedCollector``
    passes), ``torch.stack``, ``TensorDict.stack`` and
    ``LazyStackedTensorDict.lazy_stack``, and torchrl's own stacking collates
    (its default among them), as torchrl's server lists them."""
    if collate_fn in _STACKING:
        return True
    method = getattr(collate_fn, "__func__", None)  # a classmethod, bound to any subclass
    if method is not None and method in _STACKING_METHODS:
        return True
    torchrl_server = sys.modules.get("torchrl.modules.inference_server._server")
    return collate_fn in getattr(torchrl_server, "_STACKING_COLLATE_FNS", ())


_STACKING = (default_collate, lazy_stack, maybe_dense_stack, torch.stack)
_STACKING_METHODS = (TensorDictBase.stack.__func__, LazyStackedTensorDict.lazy_stack.__func__)


def _mode(code: int):
    """The ``set_interaction_type`` context of a stamped code."""
    if code == _NO_INTERACTION_TYPE:
        return set_interaction_type(None)
    return set_interaction_type(_INTERACTION_TYPES[code])


def interaction_context(batch: TensorDictBase):
    """The exploration-mode context a batch asks for, and the batch without its stamp."""
    if not isinstance(batch, TensorDictBase):
        return contextlib.nullcontext(), batch
    code = batch.get(INTERACTION_TYPE_KEY, default=None)
    if code is None:
        return contextlib.nullcontext(), batch
    flat = code.reshape(-1) if isinstance(code, torch.Tensor) else torch.tensor([int(code)])
    batch = batch.exclude(INTERACTION_TYPE_KEY, inplace=False)
    if flat.numel() == 0:
        return set_interaction_type(None), batch
    value = int(flat[0].item())
    if not bool(flat.eq(value).all()):
        raise RuntimeError(
            "InferenceServer received a batch mixing interaction types. "
            "Use homogeneous requests or a smaller max_batch_size."
        )
    return _mode(value), batch


def forward_by_interaction(model, batch: TensorDictBase, codes: int | torch.Tensor | None):
    """``model(batch)`` under the interaction types the rows are stamped with.

    ``codes`` is the code every row is stamped with (an int: the common
    case, one forward under its mode), each row's stamped code when they
    differ (a CPU tensor of shape ``[n]``, as
    ``StagingBuffer.interaction_codes`` reads them: one forward per code over
    its rows, the outputs put back in row order, pytorch/rl #4312), or None
    for unstamped rows (the forward then runs under the ambient mode).
    Returns the output and the number of rows of each forward.
    """
    n = batch.batch_size[0]
    if codes is None:
        return model(batch), [n]
    if type(codes) is int:
        with _mode(codes):
            return model(batch), [n]
    outputs, indices = [], []
    for code in codes.unique().tolist():
        rows = codes.eq(code).nonzero().squeeze(1)
        with _mode(code):
            output = model(batch[rows.to(batch.device)] if batch.device is not None
                           else batch[rows])
        if not isinstance(output, TensorDictBase) or output.batch_size[:1] != rows.shape:
            return output, [n]  # the caller's output check names the fault
        outputs.append(output)
        indices.append(rows)
    order = torch.cat(indices)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return torch.cat(outputs)[inverse.to(outputs[0].device)], [len(i) for i in indices]


def _carries_stamp(item) -> bool:
    # A plain TensorDict's leaf dict is read directly: ``key in td.keys()``
    # costs as much per request as the stack itself.
    if type(item) is TensorDict:
        return INTERACTION_TYPE_KEY in item._tensordict
    return isinstance(item, TensorDictBase) and INTERACTION_TYPE_KEY in item.keys()


def _stamped_code(item) -> int | None:
    """The code ``item`` is stamped with; None if its rows disagree."""
    code = item.get(INTERACTION_TYPE_KEY)
    if not isinstance(code, torch.Tensor):
        return int(code)
    flat = code.reshape(-1)
    if flat.numel() == 0:
        return _NO_INTERACTION_TYPE
    value = int(flat[0].item())
    if flat.numel() > 1 and not bool(flat.eq(value).all()):
        return None
    return value


def interaction_groups(items: list):
    """How a batch splits by interaction type: None when every request asks
    for the same one (one forward: the common case, no request stamped),
    else ``(groups, mixed)``: the index lists of the requests sharing a mode
    (unstamped requests form their own group), in order of first
    appearance, and the indices of requests whose own rows mix modes (they
    cannot be served as asked)."""
    stamped = [i for i, item in enumerate(items) if _carries_stamp(item)]
    if not stamped:
        return None
    codes: list = [_NO_STAMP] * len(items)
    for i in stamped:
        codes[i] = _stamped_code(items[i])
    first = codes[0]
    if first is not None and all(code == first for code in codes):
        return None
    groups: dict = {}
    mixed = []
    for i, code in enumerate(codes):
        if code is None:
            mixed.append(i)
        else:
            groups.setdefault(code, []).append(i)
    return list(groups.values()), mixed


# Unstamped requests' group: distinct from every code, including the sentinel.
_NO_STAMP = "unstamped"

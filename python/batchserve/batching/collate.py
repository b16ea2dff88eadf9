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

import torch
from tensordict import TensorDict, lazy_stack
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
    if value == _NO_INTERACTION_TYPE:
        return set_interaction_type(None), batch
    return set_interaction_type(_INTERACTION_TYPES[value]), batch


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

"""Turning a list of requests into the model's batch (the general path)."""

from __future__ import annotations

import contextlib

import torch
from tensordict import lazy_stack
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

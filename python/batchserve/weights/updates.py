"""Which tensors make up a model's weights, and checking new weights against
them in full before any is copied in, so a bad update changes nothing.

Used by ``InferenceServer.update_weights`` and by the shared-memory weight
banks (``weights/shared_memory.py``). A model's weights are what its ``state_dict``
holds: each parameter once (tied parameters under their first name) and the
persistent buffers. Weights may also come as ``TensorDict.from_module`` or a
``state_dict``, which carry a tied parameter under each of its names and
(``from_module``) the non-persistent buffers: those extra names are accepted
and skipped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict.base import TensorDictBase


def flat_weights(weights, who: str = "update_weights") -> dict[str, torch.Tensor]:
    """``weights`` as {dotted name: value}: a TensorDict of parameters (as
    from ``TensorDict.from_module``) or a ``state_dict``."""
    if isinstance(weights, TensorDictBase):
        return dict(weights.flatten_keys(".").items())
    if isinstance(weights, Mapping):
        return dict(weights)
    raise TypeError(
        f"{who} takes a TensorDict of parameters (TensorDict.from_module) "
        f"or a state_dict; got {type(weights).__name__}."
    )


def model_weights(model, who: str = "update_weights") -> tuple[dict[str, torch.Tensor], set[str]]:
    """The tensors of ``model`` that weights must carry, by dotted name, and
    the other names weights may carry for it (skipped): a tied parameter's
    further names, non-persistent buffers."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"{who} needs the served model to be an nn.Module; it is a "
            f"{type(model).__name__} (use update_model to change it)."
        )
    required: dict[str, torch.Tensor] = {}
    skipped: set[str] = set()
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            skipped.add(name)
        else:
            required[name] = p
        seen.add(id(p))
    non_persistent = {
        f"{prefix}.{b}" if prefix else b
        for prefix, module in model.named_modules(remove_duplicate=False)
        for b in module._non_persistent_buffers_set
    }
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in non_persistent or id(b) in seen:
            skipped.add(name)
        else:
            required[name] = b
        seen.add(id(b))
    return required, skipped


def _same_values(t) -> tuple:
    """What two names of one tensor share: a state_dict detaches each entry
    into a new tensor object, but over the same memory."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.layout != torch.strided or t.is_meta:
        return ("object", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype,
            tuple(t.shape), tuple(t.stride()))


def without_aliases(tensors: dict) -> dict[str, torch.Tensor]:
    """``tensors`` with each tensor under its first name only (a state_dict
    or ``from_module`` of a model with tied parameters has it under each)."""
    out, seen = {}, set()
    for name, value in tensors.items():
        key = _same_values(value)
        if key not in seen:
            out[name] = value
            seen.add(key)
    return out


def check_weights(
    required: dict,
    given: dict,
    skipped: set = frozenset(),
    who: str = "update_weights",
    outcome: str = "The served model is unchanged.",
) -> None:
    """Raises ValueError naming the parameters of ``given`` that do not fit
    ``required`` (missing, unexpected other than ``skipped`` names or
    aliases, or of another shape or dtype, or no plain tensor), as
    ``"{who}: ... {outcome}"``."""
    missing = [k for k in required if k not in given]
    distinct = without_aliases(given)
    unexpected = [k for k in given if k not in required and k not in skipped and k in distinct]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if unexpected:
            parts.append(f"unexpected {', '.join(map(repr, unexpected))}")
        raise ValueError(f"{who}: {'; '.join(parts)}. {outcome}")
    for name, current in required.items():
        value = given[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{who}: {name!r} is a {type(value).__name__}, not a tensor. {outcome}"
            )
        if value.is_meta or value.layout != torch.strided:
            kind = "a meta tensor" if value.is_meta else f"a {value.layout} tensor"
            raise ValueError(f"{who}: {name!r} is {kind}, which holds no dense values. {outcome}")
        if value.shape != current.shape or value.dtype != current.dtype:
            raise ValueError(
                f"{who}: {name!r} is {value.dtype} {list(value.shape)}; expected "
                f"{current.dtype} {list(current.shape)}. {outcome}"
            )


@torch.no_grad()
def copy_weights(required: dict, given: dict) -> None:
    """Copies each given tensor into the served one, in place."""
    for name, current in required.items():
        current.copy_(given[name], non_blocking=False)

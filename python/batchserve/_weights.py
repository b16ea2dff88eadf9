"""Weights handed to a running server (``InferenceServer.update_weights``):
checked against the served model in full before any is copied in, so a bad
update leaves the model as it was."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict.base import TensorDictBase


def flat_weights(weights) -> dict[str, torch.Tensor]:
    """``weights`` as {dotted name: tensor}: a TensorDict of parameters (as
    from ``TensorDict.from_module``) or a ``state_dict``."""
    if isinstance(weights, TensorDictBase):
        return dict(weights.flatten_keys(".").items())
    if isinstance(weights, Mapping):
        return dict(weights)
    raise TypeError(
        "update_weights takes a TensorDict of parameters (TensorDict.from_module) "
        f"or a state_dict; got {type(weights).__name__}."
    )


def served_tensors(model, weights) -> dict[str, torch.Tensor]:
    """The model's tensors that ``weights`` must match, by dotted name: every
    parameter and buffer for a TensorDict (``from_module`` has them all), the
    ``state_dict`` entries for a mapping."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"update_weights needs the served model to be an nn.Module; it is a "
            f"{type(model).__name__} (use update_model to change it)."
        )
    if isinstance(weights, TensorDictBase):
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return model.state_dict(keep_vars=True)


def check_weights(
    served: dict,
    given: dict,
    who: str = "update_weights",
    outcome: str = "The served model is unchanged.",
) -> None:
    """Raises ValueError naming the first parameters that do not fit, as
    ``"{who}: ... {outcome}"``."""
    missing = [k for k in served if k not in given]
    unexpected = [k for k in given if k not in served]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if unexpected:
            parts.append(f"unexpected {', '.join(map(repr, unexpected))}")
        raise ValueError(f"{who}: {'; '.join(parts)}. {outcome}")
    for name, current in served.items():
        value = given[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{who}: {name!r} is a {type(value).__name__}, not a tensor. {outcome}"
            )
        if value.shape != current.shape or value.dtype != current.dtype:
            raise ValueError(
                f"{who}: {name!r} is {value.dtype} {list(value.shape)}; expected "
                f"{current.dtype} {list(current.shape)}. {outcome}"
            )


@torch.no_grad()
def copy_weights(served: dict, given: dict) -> None:
    """Copies each given tensor into the served one, in place."""
    for name, current in served.items():
        current.copy_(given[name], non_blocking=False)

"""Server settings: :class:`ServerSettings` parses and checks what
:class:`~batchserve.InferenceServer` is given (its keyword arguments, or
torchrl's ``InferenceServerConfig`` / ``InferenceDeviceConfig`` in their
place). Transport selectors are resolved by
``batchserve.server.deployment``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Keyword arguments that torchrl's InferenceServerConfig carries instead.
_SERVER_CONFIG_KEYS = (
    "max_batch_size",
    "min_batch_size",
    "timeout",
    "collect_stats",
    "stats_window_size",
)


def positive_int(name: str, value) -> int:
    """``value`` as an int, at least 1 (ValueError naming ``name`` otherwise)."""
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be at least 1.")
    return value


def seconds(name: str, value) -> float:
    """``value`` as a non-negative float (ValueError naming ``name`` otherwise)."""
    value = float(value)
    if not value >= 0:
        raise ValueError(f"{name} must be a non-negative number of seconds.")
    return value


def nice_value(name: str, value) -> int | None:
    """``value`` as a Linux nice value (-20 to 19), or None (TypeError or
    ValueError naming ``name`` otherwise; ValueError off Linux, where a
    thread has no nice value of its own)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (a nice value) or None; got {value!r}.")
    if not -20 <= value <= 19:
        raise ValueError(f"{name} must be a nice value from -20 to 19; got {value}.")
    if not sys.platform.startswith("linux"):
        raise ValueError(f"{name} is supported on Linux only (a nice value per thread).")
    return value


def set_thread_nice(value: int) -> None:
    """Sets the calling thread's own nice value (Linux: a thread id names
    one thread). Raises what ``os.setpriority`` raises (PermissionError
    below the process's value without CAP_SYS_NICE or RLIMIT_NICE)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)


def as_device(device) -> torch.device | None:
    return torch.device(device) if device is not None else None


class BatchingSetting:
    """A batching setting of a server (``max_batch_size``, ...): checked by
    ``check`` when set, then applied to its batch source at once, even to a
    server asleep waiting for requests. The value lives in the server's
    ``_<name>``; the server's ``_configure_batches()`` applies all three."""

    def __init__(self, check: Callable[[str, Any], Any]):
        self._check = check

    def __set_name__(self, owner, name: str) -> None:
        self._name, self._attr = name, "_" + name

    def __get__(self, server, owner=None):
        return self if server is None else getattr(server, self._attr)

    def __set__(self, server, value) -> None:
        value = self._check(self._name, value)
        validate = getattr(server, "_validate_batching", None)  # the server's own rules
        if validate is not None:
            validate(self._name, value)
        setattr(server, self._attr, value)
        server._configure_batches()


@dataclass(frozen=True)
class ServerSettings:
    """The settings of one server, checked (see ``InferenceServer`` for what
    each means). The batching ones may change while the server runs; the
    server keeps its current values, this is what it starts with."""

    max_batch_size: int = 64
    min_batch_size: int = 1
    timeout: float = 0.01
    collect_stats: bool = True
    stats_window_size: int = 1024
    device: torch.device | None = None
    output_device: torch.device | None = None

    @classmethod
    def parse(
        cls,
        *,
        max_batch_size=None,
        min_batch_size=None,
        timeout=None,
        collect_stats=None,
        stats_window_size=None,
        device=None,
        policy_device=None,
        output_device=None,
        server_config=None,
        device_config=None,
    ) -> ServerSettings:
        """The settings from ``InferenceServer``'s keyword arguments (None:
        the default), or from torchrl's config objects (or objects with the
        same attributes), which are exclusive with the matching keywords.

        Raises:
            ValueError: a config object next to a matching keyword, ``device``
                and ``policy_device`` that disagree, a ``storing_device``, or
                a batching setting out of range.
        """
        batching = {
            "max_batch_size": max_batch_size,
            "min_batch_size": min_batch_size,
            "timeout": timeout,
            "collect_stats": collect_stats,
            "stats_window_size": stats_window_size,
        }
        if server_config is not None:
            given = [k for k, v in batching.items() if v is not None]
            if given:
                raise ValueError(
                    "server_config is mutually exclusive with the "
                    f"{', '.join(given)} keyword argument(s)."
                )
            batching = {key: getattr(server_config, key, None) for key in _SERVER_CONFIG_KEYS}
        policy_device, output_device = cls._devices(
            device, policy_device, output_device, device_config
        )
        defaults = cls()
        return cls(
            max_batch_size=defaults.max_batch_size
            if batching["max_batch_size"] is None
            else positive_int("max_batch_size", batching["max_batch_size"]),
            min_batch_size=defaults.min_batch_size
            if batching["min_batch_size"] is None
            else positive_int("min_batch_size", batching["min_batch_size"]),
            timeout=defaults.timeout
            if batching["timeout"] is None
            else seconds("timeout", batching["timeout"]),
            collect_stats=defaults.collect_stats
            if batching["collect_stats"] is None
            else bool(batching["collect_stats"]),
            stats_window_size=defaults.stats_window_size
            if batching["stats_window_size"] is None
            else batching["stats_window_size"],
            device=as_device(policy_device),
            output_device=as_device(output_device),
        )

    @staticmethod
    def _devices(device, policy_device, output_device, device_config):
        """The policy and output devices from the keywords or ``device_config``."""
        if (
            device is not None
            and policy_device is not None
            and torch.device(device) != torch.device(policy_device)
        ):
            raise ValueError("device and policy_device disagree; pass one of them.")
        policy_device = policy_device if policy_device is not None else device
        if device_config is None:
            return policy_device, output_device
        if policy_device is not None or output_device is not None:
            raise ValueError(
                "device_config is mutually exclusive with device, policy_device and output_device."
            )
        if getattr(device_config, "storing_device", None) is not None:
            raise ValueError(
                "storing_device is a collector-level setting; the server does not use it."
            )
        server_output = getattr(device_config, "server_output_device", None)
        output_device = (
            server_output()
            if callable(server_output)
            else getattr(device_config, "output_device", None)
        )
        return getattr(device_config, "policy_device", None), output_device

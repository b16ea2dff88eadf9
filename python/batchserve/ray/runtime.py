"""The Ray runtime batchserve's Ray parts share: importing Ray, and the
lease that starts the runtime when none runs and shuts it down when its last
user lets it go (a runtime the caller started is never shut down).

torchrl's ``_RayRuntimeLease`` semantics, for :class:`~batchserve.RayTransport`,
:class:`~batchserve.RayInferenceServer` and :func:`~batchserve.serve_on_ray`.
"""

from __future__ import annotations

import threading
from typing import Any


def ray_module():
    """``import ray``, with an error that says how to install it."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - exercised without ray
        raise ImportError(
            "batchserve's Ray support needs Ray: pip install \"batchserve[ray]\""
        ) from exc
    return ray


class RayRuntimeLease:
    """A hold on this process's Ray runtime.

    :meth:`acquire` starts Ray (``ray.init(**ray_init_config)``) when it is
    not running; the runtime so started is shut down when the last lease is
    released. A runtime that was running already (the caller's) stays up.

    A ``ray_init_config`` cannot configure a runtime that runs already, so
    it is refused then, unless a lease started the runtime with the same
    configuration.
    """

    _lock = threading.RLock()
    _leases = 0
    _owns_runtime = False
    _init_config: dict | None = None  # the configuration a lease started Ray with

    def __init__(self) -> None:
        self._released = False

    @classmethod
    def acquire(cls, ray_init_config: dict[str, Any] | None = None) -> RayRuntimeLease:
        ray = ray_module()
        config = dict(ray_init_config or {})
        with cls._lock:
            if not ray.is_initialized():
                ray.init(**config)
                cls._owns_runtime, cls._init_config = True, config
            elif config and not (cls._owns_runtime and cls._init_config == config):
                raise ValueError(
                    f"ray_init_config={config!r} cannot apply: Ray is running already in "
                    "this process (pass these options to your ray.init(), or leave "
                    "ray_init_config out)."
                )
            cls._leases += 1
        return cls()

    def release(self) -> None:
        """Lets the runtime go; the last lease shuts down a runtime a lease
        started. Idempotent."""
        cls = type(self)
        with cls._lock:
            if self._released:
                return
            self._released = True
            cls._leases -= 1
            if cls._leases == 0 and cls._owns_runtime:
                ray = ray_module()
                if ray.is_initialized():
                    ray.shutdown()
                cls._owns_runtime, cls._init_config = False, None

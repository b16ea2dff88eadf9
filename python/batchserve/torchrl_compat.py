"""batchserve's transports as torchrl ``InferenceTransport``s.

torchrl accepts a transport where ``isinstance(transport,
torchrl.modules.inference_server._transport.InferenceTransport)`` holds (its
``InferenceServer``, ``ProcessInferenceServer``, ``_RayInferenceServerActor``,
``PolicyClientModule`` and ``AsyncBatchedCollector``). That class is an
:class:`abc.ABC`, so :func:`register_with_torchrl` registers
:class:`batchserve.InferenceTransport` as a virtual subclass of it: every
batchserve transport (``ThreadingTransport``, ``SharedMemoryTransport``,
``RayTransport``, ...) then passes those checks.

Importing torchrl costs about 0.7 s on top of ``import batchserve`` (measured
with ``python -X importtime``), so batchserve does not import it.
:func:`install` (run by ``import batchserve``) registers at once when torchrl's
transport module is already imported, and otherwise adds an import hook that
registers the moment that module is first imported, before any torchrl code
can check a transport. A process that never imports torchrl pays nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading

_TORCHRL_TRANSPORT_MODULE = "torchrl.modules.inference_server._transport"
_registered = False
_lock = threading.Lock()


def register_with_torchrl(module=None) -> bool:
    """Registers :class:`batchserve.InferenceTransport` with torchrl's ABC.

    Args:
        module (module, optional): torchrl's transport module; imported when
            not given.

    Returns:
        whether torchrl is available (and the registration done).
    """
    global _registered
    with _lock:
        if _registered:
            return True
        if module is None:
            try:
                import torchrl.modules.inference_server._transport as module
            except ImportError:
                return False
        from batchserve.transports.base import InferenceTransport

        module.InferenceTransport.register(InferenceTransport)
        _registered = True
        return True


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then registers batchserve's transports."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register_with_torchrl(module)


class _TorchrlTransportHook(importlib.abc.MetaPathFinder):
    """Finds torchrl's transport module through the other finders and wraps
    its loader so that importing it registers batchserve's transports."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TORCHRL_TRANSPORT_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Makes batchserve's transports torchrl ``InferenceTransport``s, now if
    torchrl's transport module is imported, else when it is (see the module
    docstring)."""
    module = sys.modules.get(_TORCHRL_TRANSPORT_MODULE)
    if module is not None:
        register_with_torchrl(module)
        return
    if not any(isinstance(finder, _TorchrlTransportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchrlTransportHook())
    # Another thread may have imported it before the hook went in.
    module = sys.modules.get(_TORCHRL_TRANSPORT_MODULE)
    if module is not None and hasattr(module, "InferenceTransport"):
        register_with_torchrl(module)

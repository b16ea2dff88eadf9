"""batchserve: an auto-batching inference server for RL actors.

A drop-in for ``torchrl.modules.inference_server``: swap the import and keep
the code. The request queue, the batching policy and the hand-back of results
run in a C++ core (``batchserve._core``) with the GIL released.

>>> from batchserve import InferenceServer, ThreadingTransport

Names of torchrl's ``inference_server`` module that batchserve does not
implement itself (``MPTransport``, ``PolicyClientModule``, the config
classes, ...) resolve to torchrl's own objects when torchrl is installed; its
transports run under :class:`batchserve.InferenceServer`.
"""

from batchserve._core import QueueFull, ServerClosedError
from batchserve.ray.service import RayInferenceServer, RayServer, serve_on_ray
from batchserve.ray.transport import RayClient, RayTransport
from batchserve.server.process import ProcessInferenceServer
from batchserve.server.server import InferenceServer
from batchserve.torchrl_compat import install as _install_torchrl_compat
from batchserve.transports.base import InferenceClient, InferenceTransport
from batchserve.transports.shared_memory import SharedMemoryClient, SharedMemoryTransport
from batchserve.transports.threading import ThreadingTransport
from batchserve.weights.shared_memory import SharedMemoryWeightReceiver, WeightPublisher

_install_torchrl_compat()

__version__ = "0.1.0"

__all__ = [
    "InferenceClient",
    "InferenceServer",
    "InferenceTransport",
    "ProcessInferenceServer",
    "QueueFull",
    "RayClient",
    "RayInferenceServer",
    "RayServer",
    "RayTransport",
    "ServerClosedError",
    "SharedMemoryClient",
    "SharedMemoryTransport",
    "SharedMemoryWeightReceiver",
    "ThreadingTransport",
    "WeightPublisher",
    "serve_on_ray",
]


def __getattr__(name: str):
    if name == "AsyncBatchedCollector":  # imports torchrl: only on demand
        from batchserve.collector import AsyncBatchedCollector

        return AsyncBatchedCollector
    # torchrl's inference-server names that batchserve does not reimplement.
    if not name.startswith("_"):
        try:
            import torchrl.modules.inference_server as torchrl_inference_server
        except ImportError:
            torchrl_inference_server = None
        if torchrl_inference_server is not None and name in getattr(
            torchrl_inference_server, "__all__", ()
        ):
            return getattr(torchrl_inference_server, name)
    raise AttributeError(f"module 'batchserve' has no attribute {name!r}")

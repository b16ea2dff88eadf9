"""Static batch sizes: the policy replayed as CUDA graphs of fixed batch sizes.

torchrl 0.14.1's ``static_batch_size`` captures the policy once, with
``tensordict.nn.CudaGraphModule``, at one fixed leading batch size; a batch
of n requests is padded to it by repeating its last request, and the first n
rows of the output are handed back. batchserve takes that, or a set of sizes
(buckets, e.g. ``(8, 16, 32, 64)``; pytorch/rl #4110): a batch is padded to
the smallest bucket that holds it, so 3 requests do not pay a forward of 64.
Every bucket is captured and warmed up before the server starts serving
(triton-inference-server #7776: the first requests must not pay a capture),
and ``stats()`` reports the padding (rows computed for nothing).

A graph replays its kernels on the storage it captured: the weights must be
updated in place (``update_weights`` and torchrl's schemes copy in place). An
update that replaced a parameter's or buffer's storage drops the graphs, so
the server goes on with eager forwards, and raises as torchrl does.

Requests must carry the interaction type the graphs were captured under
(tensordict's ``set_interaction_type``; a sampling policy's graph samples in
one mode): a batch under another raises, as in torchrl.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from tensordict.base import TensorDictBase
from tensordict.nn.probabilistic import InteractionType, interaction_type, set_interaction_type

# CudaGraphModule's warm-up calls before it captures (torchrl's value).
WARMUP = 2

STORAGE_REPLACED = (
    "A model update replaced parameter or buffer storage used by the CUDA graph. "
    "CUDA-graphed inference only supports in-place weight updates; the server has "
    "fallen back to eager inference."
)
OTHER_INTERACTION = (
    "CUDA-graphed inference requires the interaction type used during capture."
)


def static_batch_sizes(value, max_batch_size: int) -> tuple[int, ...] | None:
    """``static_batch_size`` as the sorted bucket sizes (None: not static).

    An int is torchrl's single size; a sequence of ints is a set of buckets.
    torchrl's checks: an integer (not a bool), at least ``max_batch_size``
    (for buckets: the largest; a batch never exceeds it).

    Raises:
        TypeError: not an int, nor a non-empty sequence of ints.
        ValueError: a size below 1, or the largest below max_batch_size.
    """
    if value is None:
        return None
    single = not isinstance(value, (list, tuple))
    sizes = [value] if single else list(value)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) for s in sizes):
        raise TypeError("static_batch_size must be an integer or None.")
    if min(sizes) < 1:
        raise ValueError(f"static_batch_size: batch sizes must be positive, got {value}.")
    if max(sizes) < max_batch_size:
        raise ValueError(
            "static_batch_size must be at least max_batch_size, got "
            f"{max(sizes)} and {max_batch_size}."
        )
    return tuple(sorted(set(sizes)))


def require_cuda(device: torch.device | None) -> None:
    """torchrl's rule: CUDA graphs need an explicit CUDA policy device."""
    if device is None or device.type != "cuda":
        raise ValueError("static_batch_size requires an explicit CUDA policy_device.")


def check_static_batch_size(value, max_batch_size: int, device: torch.device | None):
    """torchrl's checks of ``static_batch_size`` against the server's
    settings (see :func:`static_batch_sizes` and :func:`require_cuda`):
    the bucket sizes, or None when it is not set."""
    sizes = static_batch_sizes(value, max_batch_size)
    if sizes is not None:
        require_cuda(device)
    return sizes


def pad_rows(batch: TensorDictBase, n: int, size: int) -> TensorDictBase:
    """``batch``'s first n rows, then its row n-1 repeated up to ``size``
    rows (torchrl's padding: an index gather, which keeps non-tensor leaves
    consistent where concatenating an expanded tail would not)."""
    if size == n and batch.batch_size[0] == n:
        return batch
    index = torch.arange(size, device=batch.device).clamp_max_(n - 1)
    return batch[index]


def model_tensors(model) -> tuple | None:
    """The model's (name, parameter or buffer) pairs (None for a model that
    is not an nn.Module): what a captured graph reads."""
    if not isinstance(model, torch.nn.Module):
        return None
    return tuple((*model.named_parameters(), *model.named_buffers()))


def storage_signature(tensors) -> tuple | None:
    """Where each of ``tensors`` (model_tensors') lives."""
    if tensors is None:
        return None
    return tuple(
        (name, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(),
         t.dtype, t.device)
        for name, t in tensors
    )


def capture_cuda_graph(model, device: torch.device) -> Callable:
    """One bucket's graph: tensordict's CudaGraphModule around the model
    (eager for its first calls; tensordict 0.14 captures on call WARMUP and
    replays from the next)."""
    from tensordict.nn import CudaGraphModule

    return CudaGraphModule(model, warmup=WARMUP, device=device)


class StaticBatches:
    """The captured graphs of one server, one per bucket size, used as the
    model: called on a batch of n rows, it pads to the smallest bucket
    holding n, replays that bucket's graph and returns the first n rows of
    its output (cloned: the graph's output storage is overwritten by its next
    replay).

    Args:
        model: the policy (a TensorDict module).
        sizes: the bucket sizes (``static_batch_sizes``).
        device: the CUDA device the policy runs on.
        capture: ``capture(model, device)`` returns a bucket's callable;
            None: :func:`capture_cuda_graph` (tests pass an eager one).
        record_padding: called with (rows, bucket size) per forward
            (``ServerStats.record_padding``).
    """

    def __init__(self, model, sizes: Sequence[int], device, *,
                 capture: Callable | None = None,
                 record_padding: Callable[[int, int], None] | None = None):
        self.model = model
        self.sizes = tuple(sorted(sizes))
        self.device = torch.device(device)
        self._capture = capture
        self._record_padding = record_padding
        self._graphs: dict[int, Callable] = {}
        self._mode: InteractionType | None = None
        self._in_keys: frozenset | None = None
        # The tensors the graphs read, held (their storage cannot be reused
        # while the graphs live), and where they were at capture.
        self._captured = None
        self._signature = None

    @property
    def captured(self) -> bool:
        """Whether the graphs are ready (prepare() ran; no update dropped them)."""
        return bool(self._graphs)

    def bucket(self, n: int) -> int:
        """The smallest bucket holding n rows."""
        for size in self.sizes:
            if size >= n:
                return size
        raise RuntimeError(f"Received {n} requests for static_batch_size={self.sizes[-1]}.")

    @torch.no_grad()
    def prepare(self, request_spec: TensorDictBase,
                mode: InteractionType | None = None) -> None:
        """Captures and warms up every bucket on ``request_spec`` (one
        unbatched request, padded to each size) under ``mode`` (None: the
        interaction type in force now)."""
        mode = interaction_type() if mode is None else InteractionType(mode)
        request = request_spec.to(self.device).unsqueeze(0)
        graphs = {}
        with set_interaction_type(mode) if mode is not None else contextlib.nullcontext():
            for size in self.sizes:
                graph = (self._capture or capture_cuda_graph)(self.model, self.device)
                batch = pad_rows(request, 1, size)
                # Eager warm-up, the capture (tensordict 0.14 captures on
                # call WARMUP), then one replay: no request pays for either.
                for _ in range(WARMUP + 1):
                    graph(batch.clone())
                graphs[size] = graph
        self._graphs = graphs
        self._mode = mode
        in_keys = getattr(self.model, "in_keys", None)
        self._in_keys = frozenset(
            in_keys if in_keys is not None
            else request.keys(include_nested=True, leaves_only=True))
        self._captured = model_tensors(self.model)
        self._signature = storage_signature(self._captured)

    def drop(self) -> None:
        self._graphs = {}
        self._captured = None

    def check_storage(self) -> None:
        """After a weight update, under the server's model lock (no forward
        may replay in between): raises, and drops the graphs, when the
        tensors they captured moved (``set_``) or the model holds others
        (a parameter replaced, ``load_state_dict(assign=True)``)."""
        if not self._graphs:
            return
        if (storage_signature(self._captured) != self._signature
                or storage_signature(model_tensors(self.model)) != self._signature):
            self.drop()
            raise RuntimeError(STORAGE_REPLACED)

    def __call__(self, batch: TensorDictBase) -> TensorDictBase:
        n = batch.batch_size[0]
        mode = interaction_type()
        if mode != self._mode:
            raise RuntimeError(OTHER_INTERACTION)
        if self._in_keys is not None:  # checked on the first batch, as torchrl does
            missing = self._in_keys - set(batch.keys(include_nested=True, leaves_only=True))
            if missing:
                raise RuntimeError(
                    "The first CUDA-graph request does not match request_spec; missing "
                    f"policy input keys {sorted(map(str, missing))!r}."
                )
            self._in_keys = None
        size = self.bucket(n)
        graphs = self._graphs
        output = graphs[size](pad_rows(batch.to(self.device), n, size))
        if self._record_padding is not None:
            self._record_padding(n, size)
        return output[:n].clone()


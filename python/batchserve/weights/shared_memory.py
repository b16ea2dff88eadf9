"""Weights from a trainer process to a server process through shared memory.

The trainer publishes with :class:`WeightPublisher`; the server takes them
with a :class:`SharedMemoryWeightReceiver` passed as ``weight_sync=``. Both
name the same segment, whose three banks and one state word are
``csrc/weight_banks.h``: the trainer writes the next version into a bank that
nobody reads and publishes it with one atomic swap, so it never waits for the
server; between batches the server takes the newest complete version, never a
half-written one, and stamps results with its version. A CPU model is served
from the bank it took (no copy); a CUDA model gets a side-stream copy.

Either side may start first. The segment lives while either holds it.
"""

from __future__ import annotations

import weakref

import torch

from batchserve import _core
from batchserve.weights.updates import check_weights, flat_weights, model_weights, without_aliases

_ALIGN = 64  # bytes between tensors in a bank


def _weights_of(source, who: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A module's, TensorDict's or state_dict's tensors by dotted name (each
    tensor once), and the names to skip (see ``weights.updates.model_weights``)."""
    if isinstance(source, torch.nn.Module):
        return model_weights(source, who)
    tensors = flat_weights(source, who)
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{who}: {name!r} is a {type(value).__name__}, not a tensor")
    return without_aliases(tensors), set()


class _BankLayout:
    """Where each tensor lives in a bank: names in sorted order (so that a
    module and its state_dict agree), 64-byte aligned. Its text is the
    segment's fingerprint, and what a mismatch is explained from."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.entries = []  # (name, dtype, shape, offset, nbytes)
        offset = 0
        for name in sorted(tensors):
            t = tensors[name]
            nbytes = t.numel() * t.element_size()
            self.entries.append((name, t.dtype, tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.bank_bytes = max(offset, _ALIGN)
        self.text = "".join(
            f"{name}\t{str(dtype).removeprefix('torch.')}\t{list(shape)}\t{off}\t{n}\n"
            for name, dtype, shape, off, n in self.entries
        )

    def views(self, banks, bank: int) -> dict[str, torch.Tensor]:
        """Tensors over bank `bank` of the mapped segment."""
        segment = torch.frombuffer(banks, dtype=torch.uint8)
        base = banks.bank_offset(bank)
        return {
            name: segment[base + off : base + off + n].view(dtype).view(shape)
            for name, dtype, shape, off, n in self.entries
        }

    def explain_mismatch(self, other_text: str, ours: str, theirs: str) -> str:
        """What differs between this layout and `other_text`, parameter by parameter."""
        mine = {line.split("\t")[0]: line.split("\t")[1:3] for line in self.text.splitlines()}
        other = {line.split("\t")[0]: line.split("\t")[1:3] for line in other_text.splitlines()}
        only_mine = [n for n in mine if n not in other]
        only_other = [n for n in other if n not in mine]
        parts = []
        if only_other:
            parts.append(f"{', '.join(map(repr, only_other))} only in {theirs}")
        if only_mine:
            parts.append(f"{', '.join(map(repr, only_mine))} only in {ours}")
        for name in mine:
            if name in other and mine[name] != other[name]:
                parts.append(
                    f"{name!r} is {' '.join(other[name])} in {theirs} and "
                    f"{' '.join(mine[name])} in {ours}"
                )
        return "; ".join(parts)


def _open_banks(name: str, layout: _BankLayout, role, timeout: float, ours: str, theirs: str):
    try:
        return _core.WeightBanks.open(name, layout.text, layout.bank_bytes, role, timeout)
    except _core.WeightLayoutMismatch as exc:
        raise ValueError(
            f"weights {name!r} are shared with another layout: "
            f"{layout.explain_mismatch(exc.args[1], ours, theirs)}."
        ) from None


class WeightPublisher:
    """The trainer's end: publishes weights to servers' receivers by name.

    ``publish()`` copies the weights into a bank of the shared segment that
    no server reads and makes it the newest with one atomic swap: it never
    waits for a server, and a trainer killed mid-copy leaves the previous
    version in service. A server started later gets the newest version
    before its first batch.

    Args:
        name (str): the segment's name, shared with the server's
            :class:`SharedMemoryWeightReceiver`.
        weights: an ``nn.Module`` (its parameters and buffers), a TensorDict
            of them (``TensorDict.from_module``) or a ``state_dict``: what
            ``publish()`` publishes by default, and the layout (names,
            shapes, dtypes) every publication must have.

    Keyword Args:
        timeout (float, optional): seconds to wait for a segment that another
            process is creating. Default: ``5.0``.

    Raises:
        ValueError: the server's model has another layout (the message
            names the parameter).
        RuntimeError: another live process publishes under ``name``.

    Examples:
        >>> publisher = WeightPublisher("policy-weights", policy)
        >>> for step in range(steps):
        ...     train_step(policy)
        ...     publisher.publish()           # the module's current weights
    """

    def __init__(self, name: str, weights, *, timeout: float = 5.0):
        self.name = name
        self._source = weights
        tensors, self._skipped = _weights_of(weights, "WeightPublisher")
        self._layout = _BankLayout(tensors)
        self._banks = _open_banks(
            name, self._layout, _core.WeightRole.publisher, timeout,
            ours="the publisher's weights", theirs="the server's model",
        )
        # At interpreter exit too: the last holder removes the segment.
        self._release = weakref.finalize(self, self._banks.release)
        self._views = [self._layout.views(self._banks, b) for b in range(3)]

    def _open_banks(self):
        if self._banks is None:
            raise RuntimeError(f"WeightPublisher {self.name!r} is closed")
        return self._banks

    @property
    def version(self) -> int | None:
        """The version last published under this name (by any publisher),
        or ``None`` before the first."""
        banks = self._open_banks()
        return banks.last_version if banks.published else None

    @torch.no_grad()
    def publish(self, weights=None, *, version: int | None = None) -> int:
        """Publish weights; returns their version. Never waits for a server.

        Args:
            weights: a module, TensorDict or ``state_dict`` of the layout
                given at construction; ``None`` publishes the object given
                then, as it is now.
            version (int, optional, keyword-only): the version the server
                stamps on results from these weights, newer than the last
                published; ``None`` adds one to the last (the first is ``1``).

        Raises:
            ValueError: a parameter is missing, unexpected, or of another
                shape or dtype (named), or ``version`` is not newer than the
                last published; nothing is published.
        """
        banks = self._open_banks()
        who, outcome = "WeightPublisher.publish", "Nothing was published."
        last = self.version
        if version is None:
            version = (last or 0) + 1
        elif last is not None and int(version) <= last:
            raise ValueError(
                f"{who}: version {int(version)} is not newer than the last published, "
                f"{last} (versions only go up for a server's callers). {outcome}"
            )
        given, _ = _weights_of(self._source if weights is None else weights, who)
        target = self._views[banks.back()]
        check_weights(target, given, self._skipped, who, outcome)
        for name, view in target.items():
            view.copy_(given[name])
        banks.publish(int(version))
        return int(version)

    def close(self) -> None:
        """Give up publishing under this name; the segment is removed when no
        server holds it either."""
        self._views = []
        if self._banks is not None:
            self._release()
            self._banks = None

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("a WeightPublisher belongs to its process; make one in each trainer")


class _StagedWeights:
    """A newer published version, ready for ``apply()`` (between batches,
    under the model lock). For a model with CUDA tensors the bank was taken
    already and its host-to-device copies run on a side stream; for a host
    model served from the banks, ``apply()`` takes the bank itself, since
    taking it gives back the bank the model was served from."""

    __slots__ = ("receiver", "bank", "publication", "version", "events")

    def __init__(self, receiver, bank=None, publication=None, version=None, events=None):
        self.receiver, self.bank, self.publication = receiver, bank, publication
        self.version, self.events = version, events or {}

    @torch.no_grad()
    def apply(self) -> int:
        """Applies the version to the served model; returns its version."""
        r = self.receiver
        if self.bank is None:
            self.bank = r._banks.acquire()
            self.publication = r._banks.bank_publication(self.bank)
            self.version = r._banks.bank_version(self.bank)
        views = r._views[self.bank]
        if r._serve_from_banks:
            # Swap by reference: the model's tensors become the bank's, which
            # no publisher writes until a later apply() takes another bank.
            for name, target in r._targets.items():
                target.data = views[name]
        else:
            for device, event in self.events.items():
                torch.cuda.current_stream(device).wait_event(event)
            for name, target in r._targets.items():
                staged = r._device_copies.get(name)
                target.copy_(views[name] if staged is None else staged)
        r._applied = self.publication
        r._applied_version = self.version
        return self.version


class SharedMemoryWeightReceiver:
    """The server's end of a :class:`WeightPublisher`: pass it as
    ``InferenceServer(..., weight_sync=SharedMemoryWeightReceiver(name))``.

    Between batches the server takes the newest published version (versions
    published meanwhile are skipped, never mixed), applies it under the model
    lock and stamps later results with its version:

    * a model on the CPU is served from the shared bank itself: applying a
      version points its parameters and buffers at the bank (swapped by
      reference, no copy), and no publisher writes that bank until the
      server has moved on to a newer one;
    * a model on a CUDA device gets the version copied to the device on a
      side stream before the lock is taken (the banks are page-locked), so
      a forward waits only for a device-to-device copy into its own
      tensors, which keep their addresses.

    It also has the receiver side of torchrl's weight-sync protocol
    (``init_on_receiver``, ``connect``, ``receive``), so torchrl's
    ``InferenceServer`` can poll it too.

    Args:
        name (str): the segment's name, shared with the trainer's
            :class:`WeightPublisher`.

    Keyword Args:
        in_place (bool, optional): copy each version into the CPU model's
            own tensors instead of serving it from the bank (for code that
            holds on to the tensors' memory). Default: ``False``.
        timeout (float, optional): seconds to wait for a segment that another
            process is creating. Default: ``5.0``.

    ``close()`` (after the server stopped) gives a model served from the
    banks its own copy of the weights.
    """

    def __init__(self, name: str, *, in_place: bool = False, timeout: float = 5.0):
        self.name = name
        self._in_place = in_place
        self._timeout = timeout
        self._banks = None
        self.initialized_on_receiver = False
        self.synchronized_on_receiver = False
        self._applied = 0  # publication number applied last
        self._applied_version = None
        self._model = None  # the model bound by init_on_receiver
        self._serve_from_banks = False
        self._registered = None  # undoes the page-locking of the banks
        self._pending_events = {}

    # -- torchrl's receiver protocol -------------------------------------------

    def init_on_receiver(self, *, model_id=None, model=None, worker_idx=None, **kwargs) -> None:
        """Open the segment for the served ``model`` (creating it if the
        trainer has not yet). Called by every server start: the newest
        version is then applied (again) before the first batch, so a new
        server stamps what its model holds; a receiver moved to another
        model leaves the previous one its own copy of the weights."""
        if model is None and kwargs.get("context") is not None:
            model = getattr(kwargs["context"], "model", None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                "SharedMemoryWeightReceiver needs the served model to be an nn.Module; "
                f"got {type(model).__name__}"
            )
        self._applied, self._applied_version = 0, None
        if self._banks is not None:
            if model is self._model:
                return
            self.close()
        self._model = model
        self._targets, _ = model_weights(model, "SharedMemoryWeightReceiver")
        self._layout = _BankLayout(self._targets)
        self._banks = _open_banks(
            self.name, self._layout, _core.WeightRole.receiver, self._timeout,
            ours="the server's model", theirs="the publisher's weights",
        )
        self._release = weakref.finalize(self, self._banks.release)
        self._views = [self._layout.views(self._banks, b) for b in range(3)]
        self._device_copies = {
            name: torch.empty_like(t) for name, t in self._targets.items() if t.is_cuda
        }
        self._serve_from_banks = not self._device_copies and not self._in_place
        self._streams = {}
        self._registered = None
        if self._device_copies:
            devices = {t.device for t in self._device_copies.values()}
            self._streams = {d: torch.cuda.Stream(d) for d in devices}
            self._registered = _page_lock(self._banks)
        self.initialized_on_receiver = True

    def connect(self, *, worker_idx=None) -> None:
        """Nothing to exchange: the newest published version, if any, is
        taken before the server's first batch."""
        self.synchronized_on_receiver = True

    def _open_banks(self):
        if self._banks is None:
            raise RuntimeError(
                f"SharedMemoryWeightReceiver {self.name!r} is not open: a server opens it "
                "(init_on_receiver) when it starts"
            )
        return self._banks

    def receive(self, timeout: float | None = 0.0) -> int | None:
        """Apply the newest version if it was not yet; return its version,
        or ``None`` when there was none within ``timeout`` seconds (``None``:
        wait for one). For servers that poll torchrl's protocol; batchserve's
        own server stages and applies separately so the lock is held only
        for the last copy."""
        staged = self.stage_update()
        if staged is None and timeout != 0.0:
            self._open_banks().wait_for_publication(self._applied, timeout)
            staged = self.stage_update()
        return None if staged is None else staged.apply()

    # -- batchserve's server ---------------------------------------------------

    def stage_update(self) -> _StagedWeights | None:
        """A version newer than the one applied, staged for ``apply()`` (its
        device copies started), or ``None`` when there is nothing new."""
        banks = self._open_banks()
        if self._serve_from_banks:
            newest = banks.bank_publication(banks.newest())
            if newest == 0 or newest == self._applied:
                return None
            return _StagedWeights(self)
        for event in self._pending_events.values():
            # The front bank's last copies must be done before acquire() can
            # hand that bank back to the publisher.
            event.synchronize()
        self._pending_events = {}
        front = banks.acquire()
        publication = banks.bank_publication(front)
        if publication == 0 or publication == self._applied:
            return None
        if self._device_copies:
            views = self._views[front]
            with torch.no_grad():
                for device, stream in self._streams.items():
                    # The last apply's device-to-device copies on the serving
                    # stream may still read the staged copies.
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(stream):
                        for name, copy in self._device_copies.items():
                            if copy.device == device:
                                copy.copy_(views[name], non_blocking=True)
                        self._pending_events[device] = stream.record_event()
        return _StagedWeights(
            self, front, publication, banks.bank_version(front), dict(self._pending_events)
        )

    @property
    def version(self) -> int | None:
        """The version applied last, or ``None``."""
        return self._applied_version

    @property
    def published(self) -> int:
        """How many versions were published under this name so far."""
        return self._banks.published if self._banks is not None else 0

    def close(self) -> None:
        """Give up receiving under this name; the segment is removed when no
        trainer holds it either."""
        for event in self._pending_events.values():
            event.synchronize()
        self._pending_events = {}
        if self._registered is not None:
            self._registered()
            self._registered = None
        if self._serve_from_banks and self._banks is not None:
            with torch.no_grad():  # the model keeps its weights, in its own memory
                for target in self._targets.values():
                    target.data = target.data.clone()
        self._views = []
        if self._banks is not None:
            self._release()
            self._banks = None
        self._model = None
        self.initialized_on_receiver = self.synchronized_on_receiver = False

    shutdown = close  # torchrl's scheme method name

    def __getstate__(self):
        if self._banks is not None:
            raise TypeError("a SharedMemoryWeightReceiver in use belongs to its server's process")
        return {"name": self.name, "in_place": self._in_place, "timeout": self._timeout}

    def __setstate__(self, state):
        self.__init__(**state)


def _page_lock(banks):
    """Page-locks the mapped segment so host-to-device copies from it are
    asynchronous; returns the undo (or ``None`` when CUDA refuses)."""
    cudart = torch.cuda.cudart()
    segment = torch.frombuffer(banks, dtype=torch.uint8)
    pointer = segment.data_ptr()
    if int(cudart.cudaHostRegister(pointer, segment.numel(), 0)) != 0:
        return None
    return lambda: cudart.cudaHostUnregister(pointer)

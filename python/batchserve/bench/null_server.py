"""The null server: the limit a scenario's actors allow any server.

Thread actors: its clients answer every request at once with a response
computed when the transport was made: no queue, no model, no thread. The
actors run exactly the loop they run against a real server (the same
request building, the same client wrapping: torchrl's PolicyClientModule
submits to it and waits on the answer), so its req/s is what those actors
can send when serving costs nothing. That is the GIL's limit: every
server's req/s at that actor count is at most this, and a target above it
cannot be met by any server (issue 19 asks for the ratio to it).

Process actors: answering in the actor's own process would leave out the
hand-off between processes, most of what a request costs there. Their
requests go through a :class:`batchserve.SharedMemoryTransport`'s slots, as
batchserve's do, and a C++ thread answers each with the same response rows
(:class:`EchoServer`, ``csrc/core/slot_echo.h``): no model, no Python, no
batching policy; the floor of a round trip through the slots.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from batchserve import _core


class Answered:
    """A request's future that is done when made (what ``submit`` returns);
    the subset of concurrent.futures.Future that callers use."""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def result(self, timeout=None):
        return self._value

    def exception(self, timeout=None):
        return None

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def add_done_callback(self, fn) -> None:
        fn(self)


class NullClient:
    """One actor's client: returns the stored response (picklable, so it
    works in actor processes too)."""

    def __init__(self, response: TensorDictBase):
        self._response = response

    def __call__(self, td, timeout=None):
        return self._response

    def submit(self, td) -> Answered:
        return Answered(self._response)


class NullTransport:
    """Hands out NullClients answering `response` (one request's output)."""

    def __init__(self, response: TensorDictBase):
        self.response = response

    def client(self) -> NullClient:
        return NullClient(self.response)


class NullServer:
    """The lifecycle the harness drives, with nothing behind it."""

    def __init__(self):
        self._alive = False

    def start(self) -> NullServer:
        self._alive = True
        return self

    @property
    def is_alive(self) -> bool:
        return self._alive

    def stats(self, reset: bool = False) -> dict:
        return {}

    def shutdown(self, timeout=None) -> None:
        self._alive = False


class EchoServer(NullServer):
    """The null server of process actors: a ``_core.SlotEcho`` answering
    every request in ``transport``'s slots with ``response`` (one request's
    output; the response keys it lacks, the policy version, are zeros)."""

    def __init__(self, transport, response: TensorDictBase):
        super().__init__()
        layout = transport.response_layout
        rows = []
        for key, dtype, shape in zip(layout.keys, layout.dtypes, layout.shapes):
            value = response.get(key, None)
            leaf = torch.zeros(shape, dtype=dtype) if value is None else value.to(dtype)
            rows.append(leaf.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        self._transport = transport
        self._echo = _core.SlotEcho(transport.segment, rows)

    def start(self) -> EchoServer:
        self._echo.start()
        return super().start()

    def shutdown(self, timeout=None) -> None:
        if self.is_alive:
            self._echo.stop()
        super().shutdown(timeout)
        self._transport.server_stopped()

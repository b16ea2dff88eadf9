"""The null server: the limit a scenario's actors allow any server.

Thread actors: its clients answer every request at once with a response
computed when the transport was made: no queue, no model, no thread. The
actors run exactly the loop they run against a real server (the same
request building, the same client wrapping: torchrl's PolicyClientModule
submits to it and waits on the answer), so its req/s is what those actors
can send when serving costs nothing. That is the GIL's limit: every
server's req/s at that actor count is at most this, and a target above it
cannot be met by any server (issue 19 asks for the ratio to it).

Thread actors, with a hand-off (the "echo" system): no server at all
leaves out the round trip every server thread imposes, the caller's sleep
and its wake-up with the GIL taken back. :class:`QueueEcho` answers the
same actors through a batchserve ``ThreadingTransport``: its C++ queue and
batching policy, a server thread that ends every request of a full batch
with the stored response, and inline calls for a lone caller, as
batchserve's server makes them. No model, no gather, no result built per
row: the floor of a round trip through batchserve's queue, what
batchserve's server adds to it being everything else.

Process actors: answering in the actor's own process would leave out the
hand-off between processes, most of what a request costs there. Their
requests go through a :class:`batchserve.SharedMemoryTransport`'s slots, as
batchserve's do, and a C++ thread answers each with the same response rows
(:class:`EchoServer`, ``csrc/core/slot_echo.h``): no model, no Python, no
batching policy; the floor of a round trip through the slots.
"""

from __future__ import annotations

import threading

import torch
from tensordict import TensorDictBase

from batchserve import _core
from batchserve.batching import native
from batchserve.batching.fast_path import learn_schema


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


class QueueEcho(NullServer):
    """The null server of thread actors with a hand-off: a thread taking
    the batches of ``transport``'s queue (a batchserve ``ThreadingTransport``)
    and ending every request with ``response``, in batches of
    ``batch_size``: all the actors, up to ``max_batch_size``. A lone
    caller that finds it idle is answered on its own thread (an inline
    call). The fast path's schema is learned from the first request, as
    batchserve's server learns it: requests that fit it are matched at
    submission, and only those go inline.

    Every batch is full, so the callers of one batch are woken as one chain
    at a time. Cut at a timeout (when a chain outlasts it) the batches
    would be small and their chains would overlap, every chain's caller
    contending for the GIL: on the 2-core VM the echo at 32 threads served
    batches of ~7 and 8-9 context switches per request, below batchserve's
    own server (which batches ~20 behind its forward). The wait for a full
    batch is bounded by ``FULL_BATCH_WAIT_S``, a guard only.
    """

    FULL_BATCH_WAIT_S = 0.05

    def __init__(self, transport, response: TensorDictBase, batch_size: int,
                 max_batch_size: int, idle_wait: float):
        super().__init__()
        self._transport = transport
        self._queue = transport.request_queue
        self._queue.configure(max_batch_size, batch_size, self.FULL_BATCH_WAIT_S,
                              max(idle_wait, self.FULL_BATCH_WAIT_S))
        self._response = response
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _answer(self, core_batch) -> None:
        """The inline runner: a ``_core.Batch`` of one, on the caller's thread."""
        native.NativeBatch(core_batch).resolve([self._response])

    def _serve(self) -> None:
        queue, response = self._queue, self._response
        queue.attach_server()
        queue.set_inline_runner(self._answer)
        try:
            while not self._stop.is_set():
                batch = native.collect(queue)
                if batch is None:
                    continue
                if self._transport.request_spec is None and batch.items:
                    learn_schema(self._transport, batch.items[0])
                batch.resolve([response] * len(batch))
        finally:
            queue.set_inline_runner(None)
            queue.detach_server()

    def start(self) -> QueueEcho:
        self._thread = threading.Thread(target=self._serve, name="queue-echo", daemon=True)
        self._thread.start()
        return super().start()

    def shutdown(self, timeout=None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._queue.close()  # wakes the thread; callers still queued get an error
            self._thread.join(timeout)
            native.fail_pending(self._queue, _core.ServerClosedError("the echo server stopped"))
            self._thread = None
        super().shutdown(timeout)

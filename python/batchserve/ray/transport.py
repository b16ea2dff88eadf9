"""Actors on a Ray cluster: :class:`RayTransport`, for a server in this
process, and :class:`RayClient`, the client of it and of a server hosted in
a Ray actor (``batchserve.ray.service``).

For a server in a process that is no Ray actor (the driver, say), remote
requests meet in an *inbox*, a small async Ray actor owned by the
server's process. A client call is one actor call on the inbox, which holds
it until its result comes back. In the server's process a pump thread takes
the waiting requests from the inbox in bulk (one Ray call for up to
``max_take`` of them) and submits each into the transport's C++ request
queue, the one its local thread clients use too; a second thread hands the
results back to the inbox in bulk. So requests from every node, and from
local threads, are batched together by the same C++ core, and the server
side makes two Ray calls per round of requests rather than two per request.

Ray is imported when a Ray transport or server is made (``pip install
"batchserve[ray]"``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import queue
import threading
from concurrent.futures import Future

from batchserve import _core
from batchserve.ray.runtime import RayRuntimeLease, ray_module
from batchserve.transports.base import InferenceClient
from batchserve.transports.exception_codec import decode_exception, encode_exception
from batchserve.transports.threading import ThreadingTransport

# How long the pump's take() waits in the inbox for a first request: it
# returns as soon as one arrives, so this only sets what an idle server costs.
_TAKE_WAIT_S = 0.25

_log = logging.getLogger("batchserve")


class _Inbox:
    """The Ray actor where remote calls wait for the server (async: each
    waiting call is a coroutine, not a thread)."""

    def __init__(self):
        self._pending: collections.deque = collections.deque()  # (id, td)
        self._waiting: dict[int, asyncio.Future] = {}
        self._arrived: asyncio.Event | None = None
        self._next_id = 0
        self._closed: BaseException | None = None

    def _event(self) -> asyncio.Event:
        if self._arrived is None:  # made in the actor's event loop
            self._arrived = asyncio.Event()
        return self._arrived

    async def call(self, td):
        if self._closed is not None:
            raise self._closed
        future = asyncio.get_running_loop().create_future()
        request_id = self._next_id
        self._next_id += 1
        self._waiting[request_id] = future
        self._pending.append((request_id, td))
        self._event().set()
        try:
            return await future
        finally:
            self._waiting.pop(request_id, None)

    async def take(self, max_items: int, timeout: float) -> list:
        """Up to ``max_items`` waiting requests, oldest first, waiting up to
        ``timeout`` seconds for a first one."""
        arrived = self._event()
        if not self._pending:
            try:
                await asyncio.wait_for(arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        items = []
        while self._pending and len(items) < max_items:
            items.append(self._pending.popleft())
        if not self._pending:
            arrived.clear()
        return items

    async def resolve(self, outcomes: list) -> None:
        """``outcomes``: (id, True, result) or (id, False, the exception
        encoded by ``exception_codec``) per request. Each exception is
        decoded here on its own, so one this process cannot rebuild becomes a
        RuntimeError with its text rather than failing the others."""
        for request_id, ok, value in outcomes:
            future = self._waiting.get(request_id)
            if future is None or future.done():
                continue  # its caller is gone, or it was failed at close
            if ok:
                future.set_result(value)
                continue
            future.set_exception(decode_exception(value))

    async def open(self) -> None:
        self._closed = None

    async def close(self, error: BaseException) -> None:
        """Refuses later calls and fails the ones the server has not taken
        with ``error``; the ones it took are answered as it finishes them."""
        self._closed = error
        while self._pending:
            request_id, _ = self._pending.popleft()
            future = self._waiting.get(request_id)
            if future is not None and not future.done():
                future.set_exception(error)

    async def abort(self, error: BaseException) -> None:
        """Fails every call still waiting (the transport is going away)."""
        await self.close(error)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)


class _Pump:
    """The server process's side of the inbox: brings remote requests into
    the C++ queue and takes their results back, each in bulk.

    ``stop()`` ends the intake at once; the hand-back goes on until every
    request it brought in has its answer (served, or failed by the server's
    shutdown), then ends too."""

    def __init__(self, inbox, submit, max_take: int):
        self._inbox, self._submit, self._max_take = inbox, submit, max_take
        self._stop = threading.Event()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._unanswered = 0  # brought in, answer not yet handed back
        self._intake = threading.Thread(
            target=self._bring_in, daemon=True, name="batchserve-ray-intake")
        self.hand_back = threading.Thread(
            target=self._hand_back, daemon=True, name="batchserve-ray-results")

    def start(self) -> None:
        self._intake.start()
        self.hand_back.start()

    def stop(self) -> None:
        """Ends the intake after its current take() (requests it took
        meanwhile are submitted and answered like the others)."""
        self._stop.set()
        self._outbox.put(None)  # wakes the hand-back to look at what is left

    def _bring_in(self) -> None:
        ray = ray_module()
        while not self._stop.is_set():
            try:
                items = ray.get(self._inbox.take.remote(self._max_take, _TAKE_WAIT_S))
            except ray.exceptions.RayActorError:  # the inbox is gone (closed, or its owner died)
                return
            except Exception:  # anything else: say so, and go on bringing requests in
                _log.exception("batchserve: taking Ray requests from the inbox failed")
                self._stop.wait(_TAKE_WAIT_S)
                continue
            for request_id, td in items:
                with self._lock:
                    self._unanswered += 1
                try:
                    future = self._submit(td)
                except Exception as exc:  # closed, or a request the queue refuses
                    self._outbox.put((request_id, False, encode_exception(exc)))
                    continue
                future.add_done_callback(functools.partial(self._finished, request_id))

    def _finished(self, request_id: int, future) -> None:
        exc = future.exception()
        if exc is None:
            self._outbox.put((request_id, True, future.result()))
        else:
            self._outbox.put((request_id, False, encode_exception(exc)))

    def _done(self) -> bool:
        with self._lock:
            return self._stop.is_set() and self._unanswered == 0 and not self._intake.is_alive()

    def _hand_back(self) -> None:
        while not self._done():
            try:
                first = self._outbox.get(timeout=0.1)
            except queue.Empty:
                continue
            outcomes = [] if first is None else [first]
            while True:  # everything finished meanwhile goes in the same call
                try:
                    more = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if more is not None:
                    outcomes.append(more)
            if not outcomes:
                continue
            with self._lock:
                self._unanswered -= len(outcomes)
            self._send(outcomes)

    def _send(self, outcomes: list) -> None:
        """Hands outcomes back in one call; when that cannot be serialised,
        one by one, a result that cannot be sent failing only its request."""
        try:
            self._inbox.resolve.remote(outcomes)
            return
        except Exception:
            if len(outcomes) == 1 and not outcomes[0][1]:
                return  # even its error could not be sent: nothing more to try
        for request_id, ok, value in outcomes:
            try:
                self._inbox.resolve.remote([(request_id, ok, value)])
            except Exception as exc:
                error = TypeError(f"the result could not be sent back through Ray: {exc!r}")
                self._send([(request_id, False, encode_exception(error))])


class RayClient(InferenceClient):
    """A client of a :class:`RayTransport` or of a
    :class:`~batchserve.RayInferenceServer`: picklable into Ray tasks and
    actors on any node (it holds the actor handle of the inbox, or of the
    serving actor).

    ``client(td)`` blocks for the result; ``client.submit(td)`` returns a
    ``concurrent.futures.Future``; ``await client.acall(td)`` for asyncio.
    ``client(td, timeout=...)`` raises ``ray.exceptions.GetTimeoutError`` (a
    ``TimeoutError``) after that many seconds, the request staying in flight.
    Errors raised by the model reach the caller as the same exception type
    (Ray's ``RayTaskError`` subclass of it). A server that went away raises
    :class:`batchserve.ServerClosedError`: shut down, or its actor died (a
    :class:`~batchserve.ray.errors.ServerActorDiedError`, which is also a
    ``ray.exceptions.ActorDiedError``).
    """

    __slots__ = ("_inbox",)

    def __init__(self, inbox):
        self._transport = None  # the actor handle is all a client needs
        self._inbox = inbox
        self._blocking_call = self._get

    def __reduce__(self):
        return (RayClient, (self._inbox,))

    def _get(self, td, timeout: float | None):
        """One request, waited for by ``ray.get``."""
        ray = ray_module()
        try:
            return ray.get(self._inbox.call.remote(td), timeout=timeout)
        except ray.exceptions.ActorDiedError as exc:
            from batchserve.ray.errors import translate

            raise translate(exc) from exc

    def _submit(self, td, timeout: float | None):
        """One actor call; its ``concurrent.futures.Future``."""
        return _translated(self._inbox.call.remote(td).future())


def _translated(inner: Future) -> Future:
    """A Future with ``inner``'s outcome, an actor's death turned into a
    :class:`~batchserve.ray.errors.ServerActorDiedError`."""
    outer: Future = Future()

    def settle(done: Future) -> None:
        if done.cancelled():
            outer.cancel()
            return
        exc = done.exception()
        if exc is None:
            outer.set_result(done.result())
            return
        from batchserve.ray.errors import translate

        outer.set_exception(translate(exc))

    inner.add_done_callback(settle)
    return outer


class RayTransport(ThreadingTransport):
    """A transport for actors on a Ray cluster (tasks or actors, on any
    node), served by an :class:`~batchserve.InferenceServer` in this process.

    ``client()`` returns a :class:`RayClient` to pass into Ray tasks and
    actors; ``local_client()`` a client for threads of this process. Both
    kinds of request go into the same C++ queue and are batched together.

    Ray is started (``ray.init()``) if it is not running yet, and shut down
    when the last of batchserve's Ray parts that use it is closed (see
    ``batchserve.ray.runtime``); a runtime started by the caller is left
    running.

    Args:
        max_queue_size (int, optional): as for :class:`ThreadingTransport`.
            Default: ``65536``.

    Keyword Args:
        request_spec (TensorDictBase, optional): as for
            :class:`ThreadingTransport`.
        max_take (int, optional): most remote requests brought in per Ray
            call. Default: ``256``.

    Example:
        >>> transport = RayTransport()
        >>> server = InferenceServer(policy, transport, max_batch_size=64).start()
        >>> client = transport.client()
        >>> ray.get([rollout.remote(client) for _ in range(64)])
    """

    def __init__(self, max_queue_size: int = 65536, *, request_spec=None, max_take: int = 256):
        super().__init__(max_queue_size, request_spec=request_spec)
        self._runtime_lease = RayRuntimeLease.acquire()
        ray = ray_module()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On this node (requests then cross the network once); num_cpus=0:
        # waiting calls cost the cluster no CPU slot, and many may wait.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._inbox = ray.remote(_Inbox).options(
            num_cpus=0, max_concurrency=1_000_000, scheduling_strategy=here
        ).remote()
        self._max_take = max_take
        self._pump: _Pump | None = None
        self._draining: list[_Pump] = []  # stopped, still handing answers back
        self._lock = threading.Lock()

    def client(self) -> RayClient:
        """A client for Ray tasks and actors (picklable)."""
        return RayClient(self._inbox)

    def local_client(self):
        """A client for threads of this process (the same queue)."""
        return super().client()

    def server_started(self) -> None:
        """Opens the inbox and starts bringing its requests in."""
        with self._lock:
            if self._inbox is None:
                raise _core.ServerClosedError("this RayTransport was closed")
            ray_module().get(self._inbox.open.remote())
            if self._pump is None:
                self._pump = _Pump(self._inbox, self.submit, self._max_take)
                self._pump.start()

    def server_stopped(self) -> None:
        """New remote calls are refused and those not yet brought in fail
        with ServerClosedError; those brought in are answered as the server
        ends them (its forward in progress may still finish)."""
        with self._lock:
            pump, self._pump = self._pump, None
            inbox = self._inbox
            self._draining = [p for p in self._draining if p.hand_back.is_alive()]
            if pump is not None:
                self._draining.append(pump)
        if inbox is not None:
            try:
                # Waited for: calls to an async actor from different threads
                # (the worker's exit, a later start()'s open) may run in any
                # order, and a late close must not refuse the next run's calls.
                ray_module().get(inbox.close.remote(
                    _core.ServerClosedError("the InferenceServer was shut down")), timeout=30)
            except Exception:
                pass
        if pump is not None:
            pump.stop()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving remote clients and release the inbox actor and this
        transport's lease on the Ray runtime. Answers still on their way get
        up to ``timeout`` seconds to reach their callers."""
        self.server_stopped()
        with self._lock:
            inbox, self._inbox = self._inbox, None
            draining, self._draining = self._draining, []
        for pump in draining:
            pump.hand_back.join(timeout)
        if inbox is not None:
            ray = ray_module()
            try:
                ray.get(inbox.abort.remote(_core.ServerClosedError("the RayTransport was closed")),
                        timeout=timeout)
                ray.kill(inbox)
            except Exception:
                pass
        self._runtime_lease.release()

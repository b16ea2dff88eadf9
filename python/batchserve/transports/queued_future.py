"""QueuedFuture: the ``concurrent.futures.Future`` of a request submitted to
the C++ queue, ended in C++ like a blocking call.

A plain ``Future`` per request costs the server a claim
(``set_running_or_notify_cancel``) and a ``set_result`` in Python, each
taking the Future's condition and notifying its waiters, and costs the
caller a ``Condition.wait`` whose wake-up contends for that condition with
the server. A ``QueuedFuture`` keeps its state in C++ instead
(``_core.PendingResult``, over the request's completion): the server ends
the request without calling Python, ``result()`` waits on a futex with the
GIL released, and Python runs only for what Python asked for: done
callbacks, and the waiters of ``concurrent.futures.wait`` /
``as_completed``. The future leaves itself with the request when the first
of those is added; the server then hands it back to Python with the
outcome, and ``set_result`` / ``set_exception`` notify (they do not set
anything: the outcome is already in C++).

Differences from a ``Future``: it is made by the transport, never by an
executor (``set_running_or_notify_cancel`` only reports whether it was
cancelled). A request whose future is dropped unread is served all the
same, as a dropped ``Future``'s is; its result is dropped.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)

_LOGGER = logging.getLogger("concurrent.futures")

# _core.PendingResult.state (csrc/core/completion.h: Completion::State) as a
# Future's state. kAbandoned never shows: only a dropped future leaves it.
# kClaimed: its caller is serving it (see QueuedFuture.result).
_STATES = (PENDING, RUNNING, FINISHED, CANCELLED_AND_NOTIFIED, FINISHED, RUNNING)


class QueuedFuture(Future):
    """The future of one request in a batchserve request queue.

    A ``concurrent.futures.Future`` in every use a caller makes of one
    (``result``, ``exception``, ``done``, ``cancel``, ``add_done_callback``,
    ``concurrent.futures.wait`` / ``as_completed``, ``asyncio.wrap_future``),
    whose request is ended by the server in C++ (see the module docstring).

    Args:
        pending: the request's ``_core.PendingResult``.
    """

    # Future.__init__ is not called: its condition and lists are made only
    # when something needs them (callbacks, waiters).
    def __init__(self, pending):  # noqa: D107 (documented on the class)
        self._pending = pending
        self._lock = threading.Lock()
        self._callbacks: list | None = []  # None once notified
        self._watched = False
        self._condition_made: threading.Condition | None = None
        self._waiter_list: list | None = None

    # -- what a caller uses ---------------------------------------------------

    def done(self) -> bool:
        return self._pending.done()

    def running(self) -> bool:
        return self._state == RUNNING

    def cancelled(self) -> bool:
        return self._state == CANCELLED_AND_NOTIFIED

    def cancel(self) -> bool:
        """Withdraws the request if the server has not taken it yet."""
        if not self._pending.withdraw():
            return False
        self._notify()
        return True

    def result(self, timeout: float | None = None):
        """The result; raises ``TimeoutError`` (the request stays in flight),
        ``CancelledError``, or the server's exception.

        Without a timeout, on the submitting thread, a lone caller whose
        request the idle server has not taken yet serves it itself, inline
        (``docs/fast_path.md``: inline calls); its callbacks then run on
        this thread."""
        return self._pending.result(timeout)

    def exception(self, timeout: float | None = None):
        return self._pending.exception(timeout)

    def add_done_callback(self, fn) -> None:
        """Calls ``fn(self)`` once the request ended: on the thread that ends
        it (the server's, or the caller's when it served its request itself,
        see :meth:`result`), or now when it already has."""
        with self._lock:
            if self._callbacks is not None and self._watch():
                self._callbacks.append(fn)
                return
        self._notify()  # ended: runs the callbacks added before, once
        self._call(fn)

    # -- the server's side --------------------------------------------------

    def set_running_or_notify_cancel(self) -> bool:
        """The server's claim: False when the caller cancelled (the request
        ran through C++, which already took it)."""
        if self.cancelled():
            self._notify()
            return False
        return True

    def set_result(self, result) -> None:
        """Notifies callbacks and waiters: the request ended in C++ with
        ``result``."""
        self._notify_ended()

    def set_exception(self, exception) -> None:
        """Notifies callbacks and waiters: the request ended in C++ with
        ``exception``."""
        self._notify_ended()

    # -- concurrent.futures.wait / as_completed ------------------------------
    # They take the condition, read _state and add themselves to _waiters;
    # the future must then be watched before they read the state.

    @property
    def _state(self):
        return _STATES[self._pending.state]

    @property
    def _condition(self) -> threading.Condition:
        with self._lock:
            if self._condition_made is None:
                self._condition_made = threading.Condition()
                self._waiter_list = []
            if self._callbacks is not None:
                self._watch()
            return self._condition_made

    @property
    def _waiters(self) -> list:
        self._condition  # noqa: B018 (made, and watched, first)
        return self._waiter_list

    # -- notification -------------------------------------------------------

    def _watch(self) -> bool:
        """Lock held. Leaves this future with the request; False when it has
        already ended (nothing left: notify now)."""
        if not self._watched:
            self._watched = True
            return self._pending.watch(self)
        return not self._pending.done()

    def _notify_ended(self) -> None:
        if not self._pending.done():
            raise InvalidStateError(f"{self!r}: the request has not ended")
        self._notify()

    def _notify(self) -> None:
        """Runs the callbacks and wakes the waiters, once."""
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
            condition = self._condition_made
        if callbacks is None:
            return
        if condition is not None:
            with condition:
                if self.cancelled():
                    add = "add_cancelled"
                elif self._pending.exception(0) is not None:
                    add = "add_exception"
                else:
                    add = "add_result"
                for waiter in self._waiter_list:
                    getattr(waiter, add)(self)
                condition.notify_all()
        for fn in callbacks:
            self._call(fn)

    def _call(self, fn) -> None:
        try:
            fn(self)
        except Exception:
            _LOGGER.exception("exception calling callback for %r", self)

    def __repr__(self) -> str:
        return f"<QueuedFuture at {id(self):#x} state={self._state}>"

"""What outlives one call to a server: its runs (one start()..shutdown()
each), the servers still running and the workers still finishing a forward,
and the interpreter-exit hook that shuts them down."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref

from batchserve import _core

_log = logging.getLogger("batchserve")

SHUTDOWN_MESSAGE = "InferenceServer is shutting down; the request was not served."

# Servers still running when the interpreter exits are shut down before
# Python waits for non-daemon threads, so callers blocked on them get an
# error instead of keeping the process alive. Only in the process that
# started them: a forked child (an actor process) holds a copy of the server
# object, whose shutdown would close the shared-memory transport for all.
running_servers: weakref.WeakSet = weakref.WeakSet()


# Workers still finishing a forward after a shutdown that timed out: the
# exit waits a little for them, since a daemon thread still running torch or
# the C++ core when the interpreter finalizes can abort the process.
finishing_workers: weakref.WeakSet = weakref.WeakSet()
_EXIT_GRACE_S = 5.0


def _shutdown_running_servers() -> None:
    for server in list(running_servers):
        if server._started_in != os.getpid():
            continue
        try:
            server.shutdown(timeout=1.0)
        except Exception:  # exiting anyway: never block the exit on one server
            _log.exception("batchserve: shutdown at exit failed")
    deadline = time.monotonic() + _EXIT_GRACE_S
    for worker in list(finishing_workers):
        worker.join(max(0.0, deadline - time.monotonic()))


_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_shutdown_running_servers)
else:  # pragma: no cover - CPython < 3.9
    import atexit

    atexit.register(_shutdown_running_servers)


def closed_error(message: str, cause: BaseException) -> BaseException:
    """The ServerClosedError callers get when `cause` stopped the server."""
    error = _core.ServerClosedError(message)
    error.__cause__ = cause
    return error


class ServerRun:
    """One start()..shutdown() of the worker thread."""

    __slots__ = ("stop", "prepared", "ready", "lock", "start_returned", "startup_error",
                 "startup_step", "inflight")

    def __init__(self):
        self.stop = threading.Event()
        self.prepared = threading.Event()  # the worker's own settings applied (worker_nice)
        self.ready = threading.Event()  # the worker's set-up finished
        self.lock = threading.Lock()  # start() and a late set-up failure
        self.start_returned = False
        self.startup_error: BaseException | None = None
        self.startup_step = ""  # what raised startup_error: worker_nice, weight_sync set-up
        self.inflight = None  # the batch being served, for a timed-out shutdown

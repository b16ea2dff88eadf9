"""The clients a :class:`~batchserve.server.process.ProcessInferenceServer`
hands out for torchrl's transports, and the error they raise when the
server process is gone.

torchrl's clients (``MPTransport``'s mailbox client, the distributed
transport's) poll a liveness flag that the server's monitor clears when the
server process exits, and then raise torchrl's ``MailboxPeerClosedError``
(or, when their receiver failed first, a ``MailboxTransportError``).
:class:`ProcessClient` is the one place where that becomes
:class:`ServerProcessExitedError`: a :class:`~batchserve.ServerClosedError`
for batchserve's callers and still a ``MailboxPeerClosedError`` for
torchrl's. Imported only when torchrl is.
"""

from __future__ import annotations

import time

from torchrl._comm import MailboxPeerClosedError, MailboxTransportError

from batchserve._core import ServerClosedError

# How long a transport error may precede the monitor's clearing of the
# liveness flag when the server process died (the two race on its exit).
_DEATH_SETTLE_S = 1.0
_SETTLE_POLL_S = 0.02


class ServerProcessExitedError(ServerClosedError, MailboxPeerClosedError):
    """The inference server's process exited (or closed the transport)
    before answering: both :class:`~batchserve.ServerClosedError` and
    torchrl's ``MailboxPeerClosedError``."""


def _server_gone(peer_alive, settle_s: float = _DEATH_SETTLE_S) -> bool:
    """Whether the server process is gone: the liveness flag clears at
    once when it is, but may trail the transport's own error by a moment
    (waited for up to ``settle_s``)."""
    if peer_alive is None:
        return False
    deadline = time.monotonic() + settle_s
    while True:
        try:
            if not peer_alive.is_set():
                return True
        except Exception:  # the flag's owner (the parent) is gone too
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_SETTLE_POLL_S)


def _translated(exc: MailboxTransportError, peer_alive) -> BaseException | None:
    """The ServerProcessExitedError that ``exc`` stands for, or None."""
    if isinstance(exc, ServerClosedError):
        return None
    if isinstance(exc, MailboxPeerClosedError) or _server_gone(peer_alive):
        return ServerProcessExitedError(f"the inference server process is gone: {exc}")
    return None


def _closed_if_gone(peer_alive, call, *args, **kwargs):
    """``call(*args, **kwargs)``, its transport error for a server process
    that is gone raised as a ServerProcessExitedError."""
    try:
        return call(*args, **kwargs)
    except MailboxTransportError as exc:
        error = _translated(exc, peer_alive)
        if error is None:
            raise
        raise error from exc
    except RuntimeError as exc:
        # A send to a dead server fails in the transport itself (gloo's
        # "Connection reset by peer"); a live server's errors pass as they are.
        if isinstance(exc, ServerClosedError) or not _server_gone(peer_alive, 0.0):
            raise
        raise ServerProcessExitedError(f"the inference server process is gone: {exc}") from exc


class ProcessFuture:
    """A request in flight through a :class:`ProcessClient`: the transport's
    future, whose ``result()`` / ``done()`` raise
    :class:`ServerProcessExitedError` when the server process is gone."""

    __slots__ = ("_future", "_peer_alive")

    def __init__(self, future, peer_alive):
        self._future = future
        self._peer_alive = peer_alive

    def result(self, timeout: float | None = None):
        return _closed_if_gone(self._peer_alive, self._future.result, timeout)

    def done(self) -> bool:
        try:
            return self._future.done()
        except MailboxTransportError as exc:
            if _translated(exc, self._peer_alive) is None:
                raise
            return True  # result() raises the error

    def __getattr__(self, name: str):
        return getattr(self._future, name)


class ProcessClient:
    """A torchrl transport's client as a ``ProcessInferenceServer`` hands it
    out: the same calls (``client(td)``, ``client.submit(td)``, and every
    other attribute of the wrapped client), picklable to actor processes,
    raising :class:`ServerProcessExitedError` when the server process is
    gone.

    Args:
        client: the transport's own client.
        peer_alive: the server's liveness flag (a multiprocessing Event the
            server's monitor clears), or None.
    """

    __slots__ = ("_client", "_peer_alive")

    def __init__(self, client, peer_alive=None):
        self._client = client
        self._peer_alive = peer_alive

    def __call__(self, td, *args, **kwargs):
        return _closed_if_gone(self._peer_alive, self._client, td, *args, **kwargs)

    def submit(self, td, *args, **kwargs) -> ProcessFuture:
        future = _closed_if_gone(self._peer_alive, self._client.submit, td, *args, **kwargs)
        return ProcessFuture(future, self._peer_alive)

    @property
    def wrapped(self):
        """The transport's own client."""
        return self._client

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def __reduce__(self):
        return (ProcessClient, (self._client, self._peer_alive))

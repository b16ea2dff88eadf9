"""The null server: the limit a scenario's actors allow any server.

Its clients answer every request at once with a response computed when the
transport was made: no queue, no model, no thread. The actors run exactly
the loop they run against a real server (the same request building, the
same client wrapping: torchrl's PolicyClientModule submits to it and waits
on the answer), so its req/s is what those actors can send when serving
costs nothing. With thread actors that is the GIL's limit: every server's
req/s at that actor count is at most this, and a target above it cannot be
met by any server (issue 19 asks for the ratio to it).
"""

from __future__ import annotations

from tensordict import TensorDictBase


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

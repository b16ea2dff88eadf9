"""The error a Ray client raises when the actor serving it died.

Imported only where Ray is (it derives from Ray's own error), so that it
pickles by reference between the driver and Ray's workers.
"""

from __future__ import annotations

import ray

from batchserve._core import ServerClosedError


class ServerActorDiedError(ServerClosedError, ray.exceptions.ActorDiedError):
    """The Ray actor serving a client died (killed, crashed, or gone with its
    node) before answering: a :class:`~batchserve.ServerClosedError` and a
    ``ray.exceptions.ActorDiedError``, so either ``except`` catches it.

    Args:
        cause (ray.exceptions.RayActorError): what Ray raised.
    """

    def __init__(self, cause: ray.exceptions.RayActorError):
        message = f"the inference server's Ray actor died: {cause}"
        ray.exceptions.RayActorError.__init__(
            self, cause.actor_id, message, cause.actor_init_failed, cause.preempted
        )
        self.args = (message,)

    def __reduce__(self):
        return (_rebuild, (self.actor_id, self.error_msg, self.actor_init_failed, self.preempted))


def _rebuild(actor_id, message, actor_init_failed, preempted) -> ServerActorDiedError:
    error = ServerActorDiedError.__new__(ServerActorDiedError)
    ray.exceptions.RayActorError.__init__(error, actor_id, message, actor_init_failed, preempted)
    error.args = (message,)
    return error


def translate(exc: BaseException) -> BaseException:
    """``exc``, or a :class:`ServerActorDiedError` for an actor that died
    (chained to it)."""
    if isinstance(exc, ray.exceptions.ActorDiedError) and not isinstance(
        exc, ServerActorDiedError
    ):
        error = ServerActorDiedError(exc)
        error.__cause__ = exc
        return error
    return exc

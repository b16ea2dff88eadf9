"""The policy version a server stamps on its results, and the model lock
under which updates change the model and the version together."""

from __future__ import annotations

import threading
from collections.abc import Callable

from batchserve import _core
from batchserve.server.stats import ServerStats


class PolicyVersion:
    """The served policy's version and the lock that serialises forwards and
    weight updates (re-entrant: a model may update itself from its forward).

    Every applied update goes through :meth:`mark_update` once: it bumps (or
    sets) the version and counts the update in the statistics.

    Args:
        initial: the version stamped before any update.
        stats: where applied updates (and how long they held the lock) are
            counted.
    """

    def __init__(self, initial: int, stats: ServerStats):
        self.model_lock = threading.RLock()
        self._lock = threading.Lock()
        self._value = int(initial)
        self._stats = stats
        self._cascades_to_skip = 0  # see weights.schemes._ApplyUnderModelLock

    @property
    def value(self) -> int:
        """The version stamped on results now."""
        return self._value

    def mark_update(self, version: int | None = None, locked_since_ns: int | None = None) -> None:
        """Bumps (or sets) the policy version; `locked_since_ns`: when the
        model lock was taken to copy the update in (stats: apply time)."""
        with self._lock:
            self._value = self._value + 1 if version is None else int(version)
        apply_ms = None
        if locked_since_ns is not None:
            apply_ms = (_core.monotonic_ns() - locked_since_ns) / 1e6
        self._stats.record_weight_update(apply_ms)

    def skip_next_cascade(self) -> None:
        """The next :meth:`cascade` reports an update counted already."""
        with self._lock:
            self._cascades_to_skip += 1

    def cascade(self) -> None:
        """A torchrl scheme reports an applied update (its cascade into the
        server's ``update_policy_weights_``): counted unless it was already."""
        with self._lock:
            if self._cascades_to_skip:
                self._cascades_to_skip -= 1
                return
        self.mark_update()

    def apply_update(self, apply: Callable[[], int | None]) -> int:
        """Runs ``apply()`` (it copies an update into the model and returns
        its version, ``None`` for one more) under the model lock, between
        batches, and sets the version in the same critical section; stats
        record how long the lock was held. Returns the version now stamped."""
        with self.model_lock:
            locked_ns = _core.monotonic_ns()
            self.mark_update(apply(), locked_ns)
            return self._value

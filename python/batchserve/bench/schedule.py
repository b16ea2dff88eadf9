"""The order measurements run in.

For every actor count, systems alternate round by round (A, B, A, B, ...):
slow drifts of a shared machine (another tenant, thermal state) then hit
every system alike instead of whichever happened to run last.
"""

from __future__ import annotations

from typing import NamedTuple


class Slot(NamedTuple):
    actors: int
    round: int
    system: str


def interleave(actor_counts: list[int], systems: list[str], rounds: int) -> list[Slot]:
    """[(actors, round, system)]: counts in order; within a count, each round
    runs every system once, in the given order."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    return [
        Slot(actors, r, system)
        for actors in actor_counts
        for r in range(rounds)
        for system in systems
    ]

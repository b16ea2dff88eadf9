"""A policy factory for the harness tests: serves a few batches, then fails."""

import torch
from tensordict import TensorDict

CALLS_BEFORE_FAILING = 20


class FailingPolicy:
    def __init__(self):
        self.calls = 0

    def __call__(self, td):
        self.calls += 1
        if self.calls > CALLS_BEFORE_FAILING:
            raise RuntimeError("policy exploded on purpose")
        return TensorDict({"action": torch.zeros(td.batch_size[0], 2)}, batch_size=td.batch_size)


def make():
    return FailingPolicy()


class ExitingPolicy:
    """Raises SystemExit on its first batch: a server worker that dies."""

    def __call__(self, td):
        raise SystemExit("policy asked to exit")


def make_exiting():
    return ExitingPolicy()

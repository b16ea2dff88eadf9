"""Policy factories for the harness tests (``model = "bench_models:NAME"``)."""

from tensordict import TensorDict, lazy_stack


def lazy_output():
    """A model whose output is a lazy stack of its rows, not a TensorDict:
    the harness's floor (``runner.floor_call``) does not apply to it."""

    def policy(td):
        rows = [TensorDict({"action": row["observation"][:2] * 2}) for row in td.unbind(0)]
        return lazy_stack(rows, 0)

    return policy

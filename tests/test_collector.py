"""batchserve's AsyncBatchedCollector, and batchserve's transports under
torchrl's collector."""

import threading
import warnings

import pytest

torchrl = pytest.importorskip("torchrl")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from tensordict.nn import TensorDictModule  # noqa: E402
from torchrl.collectors import AsyncBatchedCollector as TorchrlAsyncBatchedCollector  # noqa: E402
from torchrl.modules.inference_server._transport import (  # noqa: E402
    InferenceTransport as TorchrlInferenceTransport,
)
from torchrl.testing.mocking_classes import CountingEnv  # noqa: E402

import batchserve  # noqa: E402
from batchserve import AsyncBatchedCollector, SharedMemoryTransport, ThreadingTransport  # noqa: E402

NUM_ENVS = 3


class _ConstantAction(nn.Module):
    """Acts ``bias`` on every step, so a weight update shows in the actions."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.bias = nn.Parameter(torch.full((1,), value))

    def forward(self, observation):
        return (torch.zeros_like(observation) + self.bias.detach()).to(observation.dtype)


def _policy(value: float = 1.0):
    return TensorDictModule(_ConstantAction(value), in_keys=["observation"], out_keys=["action"])


def _envs():
    return [lambda: CountingEnv(max_steps=1000)] * NUM_ENVS


def _collector(cls=AsyncBatchedCollector, **kwargs):
    kwargs.setdefault("frames_per_batch", 12)
    kwargs.setdefault("total_frames", 36)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchrl's default-change notice
        return cls(_envs(), policy=_policy(), env_backend="threading", **kwargs)


def test_batchserve_transports_are_torchrl_transports():
    assert isinstance(ThreadingTransport(), TorchrlInferenceTransport)
    assert issubclass(SharedMemoryTransport, TorchrlInferenceTransport)
    assert issubclass(batchserve.RayTransport, TorchrlInferenceTransport)


@pytest.mark.timeout(120)
def test_torchrl_collector_takes_a_batchserve_transport():
    collector = _collector(TorchrlAsyncBatchedCollector, transport=ThreadingTransport())
    try:
        frames = sum(batch.numel() for batch in collector)
    finally:
        collector.shutdown()
    assert frames == 36


@pytest.mark.timeout(120)
def test_collects_the_frames_on_batchserve_server():
    collector = _collector()
    try:
        assert isinstance(collector._server, batchserve.InferenceServer)
        batches = list(collector)
        stats = collector.server_stats()
    finally:
        collector.shutdown()
    assert [batch.numel() for batch in batches] == [12, 12, 12]
    assert stats["requests"] >= 36
    assert (batches[0]["action"] == 1).all()


@pytest.mark.timeout(120)
def test_serves_a_given_batchserve_transport():
    transport = ThreadingTransport()
    collector = _collector(transport=transport)
    try:
        assert collector._server.transport is transport
        frames = sum(batch.numel() for batch in collector)
    finally:
        collector.shutdown()
    assert frames == 36


@pytest.mark.timeout(120)
def test_weight_update_reaches_the_policy_and_its_version():
    collector = _collector(total_frames=-1, policy_version=3)
    try:
        assert collector.policy_version == 3
        iterator = iter(collector)
        next(iterator)
        collector.update_policy_weights_(_policy(5.0))
        assert collector.policy_version == 4
        # Requests already queued may still see the old weights; a later batch
        # is served after the update.
        for batch in iterator:
            if (batch["action"] == 5).all():
                break
        assert (batch["policy_version"] == 4).all()
    finally:
        collector.shutdown()


@pytest.mark.timeout(120)
def test_shutdown_stops_the_server():
    collector = _collector()
    for _ in collector:
        pass
    server = collector._server
    collector.shutdown()
    assert not server.is_alive


def test_signature_is_torchrl_s():
    import inspect

    assert inspect.signature(AsyncBatchedCollector) == inspect.signature(
        TorchrlAsyncBatchedCollector
    )
    with pytest.raises(TypeError):
        AsyncBatchedCollector(_envs(), policy=_policy(), frames_per_batch=4, not_an_argument=1)


@pytest.mark.timeout(120)
def test_collector_requests_take_the_fast_path():
    collector = _collector(total_frames=120)
    try:
        assert all(isinstance(c, batchserve.collector.CollectorClient)
                   for c in collector._clients)
        batches = list(collector)
        stats = collector.server_stats()
    finally:
        collector.shutdown()
    assert sum(batch.numel() for batch in batches) == 120
    # The first request of each schema (a reset observation, then one with
    # the previous action) teaches it on the general path; the rest are fast.
    assert stats["fast_path_fraction"] > 0.8, stats["fast_path_refusals"]
    # Every environment was stepped. Which ones a given batch holds depends
    # on how the threads were scheduled (under load the last batch held
    # frames of two of the three), so the run as a whole is what is checked.
    stepped = torch.cat([batch["env_index"].reshape(-1) for batch in batches])
    assert sorted(set(stepped.tolist())) == list(range(NUM_ENVS))


class _ModeAction(nn.Module):
    """Acts the code of the interaction type its forward runs under."""

    def forward(self, observation):
        from tensordict.nn.probabilistic import interaction_type

        mode = interaction_type()
        code = -1 if mode is None else ["mode", "median", "mean", "random",
                                         "deterministic"].index(mode.value)
        return torch.full_like(observation, code)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["deterministic", "random"])
def test_the_exploration_type_reaches_the_forward(mode):
    from tensordict.nn import InteractionType

    policy = TensorDictModule(_ModeAction(), in_keys=["observation"], out_keys=["action"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        collector = AsyncBatchedCollector(
            _envs(), policy=policy, env_backend="threading", frames_per_batch=12,
            total_frames=36, exploration_type=InteractionType(mode),
        )
    try:
        actions = torch.cat([batch["action"].reshape(-1) for batch in collector])
        stats = collector.server_stats()
    finally:
        collector.shutdown()
    code = {"deterministic": 4, "random": 3}[mode]
    assert (actions == code).all()
    assert stats["fast_path_requests"] > 0


def test_a_collector_client_stamps_without_touching_the_caller_s_request():
    from tensordict import TensorDict
    from tensordict.nn import InteractionType

    from batchserve.batching.collate import INTERACTION_TYPE_KEY
    from batchserve.collector import CollectorClient

    transport = ThreadingTransport()
    seen = []

    def model(td):
        seen.append(td.batch_size)
        return td.clone()

    with batchserve.InferenceServer(model, transport):
        client = CollectorClient(transport.client(), InteractionType.MODE)
        td = TensorDict({"observation": torch.zeros(1)})
        out = client(td)
        future_out = client.submit(td).result(timeout=30)
    assert INTERACTION_TYPE_KEY not in td.keys()
    assert out["observation"].tolist() == [0.0]
    assert future_out["observation"].tolist() == [0.0]
    assert len(seen) == 2


class _ThreadRecordingEnv(CountingEnv):
    """CountingEnv that records the thread of each step and fails on request."""

    def __init__(self, threads: set, fail_at: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._threads, self._fail_at = threads, fail_at

    def _step(self, tensordict):
        self._threads.add(threading.current_thread().name)
        if self._fail_at is not None and int(self.count.max()) >= self._fail_at:
            raise RuntimeError(f"environment failure at step {self._fail_at}")
        return super()._step(tensordict)


def _transitions_by_env(batches) -> dict:
    """Each env's observations in the order collected."""
    by_env = {}
    for batch in batches:
        for transition in batch.unbind(0):
            index = int(transition["env_index"])
            by_env.setdefault(index, []).append(int(transition["observation"]))
    return by_env


@pytest.mark.timeout(120)
def test_threads_step_their_own_environment_as_torchrl_s_pool_would():

    threads: set = set()

    def make_env():
        return _ThreadRecordingEnv(threads, max_steps=1000)

    runs = {}
    for cls in (AsyncBatchedCollector, TorchrlAsyncBatchedCollector):
        threads.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            collector = cls([make_env] * NUM_ENVS, policy=_policy(), env_backend="threading",
                            frames_per_batch=12, total_frames=48)
        try:
            batches = list(collector)
            pool_envs = list(collector.env.envs)
        finally:
            collector.shutdown()
        runs[cls] = batches, set(threads), pool_envs
    (mine, my_threads, my_envs), (theirs, their_threads, _) = runs.values()
    # Stepped by the collector's env threads, on the pool's environments.
    assert my_threads <= {f"AsyncBatchedCollector-env-{i}" for i in range(NUM_ENVS)}
    assert not their_threads & my_threads  # torchrl's steps run on its pool's executor
    assert all(env.count.max() > 0 for env in my_envs)
    # The same transitions: keys, shapes and dtypes, and every env counting
    # from its reset, one step per transition.
    assert set(mine[0].keys(True, True)) == set(theirs[0].keys(True, True))
    for key in mine[0].keys(True, True):
        assert mine[0][key].dtype == theirs[0][key].dtype, key
        assert mine[0][key].shape == theirs[0][key].shape, key
    by_env = _transitions_by_env(mine)
    assert sorted(by_env) == list(range(NUM_ENVS))
    for observations in by_env.values():
        assert observations == list(range(len(observations)))
    for batch in mine:
        assert ((batch["next", "observation"] - batch["observation"]) == 1).all()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cls", [AsyncBatchedCollector, TorchrlAsyncBatchedCollector])
def test_an_environment_error_reaches_the_iterator(cls):
    def make_env():
        return _ThreadRecordingEnv(set(), fail_at=3, max_steps=1000)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        collector = cls([make_env] * NUM_ENVS, policy=_policy(), env_backend="threading",
                        frames_per_batch=12, total_frames=48)
    try:
        with pytest.raises(RuntimeError, match="collector worker thread raised") as raised:
            list(collector)
    finally:
        collector.shutdown()
    assert "environment failure at step 3" in str(raised.value.__cause__)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cls", [AsyncBatchedCollector, TorchrlAsyncBatchedCollector])
def test_pause_parks_the_env_threads_and_collection_resumes(cls):
    collector = _collector(cls, total_frames=-1)
    try:
        batches = iter(collector)
        next(batches)
        with collector.pause():
            steps = [int(env.count.max()) for env in collector.env.envs]
            requests = collector.server_stats()["requests"]
            # Parked: nothing moves while the context is held.
            threading.Event().wait(0.2)
            assert [int(env.count.max()) for env in collector.env.envs] == steps
            assert collector.server_stats()["requests"] == requests
        assert next(batches).numel() == 12
    finally:
        collector.shutdown()

"""Workloads: observations and the policy served."""

from __future__ import annotations

import contextlib
import importlib
import threading
import time

import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import (
    InteractionType,
    NormalParamExtractor,
    ProbabilisticTensorDictModule,
    TensorDictModule,
    TensorDictSequential,
    set_interaction_type,
)

from batchserve.bench.scenario import Scenario
from batchserve.config import set_thread_nice


def make_leaf(shape, dtype: str) -> torch.Tensor:
    """Random data of one request leaf: normal floats, or integers in [0, 255)."""
    dt = getattr(torch, dtype)
    if dt.is_floating_point:
        return torch.randn(list(shape)).to(dt)
    return torch.randint(0, 255, list(shape), dtype=dt)


def leaf_specs(scenario: Scenario) -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype) of each leaf a request carries: "observation",
    and "pixels" when the scenario has an image."""
    specs = [("observation", list(scenario.observation_shape), scenario.observation_dtype)]
    if scenario.image_shape is not None:
        specs.append(("pixels", list(scenario.image_shape), scenario.image_dtype))
    return specs


def leaves_of(specs) -> dict[str, torch.Tensor]:
    """One (unbatched) request's leaves, random, for ``specs``
    (:func:`leaf_specs`; an actor process gets those, not the scenario)."""
    return {key: make_leaf(shape, dtype) for key, shape, dtype in specs}


def make_leaves(scenario: Scenario) -> dict[str, torch.Tensor]:
    """One (unbatched) request's leaves, built once per actor and sent
    with every request."""
    return leaves_of(leaf_specs(scenario))


def make_observation(scenario: Scenario) -> torch.Tensor:
    """One (unbatched) observation of the scenario's shape and dtype."""
    return make_leaf(scenario.observation_shape, scenario.observation_dtype)


class ConvPolicy(nn.Module):
    """A small Atari-style conv net: uint8 frames in, action logits out."""

    def __init__(self, channels: int, height: int, width: int, actions: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, channels, height, width)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, 256), nn.ReLU(), nn.Linear(256, actions))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        x = observation.float() / 255.0
        return self.head(self.features(x))


class ObsConvPolicy(nn.Module):
    """An observation vector and an image: the MLP's hidden features of
    the one and the conv net's of the other, joined, into action logits."""

    def __init__(self, scenario: Scenario):
        super().__init__()
        c, h, w = scenario.image_shape
        self.pixels = ConvPolicy(c, h, w, scenario.actions).features
        layers, width = _hidden_layers(scenario)
        self.observation = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.pixels(torch.zeros(1, c, h, w)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat + width, 256), nn.ReLU(),
                                  nn.Linear(256, scenario.actions))

    def forward(self, observation: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        features = self.pixels(pixels.float() / 255.0)
        return self.head(torch.cat([features, self.observation(observation.float())], dim=-1))


def _hidden_layers(scenario: Scenario) -> tuple[list[nn.Module], int]:
    """The scenario's observation, flattened, through its hidden widths
    (Linear + ReLU each): the layers and the width they end with."""
    widths = [int(torch.Size(scenario.observation_shape).numel()), *scenario.hidden]
    layers: list[nn.Module] = [nn.Flatten(start_dim=-len(scenario.observation_shape))]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return layers, widths[-1]


def _mlp(scenario: Scenario, outputs: int) -> nn.Sequential:
    """The hidden layers, then a Linear to `outputs`."""
    layers, width = _hidden_layers(scenario)
    return nn.Sequential(*layers, nn.Linear(width, outputs))


def make_stochastic_policy(scenario: Scenario) -> TensorDictSequential:
    """What torchrl users serve: the MLP writes a Normal's "loc" and "scale"
    (NormalParamExtractor), a ProbabilisticTensorDictModule samples "action"
    from it under the interaction type in force and writes its log-probability
    ("action_log_prob")."""
    params = TensorDictModule(
        nn.Sequential(_mlp(scenario, 2 * scenario.actions), NormalParamExtractor()),
        in_keys=["observation"], out_keys=["loc", "scale"],
    )
    sample = ProbabilisticTensorDictModule(
        in_keys=["loc", "scale"], out_keys=["action"],
        distribution_class=torch.distributions.Normal, return_log_prob=True,
    )
    return TensorDictSequential(params, sample)


def make_policy(scenario: Scenario):
    """The policy: a TensorDictModule reading "observation", writing "action"
    (and, for the "policy" model, "loc", "scale" and "action_log_prob")."""
    torch.manual_seed(0)
    if scenario.model == "mlp":
        return TensorDictModule(
            _mlp(scenario, scenario.actions), in_keys=["observation"], out_keys=["action"]
        )
    if scenario.model == "policy":
        return make_stochastic_policy(scenario)
    if scenario.model == "obs_conv":
        return TensorDictModule(
            ObsConvPolicy(scenario), in_keys=["observation", "pixels"], out_keys=["action"]
        )
    if scenario.model == "conv":
        c, h, w = scenario.observation_shape
        return TensorDictModule(
            ConvPolicy(c, h, w, scenario.actions), in_keys=["observation"], out_keys=["action"]
        )
    module_name, _, factory_name = scenario.model.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model factory {scenario.model!r}: {exc}") from exc
    return factory()


class ForwardRecord:
    """What a RecordingModel records in its window: a histogram of batch
    sizes and every forward's time, under a lock (a server may run its
    forwards on more than one thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = False
        self._sizes: dict[int, int] = {}
        self._forward_ns: list[int] = []

    def start(self) -> None:
        with self._lock:
            self._sizes, self._forward_ns = {}, []
            self._active = True

    def add(self, batch_size: int, forward_ns: int) -> None:
        with self._lock:
            if self._active:
                self._sizes[batch_size] = self._sizes.get(batch_size, 0) + 1
                self._forward_ns.append(forward_ns)

    def stop(self) -> tuple[dict[int, int], list[int]]:
        with self._lock:
            self._active = False
            return dict(self._sizes), list(self._forward_ns)


class SharedForwardRecord:
    """A ForwardRecord in shared memory, for a policy served in a child
    process (a ProcessInferenceServer's): the child's RecordingModel writes,
    the parent opens and closes the window and reads. Pickled to the child
    with the policy factory (torch shares the tensors' memory). One writer:
    each server runs its forwards on one thread. A forward that ends while
    the parent closes the window may be left out; forwards past
    ``capacity`` count in the histogram only."""

    def __init__(self, max_batch_size: int, capacity: int = 1 << 18):
        # [window open, forwards recorded]; numpy views (set per process,
        # not pickled) keep a record's cost to a few hundred ns per forward.
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._sizes = torch.zeros(max_batch_size + 1, dtype=torch.int64).share_memory_()
        self._forward_ns = torch.zeros(capacity, dtype=torch.int64).share_memory_()
        self._views = None

    def __getstate__(self):
        return {"_state": self._state, "_sizes": self._sizes, "_forward_ns": self._forward_ns}

    def __setstate__(self, state):
        self.__dict__.update(state, _views=None)

    def _arrays(self):
        if self._views is None:
            self._views = (self._state.numpy(), self._sizes.numpy(), self._forward_ns.numpy())
        return self._views

    def start(self) -> None:
        state, sizes, _ = self._arrays()
        sizes[:] = 0
        state[1] = 0
        state[0] = 1

    def add(self, batch_size: int, forward_ns: int) -> None:
        state, sizes, forward = self._arrays()
        if state[0]:
            sizes[min(batch_size, len(sizes) - 1)] += 1
            count = int(state[1])
            if count < len(forward):
                forward[count] = forward_ns
                state[1] = count + 1

    def stop(self) -> tuple[dict[int, int], list[int]]:
        state, sizes, forward = self._arrays()
        state[0] = 0
        histogram = {size: int(n) for size, n in enumerate(sizes) if n}
        return histogram, forward[: int(state[1])].tolist()


class RecordingModel:
    """Wraps the policy to record what each server really ran: batch sizes
    and forward times, measured the same way for every system, and only
    while a measurement window is open (between start() and stop()), into
    ``record`` (a ForwardRecord; a SharedForwardRecord for a policy served
    in another process, see :func:`served_policy`).

    ``threads`` (the scenario's torch_threads) is applied in the thread that
    runs the forward, on its first call, whichever system's server that
    thread belongs to: torch's intra-op setting is per thread, so setting it
    in the main thread leaves a server thread with torch's default, whose
    OpenMP workers spin between forwards on the cores the actors need.
    ``nice`` (the scenario's server_nice) is that thread's nice value, set
    there too, so that every system's server gets it the same way; never on
    the main thread, whose forwards are the harness's own (the null row's
    timed forwards, a CUDA graph's capture) and whose nice value the actors
    started later would inherit.
    """

    def __init__(self, policy, device: str = "cpu", threads: int | None = None,
                 record: ForwardRecord | SharedForwardRecord | None = None,
                 nice: int | None = None):
        self.policy = policy
        self.record = record if record is not None else ForwardRecord()
        self._threads = threads
        self._nice = nice
        self._configured = threading.local()
        self._synchronize = torch.device(device).type == "cuda"

    def start(self) -> None:
        self.record.start()

    def stop(self) -> tuple[dict[int, int], list[int]]:
        """Closes the window; returns (batch-size histogram, forward times)."""
        return self.record.stop()

    def __call__(self, td):
        if not getattr(self._configured, "done", False):
            if self._threads is not None:
                torch.set_num_threads(self._threads)
            if self._nice is not None and threading.current_thread() is not threading.main_thread():
                set_thread_nice(self._nice)
            self._configured.done = True
        t0 = time.perf_counter_ns()
        out = self.policy(td)
        if self._synchronize:  # time the kernels, not their launch
            torch.cuda.synchronize()
        self.record.add(td.batch_size[0] if td.batch_dims else 1, time.perf_counter_ns() - t0)
        return out

    def to(self, device):
        if hasattr(self.policy, "to"):
            self.policy.to(device)
        return self


def recording_model(scenario: Scenario) -> RecordingModel:
    """The scenario's policy, recorded. For a process server the record is
    shared: the child builds its own RecordingModel around the same record
    (:func:`served_policy`), and this one in the parent only opens and
    closes the window (and gives the transports their specs)."""
    record = SharedForwardRecord(scenario.max_batch_size) if scenario.server == "process" else None
    return RecordingModel(make_policy(scenario), scenario.device, scenario.torch_threads, record,
                          scenario.server_nice)


def served_policy(scenario: Scenario, record: SharedForwardRecord) -> RecordingModel:
    """A ProcessInferenceServer's policy_factory (with functools.partial):
    the scenario's policy in the child, recording into the parent's record."""
    return RecordingModel(make_policy(scenario), scenario.device, scenario.torch_threads, record,
                          scenario.server_nice)


def request(leaves: dict[str, torch.Tensor]) -> TensorDict:
    """What an actor sends per step: a new TensorDict of its leaves."""
    return TensorDict(dict(leaves))


def interaction_context(scenario: Scenario):
    """The scenario's interaction type as a context manager: tensordict's
    set_interaction_type (process-wide, so it is entered once around a
    measurement, not per actor thread), or a no-op when none is set."""
    if scenario.interaction_type is None:
        return contextlib.nullcontext()
    return set_interaction_type(InteractionType(scenario.interaction_type))


def wrap_client(scenario: Scenario, client):
    """One actor's callable around a transport's client: the client itself,
    or (client "policy_client") torchrl's PolicyClientModule around it,
    built as torchrl's AsyncBatchedCollector builds its clients: the
    interaction type passed explicitly, so every request carries it (the
    int8 scalar "_torchrl_inference_interaction_type"; -1 when the scenario
    sets none)."""
    if scenario.client == "direct":
        return client
    from torchrl.modules.inference_server import PolicyClientModule

    mode = (InteractionType(scenario.interaction_type)
            if scenario.interaction_type is not None else None)
    return PolicyClientModule(client, interaction_type=mode)


def client_factory(scenario: Scenario, transport):
    """A function making one actor's callable (:func:`wrap_client` of a new
    client of the transport). Call it in the caller's thread; torchrl is
    imported here, up front."""
    if scenario.client == "direct":
        return transport.client
    import torchrl.modules.inference_server  # noqa: F401  (now, not in the actors' threads)

    return lambda: wrap_client(scenario, transport.client())


def make_client(scenario: Scenario, transport):
    """One actor's callable (see :func:`client_factory`)."""
    return client_factory(scenario, transport)()


def collate_fn(scenario: Scenario):
    """The servers' collate_fn: None (each server's default) or
    tensordict's maybe_dense_stack, which torchrl's AsyncBatchedCollector
    imports from tensordict and passes to its InferenceServer."""
    if scenario.collate == "default":
        return None
    from tensordict import maybe_dense_stack

    return maybe_dense_stack

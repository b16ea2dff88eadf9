"""Workloads: observations and the policy served."""

from __future__ import annotations

import importlib
import threading
import time

import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from batchserve.bench.scenario import Scenario


def make_observation(scenario: Scenario) -> torch.Tensor:
    """One (unbatched) observation of the scenario's shape and dtype."""
    dtype = getattr(torch, scenario.observation_dtype)
    shape = scenario.observation_shape
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(0, 255, shape, dtype=dtype)


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


def make_policy(scenario: Scenario):
    """The policy: a TensorDictModule reading "observation", writing "action"."""
    torch.manual_seed(0)
    if scenario.model == "mlp":
        widths = [int(torch.Size(scenario.observation_shape).numel()), *scenario.hidden]
        layers: list[nn.Module] = [nn.Flatten(start_dim=-len(scenario.observation_shape))]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], scenario.actions))
        return TensorDictModule(
            nn.Sequential(*layers), in_keys=["observation"], out_keys=["action"]
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


class RecordingModel:
    """Wraps the policy to record what each server really ran: batch sizes
    and forward times, measured the same way for every system, and only
    while a measurement window is open (between start() and stop()).

    ``threads`` (the scenario's torch_threads) is applied in the thread that
    runs the forward, on its first call, whichever system's server that
    thread belongs to: torch's intra-op setting is per thread, so setting it
    in the main thread leaves a server thread with torch's default, whose
    OpenMP workers spin between forwards on the cores the actors need.
    """

    def __init__(self, policy, device: str = "cpu", threads: int | None = None):
        self.policy = policy
        self._threads = threads
        self._configured = threading.local()
        self._synchronize = torch.device(device).type == "cuda"
        self._lock = threading.Lock()
        self._active = False
        self.batch_sizes: dict[int, int] = {}
        self.forward_ns: list[int] = []

    def start(self) -> None:
        with self._lock:
            self.batch_sizes, self.forward_ns = {}, []
            self._active = True

    def stop(self) -> tuple[dict[int, int], list[int]]:
        """Closes the window; returns (batch-size histogram, forward times)."""
        with self._lock:
            self._active = False
            return dict(self.batch_sizes), list(self.forward_ns)

    def __call__(self, td):
        if self._threads is not None and not getattr(self._configured, "done", False):
            torch.set_num_threads(self._threads)
            self._configured.done = True
        t0 = time.perf_counter_ns()
        out = self.policy(td)
        if self._synchronize:  # time the kernels, not their launch
            torch.cuda.synchronize()
        elapsed = time.perf_counter_ns() - t0
        n = td.batch_size[0] if td.batch_dims else 1
        with self._lock:
            if self._active:
                self.batch_sizes[n] = self.batch_sizes.get(n, 0) + 1
                self.forward_ns.append(elapsed)
        return out

    def to(self, device):
        if hasattr(self.policy, "to"):
            self.policy.to(device)
        return self


def request(observation: torch.Tensor) -> TensorDict:
    """What an actor sends per step."""
    return TensorDict({"observation": observation})

"""Scenarios: what a benchmark run measures.

A scenario file (TOML, see ``benchmarks/*.toml``) names a workload family;
command-line flags override any of its fields. Fields:

    name            label in tables and JSON
    actors          "threads" or "processes"
    actor_counts    the sweep, e.g. [1, 8, 32]
    observation     {shape = [64], dtype = "float32"}
    model           "mlp", "conv" or "package.module:factory"
    hidden          MLP hidden widths, e.g. [256]
    actions         output width of the built-in models
    max_batch_size, min_batch_size, timeout (s), device
    duration        measured seconds per measurement (or `requests`)
    requests        measured requests per measurement (overrides duration)
    warmup          seconds run before measuring, excluded
    rounds          alternating rounds per system
    torch_threads   torch.set_num_threads for the run, in the main thread and
                    in the thread that runs each server's forward (default:
                    torch's own); on a small machine intra-op threads of the
                    server's forward compete with the actors for the cores
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DTYPES = ("float32", "float64", "float16", "bfloat16", "uint8", "int64", "int32")


@dataclass
class Scenario:
    name: str = "mlp_threads"
    actors: str = "threads"
    actor_counts: list[int] = field(default_factory=lambda: [1, 8, 32])
    observation_shape: list[int] = field(default_factory=lambda: [64])
    observation_dtype: str = "float32"
    model: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256])
    actions: int = 8
    max_batch_size: int = 64
    min_batch_size: int = 1
    timeout: float = 0.001
    device: str = "cpu"
    duration: float = 2.0
    requests: int | None = None
    warmup: float = 0.5
    rounds: int = 2
    torch_threads: int | None = None

    def validate(self) -> Scenario:
        if self.actors not in ("threads", "processes"):
            raise ValueError(f"actors must be 'threads' or 'processes', not {self.actors!r}")
        if not self.actor_counts or any(int(n) < 1 for n in self.actor_counts):
            raise ValueError("actor_counts must be positive integers")
        if self.observation_dtype not in DTYPES:
            raise ValueError(
                f"observation dtype {self.observation_dtype!r} is not one of {', '.join(DTYPES)}"
            )
        if self.model not in ("mlp", "conv") and ":" not in self.model:
            raise ValueError(
                f"model must be 'mlp', 'conv' or 'module:factory', not {self.model!r}"
            )
        if self.model == "conv" and len(self.observation_shape) != 3:
            raise ValueError("the conv model needs a [channels, height, width] observation")
        for name in ("max_batch_size", "min_batch_size", "rounds", "actions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.timeout < 0 or self.warmup < 0:
            raise ValueError("timeout and warmup must be non-negative")
        if self.requests is None and not self.duration > 0:
            raise ValueError("duration must be positive")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads must be at least 1")
        if self.requests is not None and self.requests < max(self.actor_counts):
            raise ValueError(
                "requests must be at least the largest actor count "
                f"({max(self.actor_counts)}): every actor makes at least one"
            )
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


HEADLINE = Scenario()
"""No arguments: the design's reference workload (MLP 64->256->8, float32[64],
max_batch_size 64, timeout 1 ms, CPU) at 1, 8 and 32 actor threads."""

QUICK = {"actor_counts": [1, 8], "duration": 0.75, "requests": None, "warmup": 0.25, "rounds": 1}
"""--quick: the same family, fewer and shorter measurements."""


PACKAGED = os.path.join(os.path.dirname(__file__), "scenarios")
"""The scenario files of benchmarks/, installed with the package."""


def read(path: str) -> tuple[dict, str]:
    """A scenario file's fields and its default name (the file's stem);
    `path` may omit the .toml suffix. A name that is no file here is looked
    up among the packaged scenarios (so `benchmarks/atari_threads` and
    `atari_threads` work outside the repo)."""
    stem = path if path.endswith(".toml") else path + ".toml"
    candidates = [stem, path, os.path.join(PACKAGED, os.path.basename(stem))]
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                return tomllib.load(f), os.path.basename(candidate).split(".")[0]
    raise FileNotFoundError(path)


def load(path: str) -> Scenario:
    """A throughput scenario from a TOML file (see :func:`read`)."""
    data, default_name = read(path)
    return from_mapping(data, default_name=default_name)


def from_mapping(data: dict, default_name: str = "scenario") -> Scenario:
    data = dict(data)
    observation = data.pop("observation", None)
    if observation is not None:
        data["observation_shape"] = list(observation.get("shape", HEADLINE.observation_shape))
        data["observation_dtype"] = observation.get("dtype", "float32")
    data.setdefault("name", default_name)
    known = {f.name for f in dataclasses.fields(Scenario)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown scenario field(s): {', '.join(unknown)}")
    return Scenario(**data).validate()


def config_of(cls, data: dict, label: str, **overrides):
    """A ``kind`` scenario's dataclass (soak, weight_sync) from its file's
    fields and command-line overrides, validated; unknown fields are an
    error naming them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {label} field(s): {', '.join(unknown)}")
    return dataclasses.replace(cls(**data), **overrides).validate()


def packaged_names() -> list[str]:
    try:
        return sorted(f[: -len(".toml")] for f in os.listdir(PACKAGED) if f.endswith(".toml"))
    except OSError:
        return []

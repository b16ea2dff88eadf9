"""Scenarios: what a benchmark run measures.

A scenario file (TOML, see ``benchmarks/*.toml``) names a workload family;
command-line flags override any of its fields. Fields:

    name            label in tables and JSON
    actors          "threads" or "processes"
    server          where each system's server runs: "thread" (its
                    InferenceServer, in the parent; thread actors reach it
                    through its ThreadingTransport) or "process" (its
                    ProcessInferenceServer: the policy is built in a child
                    process and every actor, thread or process, calls through
                    the system's SharedMemoryTransport)
    single_file     batchserve's transport with single_file=True (its
                    ThreadingTransport or SharedMemoryTransport): an actor
                    thread passes its batch's wake-up on at its next call,
                    so the threads take turns between calls (docs/api.md)
    actor_counts    the sweep, e.g. [1, 8, 32]
    observation     {shape = [64], dtype = "float32"}
    image           {shape = [3, 84, 84], dtype = "uint8"}: requests also
                    carry an image, "pixels" (absent: none)
    model           "mlp", "conv", "obs_conv", "policy" or
                    "package.module:factory"; "obs_conv" reads both the
                    observation (an MLP) and the image (the conv net);
                    "policy" is a torchrl-style stochastic actor: a
                    TensorDictSequential of the MLP (to 2 x actions) and
                    NormalParamExtractor ("loc", "scale"), then a
                    ProbabilisticTensorDictModule sampling a Normal
                    ("action", with its log-probability)
    hidden          MLP hidden widths, e.g. [256]
    actions         output width of the built-in models
    client          how actors call: "direct" (the transport's client) or
                    "policy_client" (torchrl's PolicyClientModule around it,
                    as torchrl's AsyncBatchedCollector calls its server: every
                    request stamped with the interaction type; thread actors)
    interaction_type  tensordict's interaction type the run happens under
                    ("random", "mode", "mean", "median", "deterministic"):
                    set process-wide for the measurement and stamped on every
                    request by a "policy_client"; absent: none is set
    collate         the servers' collate_fn: "default" (each server's own) or
                    "maybe_dense_stack" (tensordict's, what torchrl's
                    AsyncBatchedCollector gives its server)
    max_batch_size, min_batch_size, timeout (s), device
    static_batch_size  CUDA-graphed batch sizes, e.g. [8, 16, 32, 64]
                    (batchserve serves them as buckets; torchrl, which takes
                    one size, gets the largest); needs a CUDA device
    duration        measured seconds per measurement (or `requests`)
    requests        measured requests per measurement (overrides duration)
    warmup          seconds run before measuring, excluded
    rounds          alternating rounds per system
    torch_threads   torch.set_num_threads for the run, in the main thread and
                    in the thread that runs each server's forward (default:
                    torch's own); on a small machine intra-op threads of the
                    server's forward compete with the actors for the cores
    server_nice     the nice value of the thread that runs each server's
                    forward (Linux), set on its first forward, every
                    system's alike (default: left as it is); for process
                    actors or a server process only (with thread actors a
                    lone caller's forward may run on its own thread)
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
from dataclasses import dataclass, field

from batchserve.config import nice_value

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DTYPES = ("float32", "float64", "float16", "bfloat16", "uint8", "int64", "int32")
MODELS = ("mlp", "conv", "obs_conv", "policy")
CLIENTS = ("direct", "policy_client")
COLLATES = ("default", "maybe_dense_stack")
SERVERS = ("thread", "process")
# tensordict.nn.InteractionType's values (not imported here: loading a
# scenario stays cheap).
INTERACTION_TYPES = ("random", "mode", "mean", "median", "deterministic")


@dataclass
class Scenario:
    name: str = "mlp_threads"
    actors: str = "threads"
    server: str = "thread"
    single_file: bool = False
    actor_counts: list[int] = field(default_factory=lambda: [1, 8, 32])
    observation_shape: list[int] = field(default_factory=lambda: [64])
    observation_dtype: str = "float32"
    image_shape: list[int] | None = None
    image_dtype: str = "uint8"
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
    server_nice: int | None = None
    client: str = "direct"
    interaction_type: str | None = None
    collate: str = "default"
    static_batch_size: list[int] | None = None

    def validate(self) -> Scenario:
        if self.actors not in ("threads", "processes"):
            raise ValueError(f"actors must be 'threads' or 'processes', not {self.actors!r}")
        if self.server not in SERVERS:
            raise ValueError(f"server must be one of {', '.join(SERVERS)}, not {self.server!r}")
        if not self.actor_counts or any(int(n) < 1 for n in self.actor_counts):
            raise ValueError("actor_counts must be positive integers")
        if self.observation_dtype not in DTYPES:
            raise ValueError(
                f"observation dtype {self.observation_dtype!r} is not one of {', '.join(DTYPES)}"
            )
        if self.model not in MODELS and ":" not in self.model:
            raise ValueError(
                f"model must be 'mlp', 'conv', 'obs_conv', 'policy' or 'module:factory', "
                f"not {self.model!r}"
            )
        if self.model == "conv" and len(self.observation_shape) != 3:
            raise ValueError("the conv model needs a [channels, height, width] observation")
        if self.image_shape is not None:
            if len(self.image_shape) != 3 or min(self.image_shape) < 1:
                raise ValueError("image shape must be [channels, height, width]")
            if self.image_dtype not in DTYPES:
                raise ValueError(
                    f"image dtype {self.image_dtype!r} is not one of {', '.join(DTYPES)}")
        if self.model == "obs_conv" and self.image_shape is None:
            raise ValueError("the obs_conv model needs an image ([channels, height, width])")
        if self.static_batch_size is not None:
            sizes = list(self.static_batch_size)
            if not sizes or min(sizes) < 1:
                raise ValueError("static_batch_size must be positive batch sizes")
            if max(sizes) < self.max_batch_size:
                raise ValueError("the largest static_batch_size must be at least max_batch_size")
            if not str(self.device).startswith("cuda"):
                raise ValueError("static_batch_size needs a CUDA device (CUDA graphs)")
        for name in ("max_batch_size", "min_batch_size", "rounds", "actions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.timeout < 0 or self.warmup < 0:
            raise ValueError("timeout and warmup must be non-negative")
        if self.requests is None and not self.duration > 0:
            raise ValueError("duration must be positive")
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}, not {self.client!r}")
        if self.client == "policy_client" and self.actors != "threads":
            raise ValueError(
                "client 'policy_client' (torchrl's PolicyClientModule) runs with thread actors"
            )
        if self.interaction_type is not None and self.interaction_type not in INTERACTION_TYPES:
            raise ValueError(
                f"interaction_type must be one of {', '.join(INTERACTION_TYPES)}, "
                f"not {self.interaction_type!r}"
            )
        if self.collate not in COLLATES:
            raise ValueError(
                f"collate must be one of {', '.join(COLLATES)}, not {self.collate!r}"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads must be at least 1")
        if self.server_nice is not None:
            nice_value("server_nice", self.server_nice)
            if not self.shared_memory:
                raise ValueError(
                    "server_nice is for process actors or a server process: with thread "
                    "actors a lone caller's forward may run on its own thread")
        if self.requests is not None and self.requests < max(self.actor_counts):
            raise ValueError(
                "requests must be at least the largest actor count "
                f"({max(self.actor_counts)}): every actor makes at least one"
            )
        return self

    @property
    def shared_memory(self) -> bool:
        """Whether the systems serve through their SharedMemoryTransport:
        actors in processes, or a server in one."""
        return self.actors == "processes" or self.server == "process"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


HEADLINE = Scenario()
"""No arguments: the design's reference workload (MLP 64->256->8, float32[64],
max_batch_size 64, timeout 1 ms, CPU) at 1, 8 and 32 actor threads."""

QUICK = {"actor_counts": [1, 8], "duration": 0.75, "requests": None, "warmup": 0.25, "rounds": 1}
"""--quick: the same family, fewer and shorter measurements."""


PACKAGED = os.path.join(os.path.dirname(__file__), "scenarios")
"""The scenario files of benchmarks/, installed with the package (in a
regular install; see :func:`_packaged_dir`)."""


def _packaged_dir():
    """The installed scenario folder (a Traversable: importlib.resources
    sees an editable install's installed files too, which live apart from
    the sources), or None when there is none."""
    try:
        folder = importlib.resources.files("batchserve.bench") / "scenarios"
    except (ModuleNotFoundError, TypeError):
        folder = pathlib.Path(PACKAGED)
    return folder if folder.is_dir() else None


def read(path: str) -> tuple[dict, str]:
    """A scenario file's fields and its default name (the file's stem);
    `path` may omit the .toml suffix. A name that is no file here is looked
    up among the packaged scenarios (so `benchmarks/atari_threads` and
    `atari_threads` work outside the repo)."""
    stem = path if path.endswith(".toml") else path + ".toml"
    for candidate in (stem, path):
        if os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                return tomllib.load(f), os.path.basename(candidate).split(".")[0]
    packaged = _packaged_dir()
    if packaged is not None:
        installed = packaged / os.path.basename(stem)
        if installed.is_file():
            with installed.open("rb") as f:
                return tomllib.load(f), os.path.basename(stem).split(".")[0]
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
    image = data.pop("image", None)
    if image is not None:
        data["image_shape"] = list(image.get("shape", [3, 84, 84]))
        data["image_dtype"] = image.get("dtype", "uint8")
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
    packaged = _packaged_dir()
    if packaged is None:
        return []
    try:
        return sorted(entry.name[: -len(".toml")] for entry in packaged.iterdir()
                      if entry.name.endswith(".toml"))
    except OSError:
        return []

"""A server hosted in a Ray actor: :class:`RayInferenceServer`
(``InferenceServer(service_backend="ray", policy_factory=...)``, torchrl's
Ray service) and :func:`serve_on_ray`.

The actor builds the policy (``policy_factory()``, so it is made where it
runs) and serves it with batchserve's :class:`~batchserve.InferenceServer`
on a thread of the actor. With the ``"ray"`` transport the actor is its own
inbox: an async actor whose ``call`` puts the request in a
ThreadingTransport's C++ queue and awaits its future, so a remote request is
one actor call and the server's threads batch them. With ``"distributed"``
(torchrl's torch.distributed request/reply transport) clients exchange
tensors with the actor directly and Ray carries only the control calls.
The actor's other methods run in threads, so its event loop keeps taking
calls while a weight update or a shutdown waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict

from batchserve.ray.runtime import RayRuntimeLease, ray_module
from batchserve.ray.transport import RayClient
from batchserve.server.server import InferenceServer
from batchserve.transports.base import transport_kind
from batchserve.transports.threading import ThreadingTransport
from batchserve.weights.updates import check_weights, copy_weights, flat_weights, model_weights

# What the actor's server accepts (InferenceServer's keywords but the model,
# the transport and request_spec, which RayInferenceServer takes itself).
_SERVER_KEYWORDS = frozenset(inspect.signature(InferenceServer.__init__).parameters) - {
    "self", "model", "transport", "request_spec"
}
_RAY_TRANSPORT_OPTIONS = frozenset({"max_queue_size"})  # torchrl's RayTransport's
_SERVICE_OPTIONS = frozenset({"ray_init_config", "remote_config"})
# How often a watcher looks at a shutdown_event that cannot wake it (an
# mp.Event is not waitable with other events): only how late a set event is
# noticed.
_SHUTDOWN_EVENT_POLL_S = 0.1


def _distributed_transport(request_spec, response_spec, options: dict):
    try:
        from torchrl.modules.inference_server._distributed import (
            _DistributedInferenceTransport,
        )
    except ImportError as exc:  # pragma: no cover - exercised without torchrl
        raise ImportError(
            "transport='distributed' is torchrl's torch.distributed transport: "
            "pip install torchrl"
        ) from exc
    return _DistributedInferenceTransport(request_spec, response_spec, **options)


def _set_liveness(client, actor) -> None:
    """A distributed client's waits raise once the actor is gone."""
    from torchrl._comm.ray_runtime import _set_ray_client_liveness

    _set_ray_client_liveness(client, actor)


class _RayServerActor:
    """The Ray actor that owns the policy, the transport and the server.

    Args are those of torchrl's ``_RayInferenceServerActor``. ``transport``
    is ``"ray"`` (the actor is the inbox), ``"distributed"`` (the server
    starts at once when both specs are given, else on the first request,
    whose layout and the policy's answer to it fix the specs) or a transport
    instance (served as given; clients are its own).

    ``__init__`` does not raise: an error building the policy or the server
    is kept and raised by :meth:`ready`, so the caller gets it as its own
    type rather than as Ray's "actor died"."""

    def __init__(
        self,
        policy_factory: Callable[[], Any],
        transport: Any,
        transport_options: dict | None,
        request_spec,
        response_spec,
        num_clients: int | None,
        server_kwargs: dict,
    ):
        self._transport = transport
        self._transport_options = dict(transport_options or {})
        self._server_kwargs = dict(server_kwargs)
        self._receiver_schemes: dict[str, Any] = {}
        self._bootstrap_lock = threading.Lock()
        self.server: InferenceServer | None = None
        self._init_error: BaseException | None = None
        try:
            self.model = policy_factory()
            if transport == "distributed":
                if request_spec is not None:
                    self._start_server(request_spec, response_spec)
            elif transport == "ray":
                self._start_server(request_spec, None)
            else:
                self.server = InferenceServer(
                    self.model, transport, request_spec=request_spec, **self._server_kwargs
                ).start()
        except BaseException as exc:  # noqa: BLE001 - raised by ready()
            self._init_error = exc

    def _start_server(self, request_spec, response_spec) -> None:
        if self._transport == "ray":
            transport = ThreadingTransport(**self._transport_options)
        else:
            transport = _distributed_transport(
                request_spec, response_spec, self._transport_options
            )
        self.server = InferenceServer(
            self.model, transport, request_spec=request_spec if self._transport == "ray" else None,
            **self._server_kwargs,
        ).start()

    async def ready(self) -> dict:
        if self._init_error is not None:
            raise self._init_error
        return self._health()

    # -- requests ("ray": the actor is the inbox) ------------------------------

    async def call(self, td):
        if self.server is None or self._transport != "ray":
            raise RuntimeError("this Ray server takes requests through its transport's clients")
        return await asyncio.wrap_future(self.server.transport.submit(td))

    async def client(self):
        if self.server is None:
            raise RuntimeError("The distributed transport has not established its schema yet.")
        return self.server.client()

    async def bootstrap_distributed(self, request):
        """Starts the distributed server on its first request: the request
        spec is that request, the response spec what the server answers it
        (found by a probe server on a ThreadingTransport, so collation,
        devices and the version stamp are those of the real one)."""
        return await asyncio.to_thread(self._bootstrap, request)

    def _bootstrap(self, request):
        with self._bootstrap_lock:
            if self.server is None:
                probe_kwargs = {
                    k: v for k, v in self._server_kwargs.items()
                    if k not in ("weight_sync", "weight_sync_model_id")
                }
                probe = InferenceServer(self.model, ThreadingTransport(), **probe_kwargs).start()
                try:
                    response = probe.client()(request.clone())
                finally:
                    probe.shutdown()
                self._start_server(request, response)
            return self.server.client()

    # -- state ------------------------------------------------------------------

    def _health(self) -> dict:
        if self.server is None:  # distributed, waiting for its first request
            return {
                "is_alive": True,
                "policy_version": int(self._server_kwargs.get("policy_version", 0)),
                "transport": "distributed",
            }
        kind = self._transport if self._transport in ("ray", "distributed") else None
        return {
            "is_alive": self.server.is_alive,
            "policy_version": self.server.policy_version,
            "transport": kind or transport_kind(self.server.transport),
        }

    async def health(self) -> dict:
        return self._health()

    async def stats(self, reset: bool = False) -> dict:
        if self.server is None:
            return {"requests": 0, "batches": 0}
        return self.server.stats(reset=reset)

    async def get_setting(self, name: str):
        return getattr(self._served(), name)

    async def set_setting(self, name: str, value) -> None:
        setattr(self._served(), name, value)

    def _served(self) -> InferenceServer:
        if self.server is None:
            raise RuntimeError("The distributed transport has not established its schema yet.")
        return self.server

    # -- weights ------------------------------------------------------------------

    async def update_model(self, update_fn, mark_weight_update: bool):
        return await asyncio.to_thread(
            self._served().update_model, update_fn, mark_weight_update=mark_weight_update
        )

    async def update_weights(self, weights, version=None) -> int:
        return await asyncio.to_thread(self._served().update_weights, weights, version=version)

    async def update_model_weights(self, weights, mark_weight_update: bool = True) -> None:
        await asyncio.to_thread(self._update_model_weights, weights, mark_weight_update)

    def _update_model_weights(self, weights, mark_weight_update: bool) -> None:
        given = flat_weights(weights, "update_model_weights")
        served, skipped = model_weights(self.model, "update_model_weights")
        check_weights(served, given, skipped)
        if self.server is not None:
            self.server.update_model(
                lambda _: copy_weights(served, given), mark_weight_update=mark_weight_update
            )
            return
        copy_weights(served, given)
        if mark_weight_update:
            self._bump_pending_version(None)

    def _bump_pending_version(self, version: int | None) -> None:
        """The version a distributed server not started yet will stamp."""
        current = int(self._server_kwargs.get("policy_version", 0))
        self._server_kwargs["policy_version"] = current + 1 if version is None else int(version)

    async def register_scheme_receiver(
        self, weight_recv_schemes: dict, *, synchronize_weights: bool = True
    ) -> None:
        """Installs torchrl weight-sync receivers for the served policy
        (a learner publishing to this actor); ``synchronize_weights``
        connects them now."""
        await asyncio.to_thread(self._register, weight_recv_schemes, synchronize_weights)

    def _register(self, weight_recv_schemes: dict, synchronize_weights: bool) -> None:
        for model_id, scheme in weight_recv_schemes.items():
            previous = self._receiver_schemes.get(model_id)
            if previous is not None and previous is not scheme:
                previous.shutdown()
            scheme.init_on_receiver(model_id=model_id, worker_idx=0, model=self.model)
            self._receiver_schemes[model_id] = scheme
        if synchronize_weights:
            for scheme in self._receiver_schemes.values():
                scheme.connect(worker_idx=0)

    async def _weight_sync_signature(self, model_id: str):
        """The ordered tensor schema a learner's weights must have."""
        from torchrl.weight_update.utils import _weight_tensor_signature

        if model_id != "policy":
            raise KeyError(f"Unknown inference model_id {model_id!r}.")
        return _weight_tensor_signature(TensorDict.from_module(self.model))

    async def _receive_weights_scheme(self, model_version: int | None = None) -> None:
        await asyncio.to_thread(self._apply_from_schemes, "receive", model_version)

    async def _connect_weights_scheme(self, model_version: int | None = None) -> None:
        await asyncio.to_thread(self._apply_from_schemes, "connect", model_version)

    def _apply_from_schemes(self, how: str, model_version: int | None) -> None:
        """Every receiver's ``receive()`` (or ``connect()`` of those not
        connected yet) under the model lock, then the version set (or bumped)
        in the same critical section."""
        if not self._receiver_schemes:
            raise RuntimeError("No inference weight receiver is configured.")

        def apply() -> int | None:
            for scheme in self._receiver_schemes.values():
                if how == "receive":
                    scheme.receive()
                elif not scheme.synchronized_on_receiver:
                    scheme.connect(worker_idx=0)
            return model_version

        if self.server is None:
            apply()
            self._bump_pending_version(model_version)
        else:
            self.server._versions.apply_update(apply)

    # -- shutdown ------------------------------------------------------------------

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.to_thread(self._shutdown, timeout)

    def _shutdown(self, timeout: float | None) -> None:
        for scheme in self._receiver_schemes.values():
            scheme.shutdown()
        self._receiver_schemes.clear()
        if self.server is not None:
            self.server.shutdown(timeout=timeout)
            close = getattr(self.server.transport, "close", None)
            if callable(close):
                close()


class _RayDistributedClient:
    """A client of a distributed Ray server whose schema is fixed by its
    first request: that request starts the server (``bootstrap_distributed``)
    and brings back the transport's own client, which then serves every
    call. Picklable before its first call."""

    def __init__(self, actor):
        self._actor = actor
        self._client = None

    def __getstate__(self) -> dict:
        return {"_actor": self._actor, "_client": None}

    def __call__(self, td, timeout: float | None = None):
        if self._client is None:
            ray = ray_module()
            self._client = ray.get(self._actor.bootstrap_distributed.remote(td))
            _set_liveness(self._client, self._actor)
        return self._client(td, timeout=timeout)


class _RemoteSetting:
    """A batching setting of the actor's server, read and set through Ray."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, server, owner=None):
        if server is None:
            return self
        return ray_module().get(server._live_actor().get_setting.remote(self.name))

    def __set__(self, server, value) -> None:
        ray_module().get(server._live_actor().set_setting.remote(self.name, value))


def _check_selection(transport, transport_options, request_spec, response_spec) -> str:
    """What the actor is told to serve with ("ray", "distributed" or
    "instance"), after torchrl's checks, each a ValueError naming its cause."""
    if transport is not None and not isinstance(transport, str):
        if transport_options:
            raise ValueError(
                "transport_options cannot be used with an explicit transport instance."
            )
        if response_spec is not None:
            raise ValueError(
                "response_spec is for transport='distributed'; an explicit transport "
                "instance has its own response format."
            )
        return "instance"
    kind = "ray" if transport in (None, "auto") else transport
    if kind not in ("ray", "distributed"):
        raise ValueError(f"transport={transport!r} is incompatible with service_backend='ray'.")
    if request_spec is None and response_spec is not None:
        raise ValueError("response_spec requires request_spec.")
    options = dict(transport_options or {})
    if kind == "distributed":
        if request_spec is not None and response_spec is None:
            raise ValueError("request_spec and response_spec must be provided together.")
        return kind
    unknown = set(options) - _RAY_TRANSPORT_OPTIONS
    if unknown:
        raise ValueError(
            f"Unsupported transport_options for transport={transport!r}: {sorted(unknown)} "
            f"(it takes {sorted(_RAY_TRANSPORT_OPTIONS)})."
        )
    if response_spec is not None:
        raise ValueError(
            f"response_spec is for transport='distributed'; transport={transport!r} "
            "answers with whatever the policy returns."
        )
    return kind


class RayInferenceServer(InferenceServer):
    """An :class:`~batchserve.InferenceServer` in a Ray actor: what
    ``InferenceServer(service_backend="ray", policy_factory=...)`` makes
    (torchrl's Ray service).

    The actor builds the policy by calling ``policy_factory()`` and serves
    it with batchserve's server on a thread of its own. The server is
    running once the constructor returns.

    Keyword Args:
        policy_factory (Callable[[], model]): builds the served model on the
            actor (picklable by Ray: a module-level function, a class, a
            lambda...).
        transport (str or InferenceTransport, optional): ``"auto"`` or
            ``"ray"`` (default): the actor takes every request itself, one
            actor call each, and batches them in batchserve's C++ queue;
            :meth:`client` returns a :class:`~batchserve.RayClient`.
            ``"distributed"``: torchrl's torch.distributed request/reply
            transport (gloo or nccl); tensors go between client and actor
            directly. A transport instance is sent to the actor and served
            as given; clients are its own (they must be picklable).
        transport_options (dict, optional): for ``"ray"``: ``max_queue_size``;
            for ``"distributed"``: the transport's options (``backend``,
            ``timeout``...). Not with a transport instance.
        service_backend_options (dict, optional): ``ray_init_config``
            (``ray.init`` options, when Ray is not running yet) and
            ``remote_config`` (the actor's ``ray.remote`` options:
            ``num_cpus``, ``num_gpus``, ``runtime_env``...). With
            ``num_gpus``, ``policy_device`` defaults to ``"cuda:0"`` and
            ``output_device`` to ``"cpu"``.
        request_spec (TensorDictBase, optional): a representative request.
            ``"ray"``: requests are checked against it and take the fast
            path; ``"distributed"``: with ``response_spec``, the fixed
            layouts (without them, the first request fixes them).
        response_spec (TensorDictBase, optional): ``"distributed"`` only.
        num_clients (int, optional): how many clients will call; every
            transport here takes any number, so it only has to be positive.
        shutdown_event (threading.Event or multiprocessing Event, optional):
            setting it shuts the server down; :meth:`shutdown` sets it.
        **server_kwargs: the server's keywords (``max_batch_size``,
            ``timeout``, ``policy_device``, ``weight_sync``...), checked here.

    Ray is started (``ray.init(**ray_init_config)``) when it is not running,
    and shut down when the last of batchserve's Ray parts using it is shut
    down; a runtime the caller started stays up.

    A client whose server's actor died raises
    :class:`~batchserve.ServerClosedError` (waiting callers at once), as do
    calls after :meth:`shutdown`. The handle pickles (into Ray tasks, say):
    a copy makes clients and reads the state, and shuts the server down only
    when asked to (never when it is garbage-collected).

    Example:
        >>> server = InferenceServer(
        ...     policy_factory=make_policy, service_backend="ray",
        ...     service_backend_options={"remote_config": {"num_gpus": 1}},
        ...     max_batch_size=256)
        >>> ray.get([rollout.remote(c) for c in server.clients(64)])
        >>> server.update_model_weights(TensorDict.from_module(trained))
        >>> server.shutdown()
    """

    def __init__(
        self,
        *,
        policy_factory: Callable[[], Any],
        transport: Any = "auto",
        transport_options: dict | None = None,
        service_backend_options: dict | None = None,
        request_spec=None,
        response_spec=None,
        num_clients: int | None = None,
        shutdown_event=None,
        **server_kwargs,
    ):
        if not callable(policy_factory):
            raise TypeError(f"policy_factory must be callable; got {policy_factory!r}.")
        if num_clients is not None and (
            isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1
        ):
            raise ValueError(f"num_clients must be a positive integer; got {num_clients!r}.")
        unknown = set(server_kwargs) - _SERVER_KEYWORDS
        if unknown:
            raise TypeError(f"InferenceServer got unexpected keyword arguments: {sorted(unknown)}.")
        options = dict(service_backend_options or {})
        unknown = set(options) - _SERVICE_OPTIONS
        if unknown:
            raise ValueError(
                f"Unsupported Ray service_backend_options: {sorted(unknown)} "
                f"(it takes {sorted(_SERVICE_OPTIONS)})."
            )
        self._mode = _check_selection(transport, transport_options, request_spec, response_spec)
        remote_config = dict(options.get("remote_config") or {})
        if remote_config.get("num_gpus", 0):
            devices_given = any(
                server_kwargs.get(k) is not None
                for k in ("device", "policy_device", "device_config")
            )
            if not devices_given:
                server_kwargs["policy_device"] = "cuda:0"
            if server_kwargs.get("output_device") is None and (
                server_kwargs.get("device_config") is None
            ):
                server_kwargs["output_device"] = "cpu"
        # An async actor: waiting calls are coroutines, and many may wait.
        remote_config.setdefault("max_concurrency", 1_000_000)

        self._owner = True
        self._actor = None
        # Distributed without specs: each client's first request fixes them.
        self._lazy_schema = self._mode == "distributed" and request_spec is None
        self._transport_kind = "ray" if self._mode == "ray" else None
        self._shutdown_event = shutdown_event
        self._closing = threading.Event()
        self._runtime_lease = RayRuntimeLease.acquire(options.get("ray_init_config"))
        ray = ray_module()
        try:
            actor_cls = ray.remote(**remote_config)(_RayServerActor)
            self._actor = actor_cls.remote(
                policy_factory,
                "ray" if self._mode == "ray" else transport,
                transport_options,
                request_spec,
                response_spec,
                num_clients,
                server_kwargs,
            )
            self._transport_kind = ray.get(self._actor.ready.remote())["transport"]
        except BaseException:
            if self._actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(self._actor, no_restart=True)
                self._actor = None
            self._runtime_lease.release()
            raise
        if shutdown_event is not None:
            shutdown_event.clear()  # as a thread server's start() does
            threading.Thread(
                target=self._watch_shutdown_event, daemon=True,
                name="batchserve-ray-shutdown-event",
            ).start()

    def _watch_shutdown_event(self) -> None:
        while not self._closing.is_set():
            if self._shutdown_event.wait(_SHUTDOWN_EVENT_POLL_S):
                self.shutdown()
                return

    def __reduce__(self):
        return (_borrowed, (self._actor, self._mode, self._lazy_schema, self._transport_kind))

    # -- state ----------------------------------------------------------------------

    def _live_actor(self):
        if self._actor is None:
            raise RuntimeError("The Ray inference server is closed.")
        return self._actor

    @property
    def actor(self):
        """The Ray actor serving (its handle)."""
        return self._actor

    @property
    def service_backend(self) -> str:
        """Where the policy runs: a Ray actor."""
        return "ray"

    @property
    def transport_kind(self) -> str:
        """torchrl's selector for the transport: ``"ray"``,
        ``"distributed"``, or that of the instance given."""
        return self._transport_kind

    @property
    def is_alive(self) -> bool:
        """Whether the actor lives and its server runs."""
        if self._actor is None:
            return False
        try:
            return bool(ray_module().get(self._actor.health.remote())["is_alive"])
        except Exception:
            return False

    def health(self) -> dict:
        """``is_alive``, ``policy_version`` and ``transport`` of the server;
        ``{"is_alive": False}`` once it is shut down, and with ``error``
        when its actor cannot answer. Never raises."""
        if self._actor is None:
            return {"is_alive": False}
        try:
            return ray_module().get(self._actor.health.remote())
        except Exception as exc:  # noqa: BLE001 - a health probe reports it
            return {"is_alive": False, "error": repr(exc)}

    @property
    def policy_version(self) -> int:
        """The policy version stamped on results."""
        return int(self._call("health")["policy_version"])

    def stats(self, reset: bool = False) -> dict:
        """The actor's server's :meth:`InferenceServer.stats`."""
        return self._call("stats", reset)

    max_batch_size = _RemoteSetting()
    min_batch_size = _RemoteSetting()
    timeout = _RemoteSetting()

    def _call(self, method: str, *args):
        """``method`` on the actor, waited for; a dead actor raises
        :class:`~batchserve.ServerClosedError`."""
        ray = ray_module()
        try:
            return ray.get(getattr(self._live_actor(), method).remote(*args))
        except ray.exceptions.ActorDiedError as exc:
            from batchserve.ray.errors import translate

            raise translate(exc) from exc

    # -- lifecycle ------------------------------------------------------------------

    def start(self, *, setup_timeout: float | None = 1.0) -> RayInferenceServer:
        """The server runs from construction: returns self, or raises
        RuntimeError if it is not alive."""
        del setup_timeout
        if not self.is_alive:
            raise RuntimeError("The Ray inference server is not alive.")
        return self

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Shut the server down (waiting callers get
        :class:`~batchserve.ServerClosedError`), end its actor and let go of
        the Ray runtime. Idempotent.

        Args:
            timeout (float or None): seconds the forward in progress may
                take to finish; ``None`` waits for it.
        """
        self._closing.set()
        if self._shutdown_event is not None:
            self._shutdown_event.set()
        actor, self._actor = self._actor, None
        if actor is None:
            return
        ray = ray_module()
        try:
            ray.get(actor.shutdown.remote(timeout),
                    timeout=None if timeout is None else timeout + 30)
        except Exception:  # it died already, or will not answer: it is killed
            pass
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        if self._owner:
            self._runtime_lease.release()

    close = shutdown

    def __enter__(self) -> RayInferenceServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if getattr(self, "_owner", False) and getattr(self, "_actor", None) is not None:
            with contextlib.suppress(BaseException):
                self.shutdown(timeout=1.0)

    # -- clients --------------------------------------------------------------------

    def client(self):
        """A new client (picklable into Ray tasks and actors)."""
        actor = self._live_actor()
        if self._mode == "ray":
            return RayClient(actor)
        if self._lazy_schema:
            return _RayDistributedClient(actor)
        client = self._call("client")
        if self._mode == "distributed":
            _set_liveness(client, actor)
        return client

    # -- weights --------------------------------------------------------------------

    def update_model(self, update_fn: Callable[[Any], Any], *, mark_weight_update: bool = True):
        """Run ``update_fn(model)`` on the actor, between batches, under
        the model lock (``update_fn`` is pickled there). Returns its result."""
        return self._call("update_model", update_fn, mark_weight_update)

    def update_weights(self, weights, *, version: int | None = None) -> int:
        """:meth:`InferenceServer.update_weights` on the actor's server."""
        return self._call("update_weights", weights, version)

    def update_model_weights(self, weights, *, mark_weight_update: bool = True) -> None:
        """Copy ``weights`` (a TensorDict of the policy's parameters and
        buffers) into the served policy, between batches; checked in full
        first. ``mark_weight_update`` bumps the policy version."""
        self._call("update_model_weights", weights, mark_weight_update)

    def update_policy_weights_(self, model_id=None, policy_or_weights=None, **kwargs) -> None:
        """torchrl's collector hook: ``update_policy_weights_(weights)`` or
        ``(model_id, weights)``, weights as a TensorDict or a module."""
        del kwargs
        if policy_or_weights is None and model_id is not None and not isinstance(model_id, str):
            policy_or_weights = model_id
        if isinstance(policy_or_weights, torch.nn.Module):
            policy_or_weights = TensorDict.from_module(policy_or_weights).data
        if policy_or_weights is None:
            raise ValueError("Policy weights must be provided.")
        self.update_model_weights(policy_or_weights)

    def prepare_cudagraph(self, request_spec, *, interaction_type=None) -> None:
        """Not after construction: the actor's server runs already (pass
        ``request_spec`` when constructing)."""
        del request_spec, interaction_type
        raise RuntimeError(
            "A Ray inference server captures inside its actor; pass request_spec "
            "when constructing InferenceServer."
        )


def _borrowed(actor, mode: str, lazy_schema: bool, kind: str | None) -> RayInferenceServer:
    """A pickled :class:`RayInferenceServer`: the same actor, no lease on
    this process's runtime, never shut down by garbage collection."""
    server = RayInferenceServer.__new__(RayInferenceServer)
    server._owner = False
    server._actor, server._mode, server._transport_kind = actor, mode, kind
    server._lazy_schema = lazy_schema
    server._shutdown_event = None
    server._closing = threading.Event()
    server._runtime_lease = None
    return server


#: The handle :func:`serve_on_ray` returns (batchserve's earlier name).
RayServer = RayInferenceServer


def serve_on_ray(
    policy_factory,
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    actor_options: dict | None = None,
    max_queue_size: int = 65536,
    request_spec=None,
    **server_kwargs,
) -> RayInferenceServer:
    """Start an :class:`~batchserve.InferenceServer` inside a Ray actor:
    :class:`RayInferenceServer` with the ``"ray"`` transport, its actor's
    resources as keywords.

    Args:
        policy_factory (Callable[[], model]): builds the served model (must
            be picklable by Ray: a module-level function, a class, ...).

    Keyword Args:
        num_cpus, num_gpus (float, optional): the actor's resources.
            Defaults: ``1`` and ``0``.
        actor_options (dict, optional): more ``.options()`` for the actor
            (``name``, ``scheduling_strategy``, ``runtime_env``...).
        max_queue_size, request_spec: for the server's request queue.
        **server_kwargs: for the InferenceServer (``max_batch_size``,
            ``timeout``, ``device``, ``weight_sync``...).

    Example:
        >>> server = serve_on_ray(make_policy, num_gpus=1, max_batch_size=256)
        >>> client = server.client()
        >>> ray.get([rollout.remote(client) for _ in range(512)])
        >>> server.update_weights(TensorDict.from_module(trained))
        >>> server.shutdown()
    """
    remote_config = {"num_cpus": num_cpus, "num_gpus": num_gpus, **(actor_options or {})}
    return RayInferenceServer(
        policy_factory=policy_factory,
        transport="ray",
        transport_options={"max_queue_size": max_queue_size},
        service_backend_options={"remote_config": remote_config},
        request_spec=request_spec,
        **server_kwargs,
    )


__all__ = ["RayInferenceServer", "RayServer", "serve_on_ray"]

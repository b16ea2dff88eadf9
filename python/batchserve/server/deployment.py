"""Where a server runs and what carries its requests: the front door of
:class:`~batchserve.InferenceServer`, as torchrl's ``_InferenceServerMeta``.

``InferenceServer(...)`` resolves ``service_backend`` (an argument,
``server_config.service_backend``, or an enclosing
``torchrl.service_backend(...)`` context; default ``"thread"``) and
``transport`` (an instance, a selector such as ``"shared_memory"``, or an
enclosing ``torchrl.transport_backend(...)`` context; default ``"auto"``),
refuses combinations torchrl refuses before anything starts, and builds:

- ``"thread"``: the server in a thread of this process;
- ``"process"``: :class:`~batchserve.ProcessInferenceServer`, batchserve's
  server in a child process built from ``policy_factory``;
- ``"ray"``: :class:`~batchserve.RayInferenceServer`, on a Ray actor.
"""

from __future__ import annotations

import sys
from typing import Any

_SERVICE_BACKENDS = ("thread", "process", "ray")
_SERVICE_ALIASES = {"threading": "thread", "multiprocessing": "process"}

# The transport selectors each service backend takes (torchrl's table).
_TRANSPORTS_OF = {
    "thread": ("auto", "thread", "queue", "direct"),
    "process": ("auto", "process", "process_slot", "shared_memory", "distributed"),
    "ray": ("auto", "ray", "distributed"),
}
_PROCESS_OPTIONS = ("mp_context", "startup_timeout")


def _torchrl_contexts() -> tuple[str | None, str | None]:
    """The service and transport backends set by enclosing torchrl contexts.
    Nothing to read unless torchrl's module is loaded (no context can be set
    without it), so this never imports torchrl."""
    backends = sys.modules.get("torchrl._comm.backends")
    if backends is None:
        return None, None
    return backends._get_service_backend(), backends._get_transport_backend()


def _from_context(message: str, *, service: bool = False, transport: bool = False) -> str:
    contexts = [
        name
        for name, chosen in (
            ("torchrl.service_backend", service),
            ("torchrl.transport_backend", transport),
        )
        if chosen
    ]
    if not contexts:
        return message
    return f"{message} (selected by an enclosing {' and '.join(contexts)} context.)"


def check_transport_selection(
    transport: Any,
    *,
    service_backend: str,
    transport_options: dict | None,
    request_spec,
    response_spec,
) -> None:
    """Refuses, before anything is built, what torchrl refuses.

    Raises:
        ValueError: ``transport_options`` with a transport instance, a selector
            the service backend cannot use ("... is incompatible with ..."),
            or a selector without the specs it needs.
    """
    if not isinstance(transport, str):
        if transport_options:
            raise ValueError(
                "transport_options cannot be used with an explicit transport instance."
            )
        return
    if transport not in _TRANSPORTS_OF[service_backend]:
        raise ValueError(
            f"transport={transport!r} is incompatible with service_backend={service_backend!r}."
        )
    if request_spec is None and response_spec is not None:
        raise ValueError("response_spec requires request_spec.")
    if transport in ("shared_memory", "process_slot") and (
        request_spec is None or response_spec is None
    ):
        raise ValueError(f"transport={transport!r} requires request_spec and response_spec.")
    if transport == "distributed" and service_backend == "process" and request_spec is None:
        raise ValueError(
            "Process-owned distributed inference requires request_spec and response_spec."
        )


def _torchrl_transport(name: str, selector: str):
    try:
        import torchrl.modules.inference_server as torchrl_inference_server  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"transport={selector!r} is torchrl's {name}; install torchrl for it, or use "
            "a batchserve transport ('thread', 'shared_memory', 'ray')."
        ) from err
    if name == "_DistributedInferenceTransport":
        from torchrl.modules.inference_server._distributed import _DistributedInferenceTransport

        return _DistributedInferenceTransport
    return getattr(torchrl_inference_server, name)


def make_transport(
    transport: Any,
    *,
    service_backend: str,
    transport_options: dict | None = None,
    request_spec=None,
    response_spec=None,
    num_clients: int | None = None,
):
    """The transport a selector names, for ``service_backend`` (an instance is
    returned as it is). batchserve's own for ``"thread"``/``"queue"``
    (:class:`~batchserve.ThreadingTransport`) and ``"shared_memory"``
    (:class:`~batchserve.SharedMemoryTransport`, ``num_clients`` slots);
    torchrl's for ``"process"`` (``MPTransport``), ``"process_slot"``,
    ``"direct"`` (``SlotTransport``) and ``"distributed"``.

    Raises:
        ValueError: see :func:`check_transport_selection`; ``num_clients``
            with a transport that has no fixed client count.
    """
    check_transport_selection(
        transport,
        service_backend=service_backend,
        transport_options=transport_options,
        request_spec=request_spec,
        response_spec=response_spec,
    )
    if not isinstance(transport, str):
        return transport
    options = dict(transport_options or {})
    kind = {"thread": "thread", "process": "process"}.get(service_backend, service_backend)
    kind = kind if transport == "auto" else transport
    if kind in ("thread", "queue", "process", "distributed") and num_clients is not None:
        raise ValueError(
            f"num_clients sizes the fixed slots of 'direct', 'shared_memory' and "
            f"'process_slot' transports; transport={kind!r} serves any number of clients "
            "(drop num_clients, or choose a slotted transport)."
        )
    if kind in ("thread", "queue"):
        from batchserve.transports.threading import ThreadingTransport

        return ThreadingTransport(**options)
    if kind == "shared_memory":
        from batchserve.transports.shared_memory import SharedMemoryTransport

        options.setdefault("num_slots", num_clients or 1)
        return SharedMemoryTransport(request_spec, response_spec, **options)
    if kind == "process":
        options.setdefault("use_manager", True)
        return _torchrl_transport("MPTransport", kind)(**options)
    if kind == "process_slot":
        options.setdefault("num_slots", num_clients or 1)
        return _torchrl_transport("ProcessSlotTransport", kind)(
            request_spec, response_spec, **options
        )
    if kind == "direct":
        if num_clients is None:
            raise ValueError("transport='direct' requires num_clients.")
        return _torchrl_transport("SlotTransport", kind)(num_clients, **options)
    # "distributed"
    return _torchrl_transport("_DistributedInferenceTransport", kind)(
        request_spec, response_spec, **options
    )


class ServerDeployment(type):
    """Metaclass of :class:`~batchserve.InferenceServer`: calling the class
    itself resolves where the server runs and returns the owner for it (see
    the module docstring); a subclass is built as it is."""

    def __call__(cls, *args, **kwargs):
        from batchserve.server.server import InferenceServer

        if cls is not InferenceServer:
            return super().__call__(*args, **kwargs)
        if len(args) > 2:
            raise TypeError("InferenceServer accepts at most model and transport positionally.")
        model = args[0] if args else kwargs.pop("model", None)
        transport = args[1] if len(args) > 1 else kwargs.pop("transport", None)
        policy_factory = kwargs.pop("policy_factory", None)
        context_service, context_transport = _torchrl_contexts()
        service_backend, service_from_context = _service_backend(
            kwargs.pop("service_backend", None), kwargs.get("server_config"), context_service
        )
        transport_from_context = transport is None and context_transport is not None
        if transport is None:
            transport = context_transport or "auto"
        service_options = dict(kwargs.pop("service_backend_options", None) or {})
        transport_options = kwargs.pop("transport_options", None)
        request_spec = kwargs.pop("request_spec", None)
        response_spec = kwargs.pop("response_spec", None)
        num_clients = kwargs.pop("num_clients", None)
        try:
            check_transport_selection(
                transport,
                service_backend=service_backend,
                transport_options=transport_options,
                request_spec=request_spec,
                response_spec=response_spec,
            )
        except ValueError as err:
            message = str(err)
            service = service_from_context and "service_backend" in message
            transport_ctx = transport_from_context and "transport" in message
            if not (service or transport_ctx):
                raise
            raise ValueError(
                _from_context(message, service=service, transport=transport_ctx)
            ) from err

        if service_backend == "ray":
            _needs_factory(model, policy_factory, "ray", "on the Ray actor")
            from batchserve.ray.service import RayInferenceServer

            return RayInferenceServer(
                policy_factory=policy_factory,
                transport=transport,
                transport_options=transport_options,
                service_backend_options=service_options,
                request_spec=request_spec,
                response_spec=response_spec,
                num_clients=num_clients,
                **kwargs,
            )
        if service_backend == "process":
            _needs_factory(model, policy_factory, "process", "in the child process")
            unknown = set(service_options) - set(_PROCESS_OPTIONS)
            if unknown:
                raise ValueError(f"Unsupported process service_backend_options: {sorted(unknown)}.")
        elif service_options:
            raise ValueError("service_backend_options are only valid for process or Ray services.")
        resolved = make_transport(
            transport,
            service_backend=service_backend,
            transport_options=transport_options,
            request_spec=request_spec,
            response_spec=response_spec,
            num_clients=num_clients,
        )
        if service_backend == "process":
            from batchserve.server.process import ProcessInferenceServer

            return ProcessInferenceServer(
                policy_factory=policy_factory,
                transport=resolved,
                request_spec=request_spec,
                **service_options,
                **kwargs,
            )
        if model is None:
            if policy_factory is None:
                raise ValueError("Either model or policy_factory must be provided.")
            model = policy_factory()
        elif policy_factory is not None:
            raise ValueError("model and policy_factory are mutually exclusive.")
        return super().__call__(model, resolved, request_spec=request_spec, **kwargs)


def _service_backend(given, server_config, context) -> tuple[str, bool]:
    """The service backend and whether an enclosing context chose it."""
    configured = getattr(server_config, "service_backend", None) or "thread"
    from_context = given is None and server_config is None and context is not None
    if given is None:
        given = configured if server_config is not None else context or "thread"
    backend = _SERVICE_ALIASES.get(given, given)
    if server_config is not None and configured not in ("thread", backend):
        raise ValueError("service_backend conflicts with server_config.service_backend.")
    if backend not in _SERVICE_BACKENDS:
        raise ValueError(
            _from_context(
                "InferenceServer service_backend must be 'thread', 'process', or 'ray'.",
                service=from_context,
            )
        )
    return backend, from_context


def _needs_factory(model, policy_factory, backend: str, where: str) -> None:
    if model is not None:
        raise ValueError(
            f"service_backend={backend!r} requires policy_factory so the policy is "
            f"constructed {where}."
        )
    if policy_factory is None:
        raise ValueError(f"policy_factory is required for service_backend={backend!r}.")

"""ProcessInferenceServer: batchserve's :class:`~batchserve.InferenceServer`
(its C++ core and fast path) in a dedicated child process.

torchrl's ``ProcessInferenceServer`` API: the policy is built in the child by
``policy_factory``; actors reach it through a cross-process transport
(:class:`~batchserve.SharedMemoryTransport`, torchrl's ``MPTransport``,
torchrl's distributed transport, ...); a control channel (one pipe) carries
``stats``, ``health`` and ``update_model_weights`` round trips, and a shared
integer mirrors the child's policy version.

Faults: a server process that dies (SIGKILL included) makes every waiting
caller fail promptly. A :class:`~batchserve.SharedMemoryTransport`'s clients
see it in the segment and raise :class:`~batchserve.ServerClosedError`; for
torchrl's transports a monitor thread clears the liveness flag their clients
poll (torchrl's own mechanism), and the clients this server hands out raise
:class:`~batchserve.server.process_client.ServerProcessExitedError`, both a
``ServerClosedError`` and torchrl's ``MailboxPeerClosedError``.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_for_ready
from typing import Any

import torch
from tensordict.base import TensorDictBase

from batchserve.config import ServerSettings, nice_value
from batchserve.server.static_batches import check_static_batch_size
from batchserve.transports.base import InferenceTransport, transport_kind
from batchserve.transports.exception_codec import decode_exception, encode_exception

_POLL_S = 0.05  # how often the child looks at its stop flags between control requests
_IN_PROCESS_KINDS = ("thread", "direct")  # transports that cannot leave their process


def _exit_with_parent() -> None:
    """The child's watchdog: no owner is left to read results or to shut
    the server down, and a normal exit could wait on queue feeder threads."""
    parent = mp.parent_process()
    if parent is not None:
        wait_for_ready([parent.sentinel])
        os._exit(0)


def _apply_weights(server, weights, mark_weight_update: bool) -> None:
    """``update_model_weights`` inside the child, between batches."""
    update = getattr(server, "update_model_weights", None)
    if update is not None:  # the thread server's own, where it has one
        update(weights, mark_weight_update=mark_weight_update)
        return
    from batchserve.weights.updates import check_weights, copy_weights, flat_weights
    from batchserve.weights.updates import model_weights as served_weights

    def load(model) -> None:
        if hasattr(model, "load_policy_weights"):
            model.load_policy_weights(weights)
            return
        given = flat_weights(weights, "update_model_weights")
        served, skipped = served_weights(model, "update_model_weights")
        check_weights(served, given, skipped, "update_model_weights")
        copy_weights(served, given)

    server.update_model(load, mark_weight_update=mark_weight_update)


def _serve_in_child(
    policy_factory, transport, server_kwargs, stop, user_stop, control, version_mirror
) -> None:
    """The child process: builds the policy and batchserve's thread server,
    reports readiness on ``control``, then answers control requests until
    ``stop`` (or ``user_stop``) is set or the parent goes away."""
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    from batchserve.server.server import InferenceServer

    try:
        server = InferenceServer(policy_factory(), transport, **server_kwargs).start()
    except BaseException as exc:
        control.send(("ready", False, encode_exception(exc)))
        sys.exit(1)
    version_mirror.value = server.policy_version
    control.send(("ready", True, None))
    try:
        while not stop.is_set() and not (user_stop is not None and user_stop.is_set()):
            if not server.is_alive:
                raise RuntimeError("InferenceServer serve loop died inside the server process.")
            readable = control.poll(_POLL_S)
            version_mirror.value = server.policy_version
            if not readable:
                continue
            try:
                request_id, verb, payload = control.recv()
            except EOFError:  # the parent closed its end
                break
            try:
                reply = _answer(server, verb, payload, stop)
            except Exception as exc:
                error = RuntimeError(f"ProcessInferenceServer command {verb!r} failed: {exc!r}")
                control.send((request_id, False, encode_exception(error)))
            else:
                version_mirror.value = server.policy_version
                control.send((request_id, True, reply))
    finally:
        # No deadline: shutting down fails the pending requests, which must
        # not be skipped; the parent bounds the wait by terminating us.
        server.shutdown(timeout=None)
        version_mirror.value = server.policy_version
        if not isinstance(transport, InferenceTransport):
            close = getattr(transport, "close", None)  # torchrl's: tell clients (distributed)
            if callable(close):
                close()


def _answer(server, verb: str, payload: dict, stop) -> Any:
    if verb == "stats":
        return server.stats(**payload)
    if verb == "health":
        return {"alive": server.is_alive, "policy_version": server.policy_version}
    if verb == "update_model_weights":
        _apply_weights(server, payload["weights"], payload.get("mark_weight_update", True))
        return {"accepted": True}
    if verb == "shutdown":
        stop.set()
        return {"accepted": True}
    raise RuntimeError(f"Unknown process-server verb: {verb}")


def _liveness_flag(transport, ctx):
    """The server-liveness event torchrl's transports hand their clients
    (``_peer_alive``: torchrl's ``MPTransport`` makes it when it is built,
    so clients made before this server see it too), attached as torchrl's
    ``ProcessInferenceServer`` attaches it; None for a transport without that
    hook (batchserve's detect a dead server themselves)."""
    if isinstance(transport, InferenceTransport):
        return None
    flag = getattr(transport, "_peer_alive", None)
    if flag is None and callable(getattr(transport, "_set_peer_alive", None)):
        flag = ctx.Event()
        flag.set()
        transport._set_peer_alive(flag)
    return flag


def _watch_liveness(sentinel, flag) -> None:
    """Clears ``flag`` when the process behind ``sentinel`` exits."""
    try:
        wait_for_ready([sentinel])
    finally:
        flag.clear()


def _check_shutdown_event(event) -> None:
    from multiprocessing.managers import BaseProxy
    from multiprocessing.synchronize import Event as ProcessEvent

    if event is not None and not isinstance(event, (ProcessEvent, BaseProxy)):
        raise TypeError(
            "shutdown_event must be a multiprocessing Event (mp_context.Event()) for "
            f"service_backend='process': the server runs in another process; got "
            f"{type(event).__name__}."
        )


class ProcessInferenceServer:
    """batchserve's :class:`~batchserve.InferenceServer` in a dedicated process.

    The policy is built in the child process by ``policy_factory``; actors
    in any process reach it through ``transport``. The child serves it with
    batchserve's C++ core: a :class:`~batchserve.SharedMemoryTransport`
    takes the fast path (slots batched and copied in C++); torchrl's
    transports are served through their protocol. A drop-in for torchrl's
    ``ProcessInferenceServer``.

    Args:
        policy_factory (Callable[[], nn.Module]): picklable factory that
            builds the policy inside the server process.
        transport (InferenceTransport): a transport that crosses processes,
            shared with the actors: :class:`~batchserve.SharedMemoryTransport`,
            torchrl's ``MPTransport``, torchrl's distributed transport, or any
            picklable object with torchrl's transport protocol.

    Keyword Args:
        request_spec (TensorDictBase, optional): a representative unbatched
            request: the fixed request format of a batchserve transport
            (checked against its own), or the request a static CUDA graph is
            captured with (``static_batch_size``).
        max_batch_size, min_batch_size, timeout, collate_fn, device,
        policy_device, output_device, collect_stats, stats_window_size,
        weight_sync, weight_sync_model_id, server_config, device_config,
        policy_version, policy_version_key, static_batch_size, worker_nice: as
            for :class:`~batchserve.InferenceServer`, which runs in the child.
        shutdown_event (multiprocessing Event, optional): setting it stops the
            server (the child finishes its forward, fails what waits, exits).
        mp_context: multiprocessing context or start-method name. Defaults to
            ``"spawn"``.
        startup_timeout (float, optional): seconds :meth:`start` waits for the
            child to build the policy and report readiness. Default: ``300.0``.

    Clients made by :meth:`client` / :meth:`clients` raise
    :class:`~batchserve.ServerClosedError` when the server process is gone.
    With torchrl's ``MPTransport``, make clients before :meth:`start` unless
    the transport is manager-backed (torchrl's rule: the child routes replies
    only to the clients it knows).

    Example:
        >>> server = ProcessInferenceServer(
        ...     policy_factory=make_policy,
        ...     transport=SharedMemoryTransport(request_spec, response_spec, num_slots=8),
        ...     max_batch_size=8,
        ... )
        >>> with server:
        ...     action = server.client()(td)["action"]
    """

    def __init__(
        self,
        *,
        policy_factory: Callable[[], torch.nn.Module],
        transport: Any,
        request_spec: TensorDictBase | None = None,
        max_batch_size: int | None = None,
        static_batch_size: int | None = None,
        min_batch_size: int | None = None,
        timeout: float | None = None,
        collate_fn: Callable | None = None,
        device: torch.device | str | None = None,
        policy_device: torch.device | str | None = None,
        output_device: torch.device | str | None = None,
        collect_stats: bool | None = None,
        stats_window_size: int | None = None,
        weight_sync=None,
        weight_sync_model_id: str = "policy",
        server_config=None,
        device_config=None,
        policy_version: int = 0,
        policy_version_key="policy_version",
        shutdown_event=None,
        mp_context: str | mp.context.BaseContext | None = None,
        startup_timeout: float = 300.0,
        worker_nice: int | None = None,
    ) -> None:
        if not callable(policy_factory):
            raise TypeError(f"policy_factory must be callable; got {policy_factory!r}.")
        if transport is None or isinstance(transport, str):
            raise TypeError(
                "ProcessInferenceServer takes a transport instance; transport names are "
                "resolved by InferenceServer(service_backend='process', transport=...)."
            )
        if transport_kind(transport) in _IN_PROCESS_KINDS:
            raise ValueError(
                f"{type(transport).__name__} serves threads of one process; "
                "ProcessInferenceServer needs a transport that crosses processes "
                "(SharedMemoryTransport, MPTransport, ...)."
            )
        _check_shutdown_event(shutdown_event)
        settings = ServerSettings.parse(
            max_batch_size=max_batch_size,
            min_batch_size=min_batch_size,
            timeout=timeout,
            collect_stats=collect_stats,
            stats_window_size=stats_window_size,
            device=device,
            policy_device=policy_device,
            output_device=output_device,
            server_config=server_config,
            device_config=device_config,
        )
        if server_config is not None:
            if static_batch_size is not None:
                raise ValueError(
                    "server_config is mutually exclusive with the static_batch_size keyword "
                    "argument."
                )
            static_batch_size = getattr(server_config, "static_batch_size", None)
        # Checked here, as torchrl checks it, not first in the child.
        check_static_batch_size(static_batch_size, settings.max_batch_size, settings.device)
        if isinstance(mp_context, str):
            self._ctx = mp.get_context(mp_context)
        else:
            self._ctx = mp_context if mp_context is not None else mp.get_context("spawn")
        self.policy_factory = policy_factory
        self.transport = transport
        self.static_batch_size = static_batch_size
        self.startup_timeout = startup_timeout
        self._shutdown_event = shutdown_event
        # The child's thread server gets the settings resolved here (no
        # config objects: their service_backend is this one's).
        self._server_kwargs: dict[str, Any] = {
            "max_batch_size": settings.max_batch_size,
            "min_batch_size": settings.min_batch_size,
            "timeout": settings.timeout,
            "collate_fn": collate_fn,
            "policy_device": settings.device,
            "output_device": settings.output_device,
            "collect_stats": settings.collect_stats,
            "stats_window_size": settings.stats_window_size,
            "weight_sync": weight_sync,
            "weight_sync_model_id": weight_sync_model_id,
            "policy_version": policy_version,
            "policy_version_key": policy_version_key,
            "worker_nice": nice_value("worker_nice", worker_nice),
        }
        if static_batch_size is not None:
            self._server_kwargs["static_batch_size"] = static_batch_size
        self._request_spec = None
        if request_spec is not None:
            self._set_request_spec(request_spec)
        self._peer_alive = _liveness_flag(transport, self._ctx)
        # torchrl's rule: a transport whose clients register before the
        # child is spawned gets the default client now.
        self._default_client = (
            self._handed_out(transport.client())
            if getattr(transport, "_clients_require_registration", False)
            else None
        )
        self._version_mirror = self._ctx.Value("q", int(policy_version))
        self._stop = self._ctx.Event()
        self._lifecycle_lock = threading.Lock()
        self._control_lock = threading.Lock()
        self._control = None
        self._request_ids = itertools.count()
        self._process = None
        self._monitor: threading.Thread | None = None

    def _set_request_spec(self, request_spec: TensorDictBase) -> None:
        if not isinstance(request_spec, TensorDictBase):
            raise TypeError(
                f"request_spec must be a TensorDict; got {type(request_spec).__name__}."
            )
        self._request_spec = request_spec.clone()
        # A batchserve transport checks it against its own format; a CUDA
        # graph is captured with it. A torchrl transport built from it (the
        # distributed one) needs nothing more.
        if isinstance(self.transport, InferenceTransport) or self.static_batch_size is not None:
            self._server_kwargs["request_spec"] = self._request_spec
        else:
            self._server_kwargs.pop("request_spec", None)

    def prepare_cudagraph(self, request_spec: TensorDictBase, *, interaction_type=None) -> None:
        """Set the representative request the child captures its static CUDA
        graph with (``static_batch_size``), before :meth:`start`.

        Keyword Args:
            interaction_type (InteractionType, optional): sampling mode the
                child captures under, stamped on the stored request.
        """
        if self.is_alive:
            raise RuntimeError(
                "The process inference server must prepare its CUDA graph before start."
            )
        if interaction_type is not None:
            from tensordict.nn.probabilistic import InteractionType
            from torchrl.modules.inference_server._client import _stamp_interaction_type

            request_spec = _stamp_interaction_type(request_spec, InteractionType(interaction_type))
        self._set_request_spec(request_spec)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> ProcessInferenceServer:
        """Start the child process and wait until it serves.

        Raises:
            RuntimeError: already running; or the child failed to build the
                policy or its server (the child's error is the cause), or
                exited before reporting readiness.
            TypeError: what the child needs could not be pickled to it.
            TimeoutError: no readiness within ``startup_timeout`` seconds.
        """
        with self._lifecycle_lock:
            if self.is_alive:
                raise RuntimeError("Server is already running.")
            if self._monitor is not None:  # the previous run's; it ends with its process
                self._monitor.join(self.startup_timeout)
                if self._monitor.is_alive():
                    raise RuntimeError("The previous ProcessInferenceServer monitor did not stop.")
                self._monitor = None
            self._stop.clear()
            if self._peer_alive is not None:
                self._peer_alive.set()
            ours, theirs = self._ctx.Pipe(duplex=True)
            process = self._ctx.Process(
                target=_serve_in_child,
                kwargs={
                    "policy_factory": self.policy_factory,
                    "transport": self.transport,
                    "server_kwargs": self._server_kwargs,
                    "stop": self._stop,
                    "user_stop": self._shutdown_event,
                    "control": theirs,
                    "version_mirror": self._version_mirror,
                },
                daemon=True,
                name="ProcessInferenceServer",
            )
            try:
                process.start()
            except Exception as exc:
                ours.close()
                raise self._pickling_error(exc) from exc
            finally:
                theirs.close()
            self._process, self._control = process, ours
            if self._peer_alive is not None:
                self._monitor = threading.Thread(
                    target=_watch_liveness,
                    args=(process.sentinel, self._peer_alive),
                    daemon=True,
                    name="ProcessInferenceServerMonitor",
                )
                self._monitor.start()
            self._await_readiness(process, ours)
        return self

    def _pickling_error(self, exc: BaseException) -> BaseException:
        what = "the transport and the server's arguments"
        try:
            pickle.dumps(self.policy_factory)
        except Exception:
            what = "policy_factory"
        return TypeError(
            f"ProcessInferenceServer could not send {what} to the server process "
            f"(start method {self._ctx.get_start_method()!r}): {exc!r}. policy_factory "
            "must be picklable: a module-level function or class, or a functools.partial "
            "of one."
        )

    def _await_readiness(self, process, control) -> None:
        ready = wait_for_ready([control, process.sentinel], self.startup_timeout)
        message = None
        if control in ready:
            try:
                message = control.recv()
            except EOFError:
                message = None
        if message is not None and message[1]:
            return
        self._stop_process(timeout=1.0)
        if not ready:
            raise TimeoutError(
                f"ProcessInferenceServer did not report readiness within "
                f"{self.startup_timeout} seconds. If the policy factory loads a large "
                "checkpoint, increase startup_timeout."
            )
        if message is None:
            raise RuntimeError(
                "ProcessInferenceServer failed to start: the server process exited "
                f"(exitcode={process.exitcode}) before reporting readiness; its error "
                "is on its stderr."
            )
        error = decode_exception(message[2])
        raise RuntimeError(f"ProcessInferenceServer failed to start: {error!r}") from error

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop the child process and wait for it to exit.

        The child finishes its forward, fails the requests still waiting
        (their callers get :class:`~batchserve.ServerClosedError`) and exits;
        past ``timeout`` seconds it is terminated.

        Args:
            timeout (float or None): seconds to wait; ``None`` waits as long
                as the child takes.
        """
        with self._lifecycle_lock:
            self._stop_process(timeout)

    def _stop_process(self, timeout: float | None) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        self._stop.set()
        process.join(timeout)
        if process.is_alive():
            process.terminate()
            process.join(max(1.0, timeout) if timeout is not None else None)
        if process.is_alive():
            process.kill()
            process.join()
        if self._monitor is not None:
            self._monitor.join(timeout)
            if not self._monitor.is_alive():
                self._monitor = None
        control, self._control = self._control, None
        with self._control_lock:
            control.close()

    @property
    def is_alive(self) -> bool:
        """Whether the child process is alive."""
        process = self._process
        return process is not None and process.is_alive()

    @property
    def service_backend(self) -> str:
        """Where the policy runs: a process of its own."""
        return "process"

    @property
    def transport_kind(self) -> str:
        """torchrl's selector for the transport ("shared_memory", "process", ...)."""
        return transport_kind(self.transport)

    @property
    def policy_version(self) -> int:
        """The child server's policy version (mirrored in shared memory)."""
        return int(self._version_mirror.value)

    def __enter__(self) -> ProcessInferenceServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __del__(self) -> None:
        # getattr: also runs on instances whose __init__ raised.
        process = getattr(self, "_process", None)
        if process is not None and process.is_alive():
            self.shutdown(timeout=1.0)

    # -- clients --------------------------------------------------------------

    def _handed_out(self, client):
        """``client`` as this server hands it out: a batchserve transport's
        raises ServerClosedError for a dead server itself; a torchrl one's is
        wrapped so that it does (see ``process_client``)."""
        if isinstance(self.transport, InferenceTransport):
            return client
        try:
            from batchserve.server.process_client import ProcessClient
        except ImportError:  # no torchrl: the transport raises its own errors
            return client
        return ProcessClient(client, self._peer_alive)

    def client(self):
        """An actor-side client of the transport (picklable to actor processes)."""
        if self._default_client is None:
            self._default_client = self._handed_out(self.transport.client())
        return self._default_client

    def clients(self, num_clients: int) -> list:
        """One independently routed client per concurrent consumer."""
        if isinstance(num_clients, bool) or not isinstance(num_clients, int):
            raise TypeError("num_clients must be an integer.")
        if num_clients < 1:
            raise ValueError("num_clients must be at least 1.")
        return [self._handed_out(self.transport.client()) for _ in range(num_clients)]

    # -- the control channel --------------------------------------------------

    def _request_control(self, verb: str, payload: dict | None = None, timeout: float = 5.0):
        """One control round trip to the child: ``verb`` and ``payload`` out,
        its reply back (one caller at a time; a late reply to a caller that
        timed out is dropped by its id)."""
        process, control = self._process, self._control
        if process is None or control is None:
            raise RuntimeError("ProcessInferenceServer is not running.")
        if not process.is_alive():
            raise RuntimeError(
                f"ProcessInferenceServer process is not alive (exitcode={process.exitcode})."
            )
        with self._control_lock:
            request_id = next(self._request_ids)
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                control.send((request_id, verb, payload or {}))
                while True:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    ready = wait_for_ready([control, process.sentinel], left)
                    if not ready:
                        raise TimeoutError(
                            f"Timed out waiting for ProcessInferenceServer {verb!r}."
                        )
                    if control not in ready:
                        raise EOFError("the server process exited")
                    reply_id, ok, reply = control.recv()
                    if reply_id == request_id:
                        break
                    # else: the reply to an earlier call that timed out
            except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
                raise RuntimeError(
                    f"ProcessInferenceServer process exited (exitcode={process.exitcode}) "
                    f"before answering {verb!r}."
                ) from exc
        if not ok:
            raise decode_exception(reply)
        return reply

    def stats(self, *, reset: bool = False, timeout: float = 5.0) -> dict:
        """The child server's :meth:`~batchserve.InferenceServer.stats`.

        A blocking round trip: :class:`TimeoutError` when the child does not
        answer within ``timeout`` seconds, :class:`RuntimeError` when it is
        not running.
        """
        return self._request_control("stats", {"reset": reset}, timeout=timeout)

    def update_model_weights(
        self, weights, *, mark_weight_update: bool = True, timeout: float = 300.0
    ) -> dict:
        """Apply ``weights`` (a TensorDict of parameters, or a state_dict) to
        the child's model, between batches.

        Args:
            weights: the new parameters and buffers; ``load_policy_weights``
                takes them when the model has it.
            mark_weight_update (bool, optional): bump the policy version.
                Default: ``True``.
            timeout (float, optional): seconds to wait for the child. Default:
                ``300.0``.

        Returns:
            ``{"accepted": True}``.

        Raises:
            RuntimeError: the child could not apply them (its error named),
                or it is not running.
        """
        return self._request_control(
            "update_model_weights",
            {"weights": weights, "mark_weight_update": mark_weight_update},
            timeout=timeout,
        )

    def health(self, *, timeout: float = 5.0) -> dict:
        """A health snapshot that never raises: ``process_alive``, ``pid``,
        ``exitcode``, and, from a live child, ``alive`` (its serve loop) and
        ``policy_version``; ``control_error`` when the child did not answer."""
        process = self._process
        result = {
            "process_alive": process is not None and process.is_alive(),
            "pid": process.pid if process is not None else None,
            "exitcode": process.exitcode if process is not None else None,
        }
        if result["process_alive"]:
            try:
                result.update(self._request_control("health", timeout=timeout))
            except (RuntimeError, TimeoutError) as exc:
                result["process_alive"] = process.is_alive()
                result["exitcode"] = process.exitcode
                result["control_error"] = repr(exc)
        return result

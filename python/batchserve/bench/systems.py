"""The systems compared: how each one serves a scenario.

Thread actors use each system's ThreadingTransport. Process actors use each
system's SharedMemoryTransport; with --vs torchrl a process scenario also
runs torchrl's server on its MPTransport ("torchrl-mp"), the transport
torchrl users reach for first. With the scenario's ``server = "process"``
each system serves from its ProcessInferenceServer (the policy built in the
child by a factory, see ``batchserve.bench.workload.served_policy``) and
every actor, thread or process, calls through its SharedMemoryTransport.
Every system gets the same model, the same collate_fn (the scenario's
``collate``) and the same client wrapping (its ``client``, see
``batchserve.bench.workload.make_client``). With --limit the "null" system
runs too: the same actors against a server that costs nothing
(``batchserve.bench.null_server``; for process actors an echo through the
shared-memory slots), their limit. Thread actors of an in-process server
also run the "echo" system: a server that costs nothing but the hand-off,
an echo through batchserve's queue, their limit with the round trip to a
server thread counted.
"""

from __future__ import annotations

import functools
import importlib.util

from batchserve.bench.scenario import Scenario


class BenchError(RuntimeError):
    """A run that cannot go on; the CLI prints it and exits non-zero."""


def torchrl_available() -> bool:
    return importlib.util.find_spec("torchrl") is not None


def require_torchrl(why: str) -> None:
    if not torchrl_available():
        raise BenchError(f"{why} needs torchrl: pip install torchrl  "
                         "(or pip install \"batchserve[bench]\")")


def request_spec(scenario: Scenario):
    """One request of the scenario's layout, zeros (a spec)."""
    import torch
    from tensordict import TensorDict

    from batchserve.bench.workload import leaf_specs

    return TensorDict({key: torch.zeros(shape, dtype=getattr(torch, dtype))
                       for key, shape, dtype in leaf_specs(scenario)})


def server_kwargs(scenario: Scenario, system: str = "batchserve") -> dict:
    kwargs = dict(
        max_batch_size=scenario.max_batch_size,
        min_batch_size=scenario.min_batch_size,
        timeout=scenario.timeout,
    )
    if scenario.device != "cpu":
        kwargs.update(device=scenario.device, output_device="cpu")
    if scenario.static_batch_size is not None:
        # torchrl takes one CUDA-graphed size: the largest bucket.
        sizes = list(scenario.static_batch_size)
        kwargs.update(static_batch_size=sizes if system == "batchserve" else max(sizes),
                      request_spec=request_spec(scenario))
    if scenario.collate != "default":
        from batchserve.bench.workload import collate_fn

        kwargs.update(collate_fn=collate_fn(scenario))
    return kwargs


NULL = "null"
ECHO = "echo"
LIMITS = (NULL, ECHO)  # the systems that run no model: the limits


def systems_for(scenario: Scenario, vs_torchrl: bool, limit: bool = False) -> list[str]:
    systems = ["batchserve"]
    if vs_torchrl:
        systems.append("torchrl")
        if scenario.actors == "processes":
            systems.append("torchrl-mp")
    if limit:
        systems.append(NULL)
        # Process actors' null is an echo already. With a server process the
        # slots' echo answers each request alone, without a batch's wake
        # chain: at 32 threads it served 5 k req/s where batchserve served
        # 37 k, no limit at all.
        if scenario.actors == "threads" and scenario.server == "thread":
            systems.append(ECHO)
    return systems


def one_response(scenario: Scenario, policy):
    """What the policy answers one request (the null server's answer)."""
    import torch

    from batchserve.bench.workload import interaction_context, make_leaves, request

    with torch.no_grad(), interaction_context(scenario):
        return policy(request(make_leaves(scenario)).unsqueeze(0))[0].clone()


def slot_specs(scenario: Scenario, actors: int, policy):
    """request_spec, response_spec and num_slots of a shared-memory transport
    for the scenario's workload: the response is what the policy writes for
    one request (keys other than the request's), plus the policy version."""
    import torch
    from tensordict import TensorDict

    request = request_spec(scenario)
    with torch.no_grad():
        output = policy(request.unsqueeze(0).clone())
    response = TensorDict({
        key: torch.zeros_like(value[0]) for key, value in output.items()
        if key not in request.keys() and isinstance(value, torch.Tensor)
    })
    response["policy_version"] = torch.zeros((), dtype=torch.long)
    return request, response, max(64, 2 * actors)


def make_transport(system: str, scenario: Scenario, mp_context=None, actors: int = 1,
                   policy=None):
    if system == NULL and scenario.actors != "processes":
        from batchserve.bench.null_server import NullTransport

        return NullTransport(one_response(scenario, policy))
    if scenario.shared_memory:
        request, response, num_slots = slot_specs(scenario, actors, policy)
        if system in ("batchserve", NULL):  # the null server: an echo through the slots
            import batchserve

            return batchserve.SharedMemoryTransport(request, response, num_slots=num_slots,
                                                    single_file=scenario.single_file)
        require_torchrl("--vs torchrl")
        from torchrl.modules.inference_server import MPTransport, SharedMemoryTransport

        if system == "torchrl-mp":
            return MPTransport(ctx=mp_context)
        return SharedMemoryTransport(request, response, num_slots=num_slots, ctx=mp_context)
    if system in ("batchserve", ECHO):
        import batchserve

        return batchserve.ThreadingTransport(single_file=scenario.single_file)
    require_torchrl("--vs torchrl")
    from torchrl.modules.inference_server import ThreadingTransport

    return ThreadingTransport()


def make_server(system: str, model, transport, scenario: Scenario, mp_context=None,
                actors: int = 1):
    """The system's server (not started). ``model``: the RecordingModel the
    scenario's forwards are recorded by; a process server builds its own in
    the child, recording into the parent's ``model.record``. ``actors``:
    how many will call (the echo serves them in batches of all of them)."""
    if system == NULL:
        from batchserve.bench.null_server import EchoServer, NullServer

        if scenario.actors == "processes":
            return EchoServer(transport, one_response(scenario, model.policy))
        return NullServer()
    if system == ECHO:
        from batchserve.bench.null_server import QueueEcho
        from batchserve.server.server import IDLE_WAIT_S

        return QueueEcho(transport, one_response(scenario, model.policy),
                         min(actors, scenario.max_batch_size), scenario.max_batch_size,
                         IDLE_WAIT_S)
    if scenario.server == "process":
        from batchserve.bench.workload import served_policy

        factory = functools.partial(served_policy, scenario, model.record)
        kwargs = dict(policy_factory=factory, transport=transport, mp_context=mp_context,
                      **server_kwargs(scenario, system))
        if system == "batchserve":
            import batchserve

            return batchserve.ProcessInferenceServer(**kwargs)
        require_torchrl("--vs torchrl")
        from torchrl.modules.inference_server import ProcessInferenceServer

        return ProcessInferenceServer(**kwargs)
    if system == "batchserve":
        import batchserve

        return batchserve.InferenceServer(model, transport, **server_kwargs(scenario, system))
    require_torchrl("--vs torchrl")
    from torchrl.modules.inference_server import InferenceServer

    return InferenceServer(model, transport, **server_kwargs(scenario, system))

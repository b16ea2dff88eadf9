"""WeightPublisher -> SharedMemoryWeightReceiver: weights from a trainer
process to a running server through shared memory.

The policy is a Linear(WIDTH, 1) whose weight is all `v` and bias 0 for
version v, so an all-ones observation gives the action WIDTH * v: a result
proves which version's weights computed it, and a half-copied version would
give a number no version gives."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import pytest
import torch
from conftest import make_policy
from tensordict import TensorDict

from batchserve import (
    InferenceServer,
    SharedMemoryWeightReceiver,
    ThreadingTransport,
    WeightPublisher,
)

pytestmark = pytest.mark.timeout(120)

WIDTH = 256
_names = itertools.count()


def segment_name() -> str:
    # batchserve-*: the suite checks that nothing under that prefix is left.
    return f"batchserve-test-weights-{os.getpid()}-{next(_names)}"


def policy_at(version: float, width: int = WIDTH):
    policy = make_policy(width, 1)
    set_version(policy, version)
    return policy


@torch.no_grad()
def set_version(policy, version: float) -> None:
    policy.module.weight.fill_(float(version))
    policy.module.bias.zero_()


def observation() -> TensorDict:
    return TensorDict({"observation": torch.ones(WIDTH)})


def served(client) -> tuple[int, float]:
    """(stamped version, the version the action says computed it)."""
    out = client(observation())
    return out["policy_version"].item(), out["action"].item() / WIDTH


def wait_for_version(client, version: int, deadline_s: float = 30) -> tuple[int, float]:
    """Calls until a result carries `version` (the server applies new
    weights between batches, so this takes a batch or two)."""
    end = time.monotonic() + deadline_s
    while True:
        stamped, computed = served(client)
        if stamped >= version or time.monotonic() > end:
            return stamped, computed


# -- child processes (module level: forkserver pickles them by name) ----------


def trainer(name, versions, published, done):
    """Publishes each of `versions` in turn, then holds the name until `done`."""
    policy = policy_at(0)
    with WeightPublisher(name, policy) as publisher:
        for v in versions:
            set_version(policy, v)
            publisher.publish(version=v)
        published.set()
        done.wait(60)


def trainer_killed_mid_write(name, published):
    """Publishes version 1 whole, then dies halfway through writing version 2:
    the bank it was writing holds 999 in one tensor and version 1 in the
    other, and was never published."""
    publisher = WeightPublisher(name, policy_at(0))
    publisher.publish(policy_at(1), version=1)
    back = publisher._views[publisher._banks.back()]
    back["module.weight"].fill_(999.0)
    published.set()
    os.kill(os.getpid(), signal.SIGKILL)


# -- across processes ----------------------------------------------------------


def test_a_trainer_started_first_serves_its_newest_version_from_the_first_batch(forkserver):
    name = segment_name()
    published, done = forkserver.Event(), forkserver.Event()
    child = forkserver.Process(target=trainer, args=(name, [1, 2, 3], published, done))
    child.start()
    try:
        assert published.wait(60)
        transport = ThreadingTransport()
        receiver = SharedMemoryWeightReceiver(name)
        with InferenceServer(policy_at(0), transport, weight_sync=receiver) as server:
            assert served(transport.client()) == (3, 3.0)
            assert server.stats()["weight_updates"] == 1  # the newest only
        receiver.close()
    finally:
        done.set()
        child.join(60)
    assert child.exitcode == 0
    assert not os.path.exists(f"/dev/shm/{name}")  # both ends closed: removed


def test_a_trainer_started_after_the_server_reaches_it(forkserver):
    name = segment_name()
    transport = ThreadingTransport()
    receiver = SharedMemoryWeightReceiver(name)
    with InferenceServer(policy_at(0), transport, weight_sync=receiver, timeout=0.005) as server:
        client = transport.client()
        assert served(client) == (0, 0.0)  # nothing published yet: its own weights
        published, done = forkserver.Event(), forkserver.Event()
        child = forkserver.Process(target=trainer, args=(name, [5, 6], published, done))
        child.start()
        try:
            assert published.wait(60)
            assert wait_for_version(client, 6) == (6, 6.0)
            assert server.policy_version == 6
        finally:
            done.set()
            child.join(60)
        assert child.exitcode == 0
        # The trainer is gone; the server keeps serving its last version.
        assert served(client) == (6, 6.0)
    receiver.close()


def test_a_trainer_killed_mid_write_never_puts_a_torn_model_in_service(forkserver):
    name = segment_name()
    transport = ThreadingTransport()
    receiver = SharedMemoryWeightReceiver(name)
    with InferenceServer(policy_at(0), transport, weight_sync=receiver, timeout=0.005) as server:
        client = transport.client()
        published = forkserver.Event()
        child = forkserver.Process(target=trainer_killed_mid_write, args=(name, published))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL and published.is_set()
        assert wait_for_version(client, 1) == (1, 1.0)
        for _ in range(20):  # the half-written version 2 never shows
            assert served(client) == (1, 1.0)
        assert server.stats()["weight_updates"] == 1
        # A new trainer takes over the dead one's name and carries on.
        with WeightPublisher(name, policy_at(0)) as publisher:
            assert publisher.version == 1
            assert publisher.publish(policy_at(2)) == 2
            assert wait_for_version(client, 2) == (2, 2.0)
    receiver.close()


@pytest.mark.parametrize("in_place", [False, True], ids=["served-from-banks", "in-place"])
def test_versions_streamed_from_another_process_are_stamped_exactly(forkserver, in_place):
    """A trainer publishes 300 versions as fast as it can while 8 actor
    threads call: every action is what its stamped version computes, and no
    caller ever sees versions go back."""
    name, last = segment_name(), 300
    transport = ThreadingTransport()
    receiver = SharedMemoryWeightReceiver(name, in_place=in_place)
    problems: list = []
    stop = threading.Event()

    def actor() -> None:
        client = transport.client()
        newest = -1
        try:
            while not stop.is_set():
                stamped, computed = served(client)
                if computed != stamped:
                    problems.append(("action of another version", stamped, computed))
                if stamped < newest:
                    problems.append(("version went back", newest, stamped))
                newest = stamped
                if stamped == last:
                    return
        except BaseException as exc:
            problems.append(exc)

    with InferenceServer(
        policy_at(0), transport, weight_sync=receiver, max_batch_size=8, timeout=0.0005
    ) as server:
        actors = [threading.Thread(target=actor) for _ in range(8)]
        for t in actors:
            t.start()
        published, done = forkserver.Event(), forkserver.Event()
        child = forkserver.Process(
            target=trainer, args=(name, list(range(1, last + 1)), published, done)
        )
        child.start()
        try:
            assert published.wait(60)
            for t in actors:
                t.join(60)
        finally:
            stop.set()
            done.set()
            child.join(60)
        assert not any(t.is_alive() for t in actors)
        assert server.policy_version == last
        assert 1 <= server.stats()["weight_updates"] <= last
    receiver.close()
    assert problems == []


# -- in one process --------------------------------------------------------------


def test_publishing_never_waits_for_the_server():
    """While the server holds its model lock, publishing still returns; the
    newest version is applied once the lock is free."""
    name = segment_name()
    entered, release = threading.Event(), threading.Event()

    def hold(model) -> None:
        entered.set()
        assert release.wait(30), "test never released the lock"

    transport = ThreadingTransport()
    receiver = SharedMemoryWeightReceiver(name)
    with InferenceServer(policy_at(0), transport, weight_sync=receiver, timeout=0.005) as server:
        holder = threading.Thread(
            target=server.update_model, args=(hold,), kwargs={"mark_weight_update": False}
        )
        holder.start()
        assert entered.wait(30)
        with WeightPublisher(name, policy_at(0)) as publisher:
            for v in (1, 2, 3):
                assert publisher.publish(policy_at(v)) == v  # the lock is still held
            release.set()
            holder.join(30)
            assert wait_for_version(transport.client(), 3) == (3, 3.0)
    receiver.close()


def test_newest_version_is_applied_before_each_batch():
    name = segment_name()
    policy = policy_at(0)
    transport = ThreadingTransport()
    receiver = SharedMemoryWeightReceiver(name)
    with WeightPublisher(name, policy_at(0)) as publisher:
        with InferenceServer(policy, transport, weight_sync=receiver, timeout=0.005) as server:
            client = transport.client()
            assert served(client) == (0, 0.0)
            publisher.publish(policy_at(7), version=70)
            assert wait_for_version(client, 70) == (70, 7.0)
            # A state_dict or a TensorDict of parameters publishes too.
            publisher.publish(policy_at(8).state_dict())
            assert wait_for_version(client, 71) == (71, 8.0)
            publisher.publish(TensorDict.from_module(policy_at(9)))
            assert wait_for_version(client, 72) == (72, 9.0)
            assert server.stats()["weight_updates"] == 3
            assert receiver.version == 72 and receiver.published == 3
    receiver.close()


@pytest.mark.parametrize("in_place", [False, True], ids=["served-from-banks", "in-place"])
def test_a_cpu_model_is_served_from_the_bank_unless_asked_to_copy(in_place):
    """By default the model's tensors are swapped for the bank's (no copy);
    in_place=True copies into the model's own tensors. Either way, close()
    leaves the model with the last version in memory of its own."""
    name = segment_name()
    policy = policy_at(0)
    own = policy.module.weight.data_ptr()
    transport = ThreadingTransport()
    receiver = SharedMemoryWeightReceiver(name, in_place=in_place)
    with WeightPublisher(name, policy_at(0)) as publisher:
        with InferenceServer(policy, transport, weight_sync=receiver, timeout=0.005):
            publisher.publish(policy_at(5))
            assert wait_for_version(transport.client(), 1) == (1, 5.0)
            segment = torch.frombuffer(receiver._banks, dtype=torch.uint8)
            start, end = segment.data_ptr(), segment.data_ptr() + segment.numel()

            def in_segment() -> bool:
                return start <= policy.module.weight.data_ptr() < end

            assert in_segment() != in_place
            assert (policy.module.weight.data_ptr() == own) == in_place
            publisher.publish(policy_at(6))
            assert wait_for_version(transport.client(), 2) == (2, 6.0)
        receiver.close()
        assert not in_segment()
        publisher.publish(policy_at(7))  # no longer reaches the model
    assert policy.module.weight.eq(6.0).all()
    assert policy(observation())["action"].item() == 6.0 * WIDTH


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"module.weight": torch.ones(1, WIDTH)}, r"missing 'module.bias'"),
        (
            {
                "module.weight": torch.ones(1, WIDTH),
                "module.bias": torch.ones(1),
                "x": torch.ones(1),
            },
            r"unexpected 'x'",
        ),
        (
            {"module.weight": torch.ones(2, WIDTH), "module.bias": torch.ones(1)},
            r"'module.weight' is torch.float32 \[2, 256\]",
        ),
        (
            {
                "module.weight": torch.ones(1, WIDTH, dtype=torch.float64),
                "module.bias": torch.ones(1),
            },
            r"'module.weight' is torch.float64",
        ),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_a_bad_publication_is_refused_naming_the_parameter(weights, match):
    name = segment_name()
    transport = ThreadingTransport()
    receiver = SharedMemoryWeightReceiver(name)
    with WeightPublisher(name, policy_at(0)) as publisher:
        publisher.publish(policy_at(1))
        with InferenceServer(policy_at(0), transport, weight_sync=receiver, timeout=0.005):
            client = transport.client()
            assert wait_for_version(client, 1) == (1, 1.0)
            with pytest.raises(ValueError, match=match + r".*Nothing was published"):
                publisher.publish(weights)
            assert publisher.version == 1
            assert served(client) == (1, 1.0)
    receiver.close()


def test_a_server_whose_model_has_another_layout_does_not_start():
    name = segment_name()
    with WeightPublisher(name, policy_at(0)):
        wider = make_policy(WIDTH, 2)
        server = InferenceServer(wider, ThreadingTransport(),
                                 weight_sync=SharedMemoryWeightReceiver(name))
        with pytest.raises(RuntimeError, match=r"'module.weight' is float32 \[1, 256\] in the "
                           r"publisher's weights and float32 \[2, 256\] in the server's model"):
            server.start()
        server.shutdown()


def test_one_publisher_and_one_receiver_per_name():
    name = segment_name()
    with WeightPublisher(name, policy_at(0)):
        with pytest.raises(RuntimeError, match="already have a publisher"):
            WeightPublisher(name, policy_at(0))
        first = SharedMemoryWeightReceiver(name)
        first.init_on_receiver(model=policy_at(0))
        second = SharedMemoryWeightReceiver(name)
        with pytest.raises(RuntimeError, match="already have a receiver"):
            second.init_on_receiver(model=policy_at(0))
        first.close()
        second.init_on_receiver(model=policy_at(0))  # free again
        second.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_torchrl_server_can_poll_the_receiver():
    torchrl_server = pytest.importorskip(
        "torchrl.modules.inference_server", reason="torchrl is not installed"
    )
    name = segment_name()
    receiver = SharedMemoryWeightReceiver(name)
    transport = torchrl_server.ThreadingTransport()
    try:
        with WeightPublisher(name, policy_at(0)) as publisher:
            publisher.publish(policy_at(4))
            with torchrl_server.InferenceServer(policy_at(0), transport,
                                                weight_sync=receiver) as server:
                client = transport.client()
                deadline = time.monotonic() + 30
                while client(observation())["action"].item() != 4.0 * WIDTH:
                    assert time.monotonic() < deadline, "the update never reached torchrl's server"
                assert receiver.version == 1
                if hasattr(server, "policy_version"):  # torchrl >= 0.13 stamps versions
                    assert server.policy_version == 1  # one per applied update
    finally:
        receiver.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_model_gets_its_weights_through_a_side_stream():
    name = segment_name()
    transport = ThreadingTransport()
    receiver = SharedMemoryWeightReceiver(name)
    policy = policy_at(0).cuda()
    with WeightPublisher(name, policy_at(0)) as publisher:
        with InferenceServer(policy, transport, weight_sync=receiver, device="cuda",
                             output_device="cpu", timeout=0.005):
            client = transport.client()
            for v in range(1, 21):
                publisher.publish(policy_at(v))
                assert wait_for_version(client, v) == (v, float(v))
            assert receiver._registered is not None  # the banks are page-locked
    receiver.close()


# -- what the review of issue 8 found ------------------------------------------------


def test_a_receiver_moves_with_its_server_and_a_new_server_gets_the_newest_version():
    """A receiver reused by a new server (another model, or the same one
    after close()) applies the newest version to that server's model before
    its first batch; the previous model keeps its own copy of the weights."""
    name = segment_name()
    receiver = SharedMemoryWeightReceiver(name)
    first, second = policy_at(0), policy_at(0)
    with WeightPublisher(name, policy_at(0)) as publisher:
        transport = ThreadingTransport()
        with InferenceServer(first, transport, weight_sync=receiver, timeout=0.005):
            publisher.publish(policy_at(3))
            assert wait_for_version(transport.client(), 1) == (1, 3.0)
        publisher.publish(policy_at(4))
        for model in (second, second):  # another model, then the same one again after close()
            transport = ThreadingTransport()
            with InferenceServer(model, transport, weight_sync=receiver, timeout=0.005) as server:
                assert served(transport.client()) == (2, 4.0)  # from its first batch
                assert server.stats()["weight_updates"] == 1
            receiver.close()
        publisher.publish(policy_at(5))
    assert first.module.weight.eq(3.0).all() and second.module.weight.eq(4.0).all()


def test_versions_only_go_up_and_a_closed_publisher_says_so():
    name = segment_name()
    publisher = WeightPublisher(name, policy_at(0))
    assert publisher.publish(version=7) == 7
    for stale in (7, 5):
        with pytest.raises(ValueError,
                           match=f"version {stale} is not newer than the last published, 7"):
            publisher.publish(version=stale)
    assert publisher.publish() == 8
    publisher.close()
    with pytest.raises(RuntimeError, match="is closed"):
        publisher.publish()
    receiver = SharedMemoryWeightReceiver(name)
    with pytest.raises(RuntimeError, match="is not open"):
        receiver.receive()


def publish_in_forked_child(publisher, outcome):
    try:
        publisher.publish(policy_at(9))
        outcome.put("published")
    except RuntimeError as exc:
        outcome.put(str(exc))


def test_a_publisher_inherited_through_fork_cannot_publish():
    import multiprocessing as mp

    name = segment_name()
    fork = mp.get_context("fork")
    with WeightPublisher(name, policy_at(0)) as publisher:
        outcome = fork.Queue()
        child = fork.Process(target=publish_in_forked_child, args=(publisher, outcome))
        child.start()
        message = outcome.get(timeout=60)
        child.join(60)
        assert "holds no role in process" in message
        assert publisher.version is None  # nothing was published
        assert publisher.publish() == 1  # the parent still can


def test_segments_are_removed_at_exit_without_close(tmp_path):
    """Publisher and receiver left open by a script that exits normally."""
    import subprocess
    import sys

    name = segment_name()
    script = tmp_path / "left_open.py"
    script.write_text(
        "import torch\n"
        "from batchserve import SharedMemoryWeightReceiver, WeightPublisher\n"
        "model = torch.nn.Linear(4, 2)\n"
        f"publisher = WeightPublisher({name!r}, model)\n"
        "publisher.publish()\n"
        f"receiver = SharedMemoryWeightReceiver({name!r})\n"
        "receiver.init_on_receiver(model=torch.nn.Linear(4, 2))\n"
        "assert receiver.receive() == 1\n"
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_too_little_shared_memory_is_an_error_not_a_crash(tmp_path):
    """A /dev/shm smaller than three copies of the weights (Docker's default
    is 64 MiB) refuses the publisher with the size needed; it used to be a
    SIGBUS at the first publish. Needs a private mount namespace to shrink
    /dev/shm in: skipped where unshare is not allowed."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "-m", "true"], capture_output=True
    ).returncode != 0:
        pytest.skip("unshare -m is not allowed here")
    script = tmp_path / "small_shm.py"
    script.write_text(
        "import torch\n"
        "from batchserve import WeightPublisher\n"
        "try:\n"
        "    WeightPublisher('batchserve-test-small', torch.nn.Linear(1024, 2048)).publish()\n"
        "except RuntimeError as exc:\n"
        "    print('refused:', exc)\n"
    )
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount -t tmpfs -o size=16m tmpfs /dev/shm && {sys.executable} {script}"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "needs 25198592 bytes of shared memory" in run.stdout

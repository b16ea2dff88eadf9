"""The benchmark harness (batchserve-bench): statistics, schedule, scenarios,
CLI errors, and a smoke run. No test asserts a speed."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from tensordict import TensorDict

pytest.importorskip("rich", reason="the bench extra is not installed")

from batchserve.bench import (  # noqa: E402
    cli,
    metrics,
    report,
    runner,
    scenario,
    schedule,
    systems,
    workload,
)
from batchserve.bench.runner import measure  # noqa: E402
from batchserve.bench.systems import BenchError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# -- exact statistics ----------------------------------------------------------


def test_nearest_rank_percentiles_are_exact():
    values = np.arange(1, 1001, dtype=np.int64)  # 1..1000
    assert metrics.nearest_rank(values, 0.50) == 500
    assert metrics.nearest_rank(values, 0.90) == 900
    assert metrics.nearest_rank(values, 0.99) == 990
    assert metrics.nearest_rank(values, 0.999) == 999
    assert metrics.nearest_rank(values, 1.0) == 1000
    assert metrics.nearest_rank(np.array([7]), 0.5) == 7
    assert np.isnan(metrics.nearest_rank(np.array([], dtype=np.int64), 0.5))


def test_latency_summary_in_microseconds_from_all_samples():
    rng = np.random.default_rng(0)
    samples = rng.integers(1_000, 10_000_000, size=100_001)
    summary = metrics.latency_summary(samples)
    ordered = np.sort(samples)
    assert summary["p50"] == ordered[50_000] / 1e3
    assert summary["max"] == ordered[-1] / 1e3
    assert summary["p99.9"] == ordered[int(np.ceil(0.999 * len(ordered))) - 1] / 1e3
    assert summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["p99.9"] <= summary["max"]


def test_cdf_points_are_monotonic_and_end_at_the_max():
    samples = np.array([5_000, 1_000, 3_000, 2_000, 4_000])
    cdf = metrics.cdf_points(samples, points=5)
    assert cdf == [[1.0, 0.2], [2.0, 0.4], [3.0, 0.6], [4.0, 0.8], [5.0, 1.0]]


def test_fast_path_summary_from_reset_counters():
    """Counters reset after the warm-up: the server's own fraction is used
    where it gives one, else fast_path_requests / requests."""
    stats = {"requests": 200, "fast_path_requests": 150, "fast_path_fraction": 0.75,
             "fast_path_refusals": {"custom collate_fn": 50}, "inline_requests": 40}
    assert metrics.fast_path_summary(stats, {"requests": 0, "fast_path_requests": 0}) == {
        "server_requests": 200, "fast_path_requests": 150, "fast_path_fraction": 0.75,
        "fast_path_refusals": {"custom collate_fn": 50}, "inline_requests": 40,
    }
    # Before the server reported a fraction (or NaN before any request).
    summary = metrics.fast_path_summary({"requests": 8, "fast_path_requests": 2})
    assert summary["fast_path_fraction"] == 0.25 and summary["fast_path_refusals"] is None
    nan = {"requests": 0, "fast_path_requests": 0, "fast_path_fraction": float("nan")}
    assert metrics.fast_path_summary(nan)["fast_path_fraction"] is None


def test_fast_path_summary_leaves_out_what_came_before_the_window():
    """Counters that were not reset (or a reset the server ignored): the
    differences count, and the server's cumulative fraction is not used."""
    before = {"requests": 100, "fast_path_requests": 0, "fast_path_fraction": 0.0,
              "fast_path_refusals": {"schema": 100}}
    after = {"requests": 400, "fast_path_requests": 300, "fast_path_fraction": 0.75,
             "fast_path_refusals": {"schema": 100}, "inline_requests": 250}
    assert metrics.fast_path_summary(after, {**before, "inline_requests": 50}) == {
        "server_requests": 300, "fast_path_requests": 300, "fast_path_fraction": 1.0,
        "fast_path_refusals": {}, "inline_requests": 200,
    }
    merged = metrics.merge_fast_path([metrics.fast_path_summary(after, before)] * 2, [1, 1])
    assert merged["inline_requests"] == 500
    rows = {("batchserve", 1): {"inline_requests": 9, "server_requests": 10}}
    assert report.inline_lines(rows) == [
        "inline calls at 1 actors (batchserve): 9 of 10 requests served on the caller's thread"]


def test_fast_path_summary_of_a_server_that_does_not_report_it():
    """torchrl's stats() have none of the keys: every field is None."""
    torchrl_like = {"avg_batch_size": 3.0, "p50_queue_ms": 0.1}
    assert set(metrics.fast_path_summary(torchrl_like, torchrl_like).values()) == {None}
    assert set(metrics.merge_fast_path([metrics.fast_path_summary(torchrl_like)], [10])
               .values()) == {None}


def test_fast_percent_reads_100_only_when_every_request_was_fast():
    assert metrics.percent_text(1.0) == "100.0"
    assert metrics.percent_text(0.9999) == "99.9"
    assert metrics.percent_text(0.25) == "25.0"
    assert metrics.percent_text(0.0) == "0.0"
    assert metrics.percent_text(None) == "—"


def test_fast_path_fraction_over_rounds():
    counted = [
        {"server_requests": 30, "fast_path_requests": 30, "fast_path_fraction": 1.0,
         "fast_path_refusals": {}},
        {"server_requests": 10, "fast_path_requests": 0, "fast_path_fraction": 0.0,
         "fast_path_refusals": {"custom collate_fn": 10}},
    ]
    merged = metrics.merge_fast_path(counted, [1, 1])
    assert merged["fast_path_fraction"] == 30 / 40
    assert (merged["server_requests"], merged["fast_path_requests"]) == (40, 30)
    assert merged["fast_path_refusals"] == {"custom collate_fn": 10}
    fractions_only = [{"fast_path_fraction": 1.0}, {"fast_path_fraction": 0.0}]
    assert metrics.merge_fast_path(fractions_only, [300, 100])["fast_path_fraction"] == 0.75


def test_histograms_merge_and_mean():
    merged = metrics.merge_histograms([{1: 2, 4: 1}, {"4": 3, 8: 1}])
    assert merged == {1: 2, 4: 4, 8: 1}
    assert metrics.histogram_mean(merged) == (2 + 16 + 8) / 7
    assert metrics.histogram_mean({}) == 0.0


# -- schedule and scenarios ----------------------------------------------------


def test_interleaving_alternates_systems_every_round():
    slots = schedule.interleave([1, 8], ["batchserve", "torchrl"], rounds=2)
    assert [(s.actors, s.round, s.system) for s in slots] == [
        (1, 0, "batchserve"), (1, 0, "torchrl"), (1, 1, "batchserve"), (1, 1, "torchrl"),
        (8, 0, "batchserve"), (8, 0, "torchrl"), (8, 1, "batchserve"), (8, 1, "torchrl"),
    ]
    with pytest.raises(ValueError):
        schedule.interleave([1], ["batchserve"], rounds=0)


@pytest.mark.parametrize("name", ["mlp_threads", "atari_threads", "processes", "cuda"])
def test_shipped_scenarios_load(name):
    loaded = scenario.load(os.path.join(ROOT, "benchmarks", name))
    assert loaded.actor_counts and loaded.rounds >= 1


def test_every_shipped_scenario_file_loads():
    """Each benchmarks/*.toml loads: the throughput ones as scenarios, the
    ones with a ``kind`` through their kind's own config."""
    from batchserve.bench import collector, ray_actors, soak, weight_sync

    kinds = {"soak": soak, "weight_sync": weight_sync, "ray": ray_actors, "collector": collector}
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".toml"))
    assert "ray.toml" in names
    for name in names:
        data, default_name = scenario.read(os.path.join(ROOT, "benchmarks", name))
        if "kind" in data:
            assert data["kind"] in cli._KINDS, name
            kinds[data["kind"]].load_config({"name": default_name, **data})
        else:
            scenario.load(os.path.join(ROOT, "benchmarks", name))


def test_the_policy_scenario_loads_as_torchrl_serves():
    policy = scenario.load(os.path.join(ROOT, "benchmarks", "policy"))
    assert policy.name == "policy" and policy.actors == "threads"
    assert policy.actor_counts == [1, 8, 32]
    assert (policy.observation_dtype, policy.observation_shape) == ("float32", [64])
    assert (policy.model, policy.client) == ("policy", "policy_client")
    assert (policy.interaction_type, policy.collate) == ("random", "maybe_dense_stack")
    reference = scenario.load(os.path.join(ROOT, "benchmarks", "mlp_threads"))
    for name in ("max_batch_size", "min_batch_size", "timeout", "device", "hidden", "actions"):
        assert getattr(policy, name) == getattr(reference, name), name
    # The scenarios that predate these fields keep their meaning.
    assert (reference.model, reference.client, reference.interaction_type,
            reference.collate) == ("mlp", "direct", None, "default")


@pytest.mark.parametrize("fields, message", [
    ({"client": "grpc"}, "client must be one of"),
    ({"client": "policy_client", "actors": "processes"}, "thread actors"),
    ({"interaction_type": "greedy"}, "interaction_type must be one of"),
    ({"collate": "lazy_stack"}, "collate must be one of"),
    ({"model": "transformer"}, "'policy'"),
])
def test_bad_policy_fields_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        scenario.Scenario(**fields).validate()


def test_the_policy_model_samples_as_a_torchrl_actor():
    """model "policy": loc/scale from the MLP, an action sampled under
    RANDOM (so two calls differ) and equal to loc under DETERMINISTIC, with
    its log-probability."""
    from tensordict import TensorDict
    from tensordict.nn import ProbabilisticTensorDictModule, TensorDictSequential

    from batchserve.bench import workload

    scen = scenario.Scenario(model="policy", hidden=[16], actions=3,
                             interaction_type="random").validate()
    policy = workload.make_policy(scen)
    assert isinstance(policy, TensorDictSequential)
    assert any(isinstance(m, ProbabilisticTensorDictModule) for m in policy.module)
    obs = TensorDict({"observation": torch.randn(4, 64)}, batch_size=[4])
    with workload.interaction_context(scen):
        first, second = policy(obs.clone()), policy(obs.clone())
    assert first["action"].shape == (4, 3) and (first["scale"] > 0).all()
    assert first["action_log_prob"].shape == (4, 3)
    assert not torch.equal(first["action"], second["action"])
    deterministic = dataclasses.replace(scen, interaction_type="deterministic")
    with workload.interaction_context(deterministic):
        out = policy(obs.clone())
    torch.testing.assert_close(out["action"], out["loc"])


def test_a_policy_client_stamps_the_interaction_type():
    """client "policy_client" is torchrl's PolicyClientModule around the
    transport's client: every request carries the scenario's interaction
    type as torchrl's int8 scalar code ("random" is 3)."""
    pytest.importorskip("torchrl")
    from concurrent.futures import Future

    from tensordict import TensorDict

    from batchserve.bench import workload

    sent = []

    class Client:
        def submit(self, td):
            sent.append(td)
            future = Future()
            future.set_result(td.clone().set("action", torch.zeros(2)))
            return future

    class Transport:
        def client(self):
            return Client()

    scen = scenario.Scenario(client="policy_client", interaction_type="random").validate()
    result = workload.make_client(scen, Transport())(TensorDict({"observation": torch.ones(4)}))
    assert "action" in result.keys()
    (request,) = sent
    stamp = request["_torchrl_inference_interaction_type"]
    assert stamp.dtype == torch.int8 and stamp.shape == () and stamp.item() == 3
    direct = workload.make_client(scenario.Scenario().validate(), Transport())
    assert isinstance(direct, Client)


def test_bad_scenarios_are_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('actors = "fibers"\n')
    with pytest.raises(ValueError, match="threads"):
        scenario.load(str(bad))
    bad.write_text("speed = 3\n")
    with pytest.raises(ValueError, match="unknown scenario field"):
        scenario.load(str(bad))


# -- command line --------------------------------------------------------------


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr()


def test_unknown_scenario_and_bad_flags_are_argparse_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = _exit_code(["no_such_scenario"], capsys)
    assert code == 2 and "unknown scenario" in out.err and "mlp_threads" in out.err
    code, out = _exit_code(["--num-actors", "0"], capsys)
    assert code == 2 and "positive integers" in out.err
    code, out = _exit_code(["--obs", "float32"], capsys)
    assert code == 2 and "DTYPE:SHAPE" in out.err
    code, out = _exit_code(["--bogus"], capsys)
    assert code == 2
    for bad in ["x", "-1", "3-1", ","]:
        code, out = _exit_code(["--cpus", bad], capsys)
        assert code == 2 and "CPU numbers" in out.err
    code, out = _exit_code(["--cpus", str(max(os.sched_getaffinity(0)) + 1)], capsys)
    assert code == 2 and "may run on CPUs" in out.err


def test_vs_torchrl_without_torchrl_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(cli, "torchrl_available", lambda: False)
    code, out = _exit_code(["--vs", "torchrl", "--quick"], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "pip install torchrl" in lines[0]


# The harness run with one of its packages absent (``sys.modules[name] =
# None`` makes ``import name`` fail as if it were not installed).
_HIDDEN_RUN = """
import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
sys.argv = ["batchserve-bench", *sys.argv[2:]]
runpy.run_module("batchserve.bench", run_name="__main__")
"""


@pytest.mark.parametrize("hidden, args, needs", [
    ("rich", ["--quick"], "rich"),
    ("rich,matplotlib", ["--quick", "--plot", "out.png"], "rich"),
    ("matplotlib", ["--quick", "--plot", "out.png"], "matplotlib"),
])
def test_without_the_bench_extra_says_what_to_install(hidden, args, needs):
    done = subprocess.run([sys.executable, "-c", _HIDDEN_RUN, hidden, *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needs in lines[0] and 'pip install "batchserve[bench]"' in lines[0]


def test_a_server_failing_mid_run_stops_the_run():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(HERE, "bench_support"),
                                                      os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "batchserve.bench", "--quick", "--no-progress", "--vs", "none",
         "--model", "failing_policy:make", "--num-actors", "2", "--duration", "2"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 1
    assert "policy exploded on purpose" in done.stdout + done.stderr


@pytest.fixture
def bench_support_on_path():
    sys.path.insert(0, os.path.join(HERE, "bench_support"))
    yield
    sys.path.remove(os.path.join(HERE, "bench_support"))


def test_failing_process_run_leaves_no_orphans(bench_support_on_path):
    pytest.importorskip("torchrl")
    scen = scenario.Scenario(
        actors="processes", actor_counts=[2], model="failing_policy:make",
        duration=5.0, warmup=0.2, rounds=1,
    ).validate()
    with pytest.raises(BenchError, match="exploded"):
        measure("batchserve", scen, 2, 0)
    assert multiprocessing.active_children() == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dying_torchrl_server_is_reported_not_waited_for(bench_support_on_path):
    """torchrl's worker dies on SystemExit and leaves its callers waiting;
    the harness notices the dead server instead of hanging."""
    pytest.importorskip("torchrl")
    scen = scenario.Scenario(
        actor_counts=[2], model="failing_policy:make_exiting", requests=100,
        warmup=0.0, rounds=1,
    ).validate()
    # Reported as the dead server, or as the "shutting down" error torchrl's
    # dying worker hands its pending callers, whichever the harness sees first.
    with pytest.raises(BenchError, match="stopped|shutting down"):
        measure("torchrl", scen, 2, 0)


def test_a_failing_overhead_measurement_is_reported_not_waited_for(bench_support_on_path):
    scen = scenario.Scenario(
        actor_counts=[1], model="failing_policy:make", duration=5.0, warmup=0.0, rounds=1,
    ).validate()
    with pytest.raises(BenchError, match="exploded"):
        runner.measure_overhead("batchserve", scen)


@pytest.mark.timeout(300)
def test_the_null_server_of_process_actors_answers_through_the_slots():
    """Process actors' null server is the C++ echo on a SharedMemoryTransport
    (a round trip through the slots, no model): every request answered with
    the policy's output for one request, and the model timed at the actors'
    batch as for thread actors."""
    scen = scenario.Scenario(
        actors="processes", actor_counts=[2], hidden=[16], requests=40, warmup=0.05, rounds=1,
    ).validate()
    m = measure(systems.NULL, scen, 2, 0)
    assert m.requests == 40 and len(m.latencies_ns) == 40
    assert m.batch_sizes == {2: 64}  # the forwards timed at 2 actors' batch


def test_the_echo_server_answers_with_the_response_it_was_given():
    from tensordict import TensorDict

    import batchserve
    from batchserve.bench.null_server import EchoServer

    transport = batchserve.SharedMemoryTransport(
        TensorDict({"observation": torch.zeros(4)}),
        TensorDict({"action": torch.zeros(3), "policy_version": torch.zeros((), dtype=torch.long)}),
        num_slots=4,
    )
    answer = TensorDict({"action": torch.arange(3.0), "extra": torch.ones(2)})
    server = EchoServer(transport, answer)
    assert not server.is_alive and server.start().is_alive and server.stats() == {}
    try:
        result = transport.client()(TensorDict({"observation": torch.ones(4)}), timeout=30)
        assert result["action"].tolist() == [0.0, 1.0, 2.0]
        assert result["policy_version"].item() == 0  # a key it was not given: zeros
    finally:
        server.shutdown()
    assert not server.is_alive


def test_request_count_runs_measure_exactly_that_many():
    scen = scenario.Scenario(
        actor_counts=[3], hidden=[16], requests=50, warmup=0.05, rounds=1
    ).validate()
    m = measure("batchserve", scen, 3, 0)
    assert m.requests == 50 and len(m.latencies_ns) == 50 and m.seconds > 0
    assert sum(m.batch_sizes.values()) >= 1
    with pytest.raises(ValueError, match="at least the largest actor count"):
        scenario.Scenario(actor_counts=[8], requests=4).validate()


def test_the_interleaved_overhead_measures_both_kinds_in_whole_blocks():
    scen = scenario.Scenario(actor_counts=[1], hidden=[16], requests=200, warmup=0.0,
                             rounds=1).validate()
    result = runner.measure_overhead("batchserve", scen)
    assert result["calls"] == 2 * runner.OVERHEAD_BLOCK  # whole blocks, at least 200
    assert 0 < result["bare_p50_us"] and 0 < result["p50_us"]
    assert result["overhead_us"] == pytest.approx(result["p50_us"] - result["bare_p50_us"])
    assert 0 < result["floor_p50_us"]  # the floor's blocks, alternated with the others'
    assert result["floor_us"] == pytest.approx(result["floor_p50_us"] - result["bare_p50_us"])
    line = report.interleaved_lines({"batchserve": result})[0]
    assert "the floor under it (a batch of one in and its row out, no server: " in line
    processes = dataclasses.replace(scen, actors="processes")
    with pytest.raises(BenchError, match="thread actors"):
        runner.measure_overhead("batchserve", processes)


@pytest.mark.parametrize("model", ["mlp", "policy"])
def test_the_floor_hands_back_the_row_a_server_would(model):
    """runner.floor_call: the model's output for a batch of one, as one row;
    the request's own tensors are copied, never handed back."""
    scen = scenario.Scenario(model=model, hidden=[16]).validate()
    policy = workload.make_policy(scen)
    floor = runner.floor_call(policy, scen)
    td = workload.request(workload.make_leaves(scen))
    torch.manual_seed(0)
    with torch.no_grad():
        row = floor(td)
        torch.manual_seed(0)
        expected = policy(td.unsqueeze(0).clone())[0]
    assert row.batch_size == torch.Size([]) and set(row.keys()) == set(expected.keys())
    for key in expected.keys():
        assert torch.equal(row[key], expected[key]), key
    for key, leaf in td.items():
        assert row[key].data_ptr() != leaf.data_ptr()  # passed through: copied
    on_gpu = dataclasses.replace(scen, device="cuda")
    assert runner.floor_call(policy, on_gpu) is None


def test_a_model_whose_output_has_no_floor_leaves_it_out(bench_support_on_path):
    """A model returning a lazy stack instead of a TensorDict: the floor is
    left out of the interleaved overhead (null), which is still measured."""
    scen = scenario.Scenario(model="bench_models:lazy_output", actor_counts=[1], hidden=[16],
                             requests=100, warmup=0.0, rounds=1).validate()
    with pytest.raises(runner.NoFloor, match="LazyStackedTensorDict"):
        runner.floor_call(workload.make_policy(scen), scen)(
            workload.request(workload.make_leaves(scen)))
    result = runner.measure_overhead("batchserve", scen)
    assert result["calls"] == runner.OVERHEAD_BLOCK and result["p50_us"] > 0
    assert result["floor_p50_us"] is None and result["floor_us"] is None
    assert "floor" not in report.interleaved_lines({"batchserve": result})[0]


@pytest.mark.timeout(300)
def test_server_nice_never_reaches_the_actor_measuring_the_overhead(monkeypatch):
    """Thread actors of a server process: only the child's forward thread
    gets server_nice, not the actor thread that runs the bare calls here."""
    set_here = []
    monkeypatch.setattr(os, "setpriority", lambda *args: set_here.append(args))
    own = os.getpriority(os.PRIO_PROCESS, 0)
    scen = scenario.Scenario(server="process", actor_counts=[1], hidden=[16], requests=100,
                             warmup=0.0, rounds=1, torch_threads=1,
                             server_nice=min(own + 1, 19)).validate()
    result = runner.measure_overhead("batchserve", scen)
    assert result["calls"] == runner.OVERHEAD_BLOCK
    assert set_here == []


@pytest.mark.timeout(300)
@pytest.mark.parametrize("system, single_file", [
    ("batchserve", False), ("batchserve", True), ("torchrl", False),
])
def test_a_process_server_serves_thread_actors_and_records_its_forwards(system, single_file):
    """server "process": each system's ProcessInferenceServer, thread actors
    on its SharedMemoryTransport; the forwards are recorded in the child
    (shared memory) and its CPU time is counted."""
    if system == "torchrl":
        pytest.importorskip("torchrl")
    scen = scenario.Scenario(
        server="process", single_file=single_file, actor_counts=[3], hidden=[16],
        requests=60, warmup=0.05, rounds=1, torch_threads=1,
    ).validate()
    m = measure(system, scen, 3, 0)
    assert m.requests == 60 and len(m.latencies_ns) == 60
    forwards = sum(m.batch_sizes.values())
    assert forwards >= 1 and len(m.forward_ns) == forwards
    assert all(1 <= size <= 3 for size in m.batch_sizes)
    assert m.cpu_s > 0
    if system == "batchserve":
        assert m.fast_path is not None and m.fast_path["fast_path_requests"] > 0


def test_the_shared_forward_record_is_written_in_another_process():
    """What a process server's RecordingModel writes in its child, the
    parent reads; nothing is kept outside the window."""
    record = workload.SharedForwardRecord(max_batch_size=4, capacity=3)
    ctx = multiprocessing.get_context("spawn")
    record.start()
    child = ctx.Process(target=_record_forwards, args=(record, [(2, 10), (9, 20), (1, 30),
                                                                (3, 40)]))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    sizes, forward_ns = record.stop()
    assert sizes == {1: 1, 2: 1, 3: 1, 4: 1}  # 9 counts as the largest size
    assert forward_ns == [10, 20, 30]  # past capacity: in the histogram only
    record.add(2, 50)
    record.start()
    assert record.stop() == ({}, [])


def _record_forwards(record, forwards):
    for size, ns in forwards:
        record.add(size, ns)


def test_server_nice_is_set_in_the_forward_thread_of_every_system():
    """The scenario's server_nice reaches each system's forward thread the
    same way: the RecordingModel sets it there, on the first forward."""
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if own > 17:
        pytest.skip(f"this process runs at nice {own}: no room above it")
    nice = own + 2  # raising one's nice value needs no privilege
    scen = scenario.Scenario(actors="processes", server_nice=nice).validate()
    model = workload.recording_model(scen)
    model(TensorDict({"observation": torch.zeros(2, 64)}, batch_size=[2]))  # the main thread's
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # are the harness's
    seen = []

    def forward() -> None:
        model(TensorDict({"observation": torch.zeros(2, 64)}, batch_size=[2]))
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=forward)
    thread.start()
    thread.join()
    assert seen == [nice]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    assert report.describe(scen).endswith(f", server nice {nice}")


@pytest.mark.parametrize(
    "fields, error, message",
    [({"actors": "processes", "server_nice": 20}, ValueError, "from -20 to 19"),
     ({"actors": "processes", "server_nice": True}, TypeError, "server_nice"),
     ({"server_nice": -5}, ValueError, "process actors or a server process")],
)
def test_bad_server_nice_is_rejected(fields, error, message):
    with pytest.raises(error, match=message):
        scenario.Scenario(**fields).validate()


def test_a_bad_server_is_rejected():
    with pytest.raises(ValueError, match="server must be one of"):
        scenario.Scenario(server="fiber").validate()


def test_flags_override_scenario_fields(tmp_path):
    path = tmp_path / "counted.toml"
    path.write_text('name = "counted_threads"\nrequests = 5000\nactor_counts = [2]\n')
    parser = cli.build_parser()
    (chosen,) = cli.resolve_scenarios(parser, parser.parse_args([str(path), "--duration", "1"]))
    assert chosen.requests is None and chosen.duration == 1
    (chosen,) = cli.resolve_scenarios(parser, parser.parse_args([str(path), "--quick"]))
    assert chosen.requests is None and chosen.actor_counts == [1, 8]
    (chosen,) = cli.resolve_scenarios(
        parser, parser.parse_args([str(path), "--actors", "processes", "--obs", "uint8:3x84x84"])
    )
    assert chosen.name == "counted_processes" and chosen.observation_shape == [3, 84, 84]
    (chosen,) = cli.resolve_scenarios(
        parser, parser.parse_args([str(path), "--server", "process", "--single-file"]))
    assert (chosen.server, chosen.single_file, chosen.actors) == ("process", True, "threads")
    (chosen,) = cli.resolve_scenarios(parser, parser.parse_args([str(path)]))
    assert (chosen.server, chosen.single_file, chosen.server_nice) == ("thread", False, None)
    (chosen,) = cli.resolve_scenarios(
        parser, parser.parse_args([str(path), "--actors", "processes", "--server-nice", "-10"]))
    assert chosen.server_nice == -10


def test_an_image_workload_carries_both_leaves_through_the_fast_path(tmp_path):
    """--image adds a "pixels" leaf beside the observation; the obs_conv
    model reads both; the requests take the fast path."""
    path = tmp_path / "image.toml"
    path.write_text('actor_counts = [2]\nobservation = { shape = [8], dtype = "float32" }\n'
                    'image = { shape = [3, 36, 36], dtype = "uint8" }\nmodel = "obs_conv"\n'
                    'hidden = [16]\nrequests = 40\nwarmup = 0.05\nrounds = 1\n')
    scen = scenario.load(str(path))
    assert (scen.image_shape, scen.image_dtype) == ([3, 36, 36], "uint8")
    spec = systems.request_spec(scen)
    assert spec["pixels"].dtype == torch.uint8 and spec["pixels"].shape == (3, 36, 36)
    request, response, _ = systems.slot_specs(scen, 2, workload.make_policy(scen))
    assert set(request.keys()) == {"observation", "pixels"} and "action" in response.keys()
    m = measure("batchserve", scen, 2, 0)
    assert m.requests == 40
    # The fast path learns the schema from the first requests (up to one per
    # actor when the warm-up served none): every later one takes it.
    served = m.fast_path
    assert served["fast_path_requests"] >= served["server_requests"] - 2 > 0
    parser = cli.build_parser()
    (chosen,) = cli.resolve_scenarios(parser, parser.parse_args(
        ["--image", "uint8:3x84x84", "--model", "obs_conv"]))
    assert chosen.image_shape == [3, 84, 84]


@pytest.mark.parametrize("fields, message", [
    (dict(model="obs_conv"), "needs an image"),
    (dict(image_shape=[84, 84]), "channels, height, width"),
    (dict(static_batch_size=[8, 64]), "needs a CUDA device"),
    (dict(static_batch_size=[8], device="cuda"), "at least max_batch_size"),
])
def test_bad_image_and_static_fields_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        scenario.Scenario(**fields).validate()


def test_torchrl_gets_the_largest_static_batch_size():
    scen = scenario.Scenario(device="cuda", static_batch_size=[16, 64]).validate()
    ours, theirs = systems.server_kwargs(scen, "batchserve"), systems.server_kwargs(scen, "torchrl")
    assert ours["static_batch_size"] == [16, 64] and theirs["static_batch_size"] == 64
    assert set(ours["request_spec"].keys()) == {"observation"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_a_cuda_scenario_without_a_gpu_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([os.path.join(ROOT, "benchmarks", "cuda_threads"), "--no-progress"])
    assert exit_.value.code == 1
    assert "torch sees no CUDA device" in " ".join(capsys.readouterr().err.split())


def test_packaged_scenarios_resolve_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = cli.build_parser()
    for name in ("atari_threads", "benchmarks/atari_threads", "benchmarks/atari_threads.toml"):
        (chosen,) = cli.resolve_scenarios(parser, parser.parse_args([name]))
        assert chosen.name == "atari_threads" and chosen.model == "conv"


# -- smoke run -----------------------------------------------------------------


def test_quick_run_writes_valid_json_and_a_plot(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    done = subprocess.run(
        [sys.executable, "-m", "batchserve.bench", "--quick", "--no-progress",
         "--num-actors", "1,2", "--duration", "0.2", "--warmup", "0.05",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "req/s" in done.stdout and "batchserve" in done.stdout
    document = json.loads(out_json.read_text())
    with open(report.SCHEMA_PATH) as f:
        jsonschema.validate(document, json.load(f))
    (result,) = document["scenarios"]
    systems = {(r["system"], r["actors"]) for r in result["results"]}
    assert {("bare", 1), ("batchserve", 1), ("batchserve", 2)} <= systems
    max_batch_size = result["scenario"]["max_batch_size"]
    for r in result["results"]:
        assert r["requests"] > 0 and r["requests_per_s"] > 0
        sizes = [int(k) for k in r["batch_size_histogram"]]
        assert sizes and 1 <= min(sizes) and max(sizes) <= max_batch_size
        assert r["latency_us"]["p50"] <= r["latency_us"]["p99"] <= r["latency_us"]["max"]
    assert set(result["overhead_us"]) == {"batchserve"}
    (interleaved,) = result["overhead_interleaved"].values()
    assert set(result["overhead_interleaved"]) == {"batchserve"}
    assert interleaved["calls"] >= runner.OVERHEAD_BLOCK
    assert interleaved["overhead_us"] == pytest.approx(
        interleaved["p50_us"] - interleaved["bare_p50_us"])
    assert interleaved["floor_us"] == pytest.approx(
        interleaved["floor_p50_us"] - interleaved["bare_p50_us"])
    assert "overhead per call at 1 actor, interleaved (batchserve" in done.stdout
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_tiny_policy(tmp_path, capsys, *args):
    """benchmarks/policy through the CLI, 40 requests, batchserve only (plus
    ``args``): asserts it exits 0 and its JSON fits the schema; returns what
    it printed and the JSON."""
    out = tmp_path / "policy.json"
    with pytest.raises(SystemExit) as exit_:
        cli.main([os.path.join(ROOT, "benchmarks", "policy"), "--requests", "40",
                  "--warmup", "0", "--rounds", "1", "--no-progress", "--json", str(out), *args])
    printed = capsys.readouterr()
    assert exit_.value.code == 0, printed.err
    document = json.loads(out.read_text())
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        with open(report.SCHEMA_PATH) as f:
            jsonschema.validate(document, json.load(f))
    return printed, document


def test_cpu_lists_read_as_taskset_writes_them():
    assert cli._cpu_list("0") == {0}
    assert cli._cpu_list("0-2,5") == {0, 1, 2, 5}
    assert report.cpu_list({0, 1, 2, 5}) == "0-2,5" and report.cpu_list([3]) == "3"


@pytest.mark.timeout(300)
def test_a_run_confined_to_one_cpu_says_so_and_gives_the_cpus_back(tmp_path, capsys):
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    printed, document = run_tiny_policy(tmp_path, capsys, "--cpus", str(cpu))
    assert document["machine"]["cpus"] == [cpu]
    if (os.cpu_count() or 1) > 1:  # the footer names the CPUs when they are not all
        assert f"run on CPU {cpu};" in printed.out
    assert os.sched_getaffinity(0) == allowed  # the test process has its CPUs back


@pytest.mark.timeout(300)
def test_a_tiny_policy_run_reports_the_fast_path_fraction(tmp_path, capsys):
    """benchmarks/policy through the CLI, one actor, a few requests,
    batchserve only: every row carries the fast path's share, a number in
    [0, 1] for batchserve (None for the bare call), in the JSON and as the
    table's "fast %" column."""
    pytest.importorskip("torchrl")
    printed, document = run_tiny_policy(tmp_path, capsys, "--num-actors", "1")
    assert "fast %" in printed.out
    (result,) = document["scenarios"]
    assert result["scenario"]["client"] == "policy_client"
    rows = {r["system"]: r for r in result["results"]}
    assert set(rows) == {"bare", "batchserve"}
    served = rows["batchserve"]
    assert served["requests"] == 40
    fraction = served["fast_path_fraction"]
    assert isinstance(fraction, float) and 0.0 <= fraction <= 1.0
    # The server counts from its reset after the warm-up to the end; the one
    # actor's request in flight across the reset may be left out.
    assert served["server_requests"] >= served["requests"] - 1
    assert served["fast_path_requests"] == round(fraction * served["server_requests"])
    assert rows["bare"]["fast_path_fraction"] is None


@pytest.mark.timeout(300)
def test_the_null_server_gives_the_actors_limit(tmp_path, capsys):
    """--limit runs the null server beside batchserve: the same actors
    (torchrl's PolicyClientModule submitting to it), answered at once; its
    row holds the model's forward at the actors' batch, and the report
    gives the limit and each server's share of it."""
    pytest.importorskip("torchrl")
    printed, document = run_tiny_policy(tmp_path, capsys, "--num-actors", "2", "--limit")
    assert "of limit" in printed.out
    assert "limit at 2 actors (null)" in printed.out and "limit at 2 actors (echo)" in printed.out
    (result,) = document["scenarios"]
    rows = {r["system"]: r for r in result["results"]}
    assert set(rows) == {"bare", "batchserve", "null", "echo"}
    for limit in ("null", "echo"):  # the echo: through batchserve's queue, no model
        row = rows[limit]
        assert row["requests"] == 40 and row["requests_per_s"] > 0
        assert row["batch_size_histogram"] == {"2": 64}  # the forwards timed at 2 actors' batch
        assert row["forward_ms_p50"] > 0 and row["fast_path_fraction"] is None


def test_the_limit_counts_the_actors_and_the_model():
    """limit_rps: the actors' own time per request plus the model's share
    at the batch they form (10 µs + 1 ms / 10), as multiples in the lines."""
    rows = {
        ("null", 10): {"system": "null", "actors": 10, "requests_per_s": 100_000.0,
                       "batch_size_mean": 10.0, "forward_ms_p50": 1.0},
        ("torchrl", 10): {"system": "torchrl", "actors": 10, "requests_per_s": 1_000.0},
        ("batchserve", 10): {"system": "batchserve", "actors": 10,
                             "requests_per_s": 4_545.45},
    }
    assert report.limit_rps(rows[("null", 10)]) == pytest.approx(1e6 / 110)
    (line,) = report.limit_lines(rows)
    assert "limit at 10 actors (null): 9,091 req/s" in line
    assert "= 9.09× torchrl" in line and "batchserve reaches 50% of it" in line
    assert report._of_limit(rows, rows[("batchserve", 10)]) == pytest.approx(0.5)


def test_a_server_is_read_against_the_echo_where_it_ran():
    """With the echo's row (the hand-off counted) beside the null server's,
    the limits line up by actor count and a server's share is of the echo."""
    rows = {
        ("null", 10): {"system": "null", "actors": 10, "requests_per_s": 100_000.0,
                       "batch_size_mean": 10.0, "forward_ms_p50": 1.0},
        ("echo", 10): {"system": "echo", "actors": 10, "requests_per_s": 10_000.0,
                       "batch_size_mean": 10.0, "forward_ms_p50": 1.0},
        ("batchserve", 10): {"system": "batchserve", "actors": 10, "requests_per_s": 2_500.0},
    }
    assert report.limit_rps(rows[("echo", 10)]) == pytest.approx(1e6 / 200)
    echo_line, null_line = report.limit_lines(rows)
    assert echo_line.startswith("limit at 10 actors (echo): 5,000 req/s (with the hand-off")
    assert "batchserve reaches 50% of it" in echo_line
    assert null_line.startswith("limit at 10 actors (null)")
    assert report._of_limit(rows, rows[("batchserve", 10)]) == pytest.approx(0.5)
    assert report._of_limit(rows, rows[("echo", 10)]) is None


def test_the_echo_runs_for_thread_actors_of_an_in_process_server_only():
    threads = scenario.Scenario(actor_counts=[2]).validate()
    processes = scenario.Scenario(actors="processes", actor_counts=[2]).validate()
    server_process = scenario.Scenario(actor_counts=[2], server="process").validate()
    assert systems.systems_for(threads, False, limit=True) == ["batchserve", "null", "echo"]
    assert systems.systems_for(processes, False, limit=True) == ["batchserve", "null"]
    assert systems.systems_for(server_process, False, limit=True) == ["batchserve", "null"]
    assert systems.systems_for(threads, False) == ["batchserve"]


@pytest.mark.timeout(120)
def test_the_queue_echo_answers_every_caller_through_the_queue():
    """QueueEcho serves a ThreadingTransport's callers with its one
    response, in full batches of all of them (and inline for a lone one):
    blocking calls and futures, fast-path and general requests; stopped,
    the queue refuses new requests."""
    import threading

    from tensordict import TensorDict

    import batchserve
    from batchserve.bench.null_server import QueueEcho

    transport = batchserve.ThreadingTransport()
    response = TensorDict({"action": torch.ones(3)})
    echo = QueueEcho(transport, response, batch_size=4, max_batch_size=64,
                     idle_wait=0.1).start()
    answers, errors = [], []

    def actor() -> None:
        try:
            client = transport.client()
            for _ in range(25):
                answers.append(client(TensorDict({"observation": torch.zeros(4)})))
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=actor) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(answers) == 100
        assert all(a is response for a in answers)
        assert transport.request_spec is not None  # learned from the first request
        client = transport.client()
        other = TensorDict({"observation": torch.zeros(7)})  # not the schema: general path
        assert client(other) is response  # alone: served once the full-batch wait ends
        assert client.submit(other).result(timeout=30) is response
    finally:
        echo.shutdown(timeout=30)
    assert not echo.is_alive
    with pytest.raises(Exception, match="shut down|closed"):
        transport.client()(TensorDict({"observation": torch.zeros(4)}))


def test_null_clients_answer_at_once_and_travel_to_processes():
    from tensordict import TensorDict

    from batchserve.bench.null_server import NullServer, NullTransport

    answer = TensorDict({"action": torch.ones(3)})
    client = pickle.loads(pickle.dumps(NullTransport(answer).client()))
    request = TensorDict({"observation": torch.zeros(4)})
    assert (client(request)["action"] == 1).all()
    future = client.submit(request)
    assert future.done() and not future.cancel() and future.exception() is None
    assert (future.result(timeout=0)["action"] == 1).all()
    called = []
    future.add_done_callback(called.append)
    assert called == [future]
    server = NullServer()
    assert not server.is_alive and server.start().is_alive and server.stats() == {}
    server.shutdown()
    assert not server.is_alive


def test_general_path_reasons_are_printed_per_row():
    rows = {
        ("batchserve", 8): {"fast_path_refusals": {"schema": 2, "custom collate_fn": 9}},
        ("batchserve", 1): {"fast_path_refusals": {}},
        ("torchrl", 8): {"fast_path_refusals": None},
    }
    assert report.refusal_lines(rows) == [
        "general path at 8 actors (batchserve): custom collate_fn 9, schema 2"]


def test_the_collector_report_has_a_fast_path_column():
    from batchserve.bench import collector

    config = dataclasses.asdict(collector.CollectorConfig())
    text = collector.format_report({"config": config, "results": [
        {"system": "batchserve", "num_envs": 8, "fps": 2000.0, "runs": [{"fps": 2000.0}],
         "fast_path_fraction": 0.5, "fast_path_refusals": {"schema": 7}, "errors": []},
        {"system": "torchrl", "num_envs": 8, "fps": 1000.0, "runs": [{"fps": 1000.0}],
         "fast_path_fraction": None, "fast_path_refusals": None, "errors": []},
    ]})
    header, batchserve_line, refusals, torchrl_line = text.splitlines()[1:]
    assert header.rstrip().endswith("fast %")
    assert batchserve_line.rstrip().endswith("50.0") and torchrl_line.rstrip().endswith("—")
    assert "schema 7" in refusals


def _run_kind_scenario(tmp_path, capsys, toml: str, args: list[str]):
    """Runs a scaled-down ``kind`` scenario file through the CLI; asserts
    it exits 0 and returns its one run from the JSON, and the file."""
    small = tmp_path / "tiny.toml"
    small.write_text(toml)
    out = tmp_path / "run.json"
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(small), "--no-progress", "--json", str(out), *args])
    assert exit_.value.code == 0, capsys.readouterr()
    kind = scenario.tomllib.loads(toml)["kind"]
    (run,) = json.loads(out.read_text())[kind + "s"]
    return run, small


@pytest.mark.timeout(300)
def test_the_weight_sync_scenario_runs_every_system(tmp_path, capsys):
    """benchmarks/weight_sync's engine, scaled down: each system serves,
    applies the trainer's updates and measures their latency."""
    vs = ["--vs", "torchrl"] if systems.torchrl_available() else []
    run, _ = _run_kind_scenario(
        tmp_path, capsys,
        'kind = "weight_sync"\nobservation = 8\nhidden = [32]\nactions = 2\nactors = 2\n'
        "update_hz = 20.0\nduration = 0.4\nrounds = 1\nsettle = 0.1\nwarmup = 0.1\n",
        vs,
    )
    names = [r["system"] for r in run["results"]]
    assert names == ["batchserve", "batchserve-inproc",
                     *(["torchrl-shared", "torchrl-mp"] if vs else [])]
    for r in run["results"]:
        assert r["errors"] == [], r
        assert r["updates_published"] >= 1 and r["updates_applied"] >= 1
        assert r["updates_measured"] >= 1 and r["update_latency_us"]["p50"] > 0
        if r["system"].startswith("batchserve"):
            assert 0.0 <= r["fast_path_fraction"] <= 1.0
    out = capsys.readouterr().out
    assert "latency p50" in out and "fast %" in out


@pytest.mark.timeout(300)
def test_the_ray_scenario_runs_every_system(tmp_path, capsys):
    """benchmarks/ray's engine, scaled down: Ray actors call each system's
    server (in this process through its Ray transport, or hosted in a Ray
    actor)."""
    pytest.importorskip("ray")
    vs = ["--vs", "torchrl"] if systems.torchrl_available() else []
    run, small = _run_kind_scenario(
        tmp_path, capsys,
        'kind = "ray"\nobservation = 8\nhidden = [32]\nactions = 2\nactor_counts = [3]\n'
        "duration = 0.5\nwarmup = 0.3\nrounds = 1\nnum_cpus = 2\n",
        ["--num-actors", "2", *vs],
    )
    assert [(r["system"], r["actors"]) for r in run["results"]] == [
        ("batchserve", 2), ("batchserve-hosted", 2), *([("torchrl", 2)] if vs else [])]
    for r in run["results"]:
        assert r["errors"] == [], r
        assert r["requests"] > 0 and r["requests_per_s"] > 0
        assert 0 < r["latency_us"]["p50"] <= r["latency_us"]["p99"] <= r["latency_us"]["max"]
        assert r["mean_batch_size"] >= 1
        # batchserve's servers say how many requests took the fast path.
        if r["system"] == "torchrl":
            assert r["fast_path_fraction"] is None
        else:
            assert 0 <= r["fast_path_fraction"] <= 1
    out = capsys.readouterr().out
    assert "req/s" in out and "fast %" in out
    code, err = _exit_code([str(small), "--obs", "float32:4"], capsys)
    assert code == 2 and "takes only" in err.err


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args", [[], ["--scenario", os.path.join(ROOT, "benchmarks", "policy")]])
def test_the_stage_breakdown_times_every_stage(args):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "stage_breakdown.py"),
         "--actors", "2", "--seconds", "0.2", *args],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert "2 actors:" in done.stdout
    for stage in ("wait", "gather", "input", "model", "hand-back", "other"):
        assert f" {stage} " in done.stdout


@pytest.mark.timeout(300)
def test_the_stage_breakdown_takes_one_callers_call_apart():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "stage_breakdown.py"),
         "--one-caller", "200", "--torch-threads", "1"],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("one caller (mlp_threads), 200 calls of each in turn")
    steps = [line.split()[0] for line in lines[1:6]]
    assert steps == ["bare", "floor", "rows", "serve_one", "client"]
    assert "overhead (client - bare)" in lines[6]
    # A scenario whose actors call through a wrapper is not called plainly.
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "stage_breakdown.py"),
         "--one-caller", "10", "--scenario", os.path.join(ROOT, "benchmarks", "policy")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "without a client wrapper" in done.stderr


def test_the_stage_breakdown_takes_thread_scenarios_only():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "stage_breakdown.py"),
         "--scenario", os.path.join(ROOT, "benchmarks", "processes")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "thread scenario" in done.stderr

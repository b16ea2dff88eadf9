"""The benchmark harness (batchserve-bench): statistics, schedule, scenarios,
CLI errors, and a smoke run. No test asserts a speed."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("rich", reason="the bench extra is not installed")

from batchserve.bench import cli, metrics, report, scenario, schedule, systems  # noqa: E402
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


def test_request_count_runs_measure_exactly_that_many():
    scen = scenario.Scenario(
        actor_counts=[3], hidden=[16], requests=50, warmup=0.05, rounds=1
    ).validate()
    m = measure("batchserve", scen, 3, 0)
    assert m.requests == 50 and len(m.latencies_ns) == 50 and m.seconds > 0
    assert sum(m.batch_sizes.values()) >= 1
    with pytest.raises(ValueError, match="at least the largest actor count"):
        scenario.Scenario(actor_counts=[8], requests=4).validate()


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
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert "latency p50" in capsys.readouterr().out


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
    assert "req/s" in capsys.readouterr().out
    code, err = _exit_code([str(small), "--obs", "float32:4"], capsys)
    assert code == 2 and "takes only" in err.err

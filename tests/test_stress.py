"""Stress with random shutdown timing (the CI variant of benchmarks/soak):
actor threads and processes, random payload sizes, fast and general paths
mixed, futures, caller timeouts, and both servers restarted at random
moments. Zero lost, duplicated, misrouted or corrupted results; no hang.
See batchserve/bench/soak.py for what each run checks."""

from __future__ import annotations

import json

import pytest

from batchserve.bench import cli, soak

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(
    "config",
    [
        soak.SoakConfig(name="mixed", requests=40_000, threads=6, processes=3, restarts=5),
        # More actors than slots and batch rows, more general requests and
        # more callers giving up (withdraw and abandon racing the server).
        soak.SoakConfig(name="crowded", requests=30_000, threads=24, processes=6, restarts=8,
                        general_fraction=0.3, timeout_fraction=0.05, max_batch_size=8,
                        num_slots=8, seed=1),
    ],
    ids=lambda c: c.name,
)
def test_nothing_is_lost_duplicated_or_misrouted(config):
    report = soak.run_soak(config)
    assert soak.failures(report) == [], soak.format_report(report)
    assert report["restarts"] == 2 * config.restarts  # both servers, every planned restart
    assert 0 < report["fast_path_requests"] < report["forwarded"]  # both paths served
    assert report["ended"] == report["submitted"]


def test_the_soak_scenario_runs_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "soak.json"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["benchmarks/soak", "--requests", "3000", "--no-progress", "--json", str(out)])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "verdict: OK" in printed and "RSS of the serving process" in printed
    (result,) = json.loads(out.read_text())["soaks"]
    assert result["results"] >= 3000 and result["lost"] == 0 and result["misrouted"] == 0
    assert {"rss_drift_mb", "longest_stall_ms", "longest_call_ms"} <= set(result)


def test_a_soak_scenario_refuses_throughput_flags():
    with pytest.raises(SystemExit) as exit_:
        cli.main(["benchmarks/soak", "--num-actors", "4"])
    assert exit_.value.code == 2

"""batchserve-bench: measure batchserve (and torchrl) under your workload.

    batchserve-bench --vs torchrl                   # headline sweep, ~40 s
    batchserve-bench --quick                        # ~10 s
    batchserve-bench benchmarks/atari_threads --vs torchrl --json out.json --plot out.png
    batchserve-bench benchmarks/policy --vs torchrl  # stochastic actor via PolicyClientModule
    batchserve-bench benchmarks/server_process --vs torchrl  # thread actors, server in a process
    batchserve-bench --actors threads --num-actors 1,4,16 --obs uint8:3x84x84 --model conv
    batchserve-bench benchmarks/soak                # 1 M requests: lost/misrouted, RSS, stalls
    batchserve-bench benchmarks/weight_sync --vs torchrl  # weight updates at 10 Hz under load
    batchserve-bench benchmarks/ray --vs torchrl    # Ray actors: RayTransport vs torchrl's
    batchserve-bench --cpus 0 --vs torchrl          # the whole run confined to CPU 0
    batchserve-bench benchmarks/processes --vs torchrl --server-nice -10  # servers before actors
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

import torch

from batchserve.bench import INSTALL_HINT, missing_modules, report
from batchserve.bench import scenario as scenarios
from batchserve.bench.runner import measure, measure_bare, measure_overhead
from batchserve.bench.schedule import interleave
from batchserve.bench.systems import BenchError, systems_for, torchrl_available


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cpu_list(text: str) -> set[int]:
    """CPU numbers as taskset's --cpu-list writes them: ``0``, ``0,2``, ``0-3,6``."""
    cpus: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, dash, last = part.partition("-")
            cpus.update(range(int(first), int(last if dash else first) + 1))
    except ValueError:
        cpus = set()
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"expected CPU numbers such as 0 or 0-3,6, got {text!r}")
    return cpus


def _observation(text: str) -> tuple[str, list[int]]:
    dtype, _, shape = text.partition(":")
    try:
        dims = [int(d) for d in shape.lower().split("x")] if shape else []
    except ValueError:
        dims = []
    if not dims or min(dims) < 1 or dtype not in scenarios.DTYPES:
        raise argparse.ArgumentTypeError(
            f"expected DTYPE:SHAPE such as float32:64 or uint8:3x84x84, got {text!r}"
        )
    return dtype, dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batchserve-bench",
        description="Latency/throughput harness: batchserve side by side with torchrl's "
        "InferenceServer and a bare model(td) call.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help="scenario file (benchmarks/NAME[.toml]); none: the headline sweep")
    p.add_argument("--quick", action="store_true", help="fewer, shorter measurements (~15 s)")
    p.add_argument("--vs", choices=["torchrl", "none"], default="none",
                   help="also run torchrl's InferenceServer on the same workload, "
                   "interleaved round by round (default: none)")
    p.add_argument("--limit", action="store_true",
                   help="also run the null server: the same actors answered at once, no "
                   "server and no model; their limit, and each system's share of it")
    p.add_argument("--actors", choices=["threads", "processes"])
    p.add_argument("--server", choices=list(scenarios.SERVERS),
                   help="where each system's server runs: in this process (thread) or in "
                   "its ProcessInferenceServer (process; actors call through its "
                   "SharedMemoryTransport)")
    p.add_argument("--single-file", action="store_true", default=None,
                   help="batchserve's transport with single_file=True: actor threads "
                   "take turns between calls")
    p.add_argument("--num-actors", type=_int_list, metavar="N,N,...", help="actor-count sweep")
    p.add_argument("--obs", type=_observation, metavar="DTYPE:SHAPE",
                   help="observation, e.g. float32:64 or uint8:3x84x84")
    p.add_argument("--image", type=_observation, metavar="DTYPE:SHAPE",
                   help="requests also carry an image (\"pixels\"), e.g. uint8:3x84x84")
    p.add_argument("--model", help="mlp, conv, obs_conv (observation and image), policy "
                   "(a stochastic actor: MLP, "
                   "NormalParamExtractor, ProbabilisticTensorDictModule), or module:factory "
                   "(factory() returns the policy)")
    p.add_argument("--hidden", type=_int_list, metavar="W,W,...", help="MLP hidden widths")
    p.add_argument("--actions", type=int, help="output width of the built-in models")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--min-batch-size", type=int)
    p.add_argument("--timeout", type=float, help="server batching timeout, seconds")
    p.add_argument("--device", help="device the model runs on (cpu, cuda, ...)")
    p.add_argument("--static-batch-size", type=_int_list, metavar="N,N,...",
                   help="serve CUDA graphs of these batch sizes (torchrl: the largest)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, help="measured seconds per measurement")
    length.add_argument("--requests", type=int, help="measured requests per measurement")
    p.add_argument("--warmup", type=float, help="seconds before measuring, excluded")
    p.add_argument("--rounds", type=int, help="alternating rounds per system")
    p.add_argument("--client", choices=list(scenarios.CLIENTS),
                   help="how actors call: the transport's client (direct) or torchrl's "
                   "PolicyClientModule around it (policy_client)")
    p.add_argument("--interaction-type", choices=[*scenarios.INTERACTION_TYPES, "none"],
                   help="tensordict interaction type the run happens under (none: not set)")
    p.add_argument("--collate", choices=list(scenarios.COLLATES),
                   help="the servers' collate_fn: their default or tensordict's maybe_dense_stack")
    p.add_argument("--torch-threads", type=int, metavar="N",
                   help="torch.set_num_threads for the run (default: torch's own)")
    p.add_argument("--server-nice", type=int, metavar="N",
                   help="the nice value of every system's forward thread (process actors or "
                        "--server process; below 0 needs CAP_SYS_NICE): its precedence over "
                        "the actors")
    p.add_argument("--cpus", type=_cpu_list, metavar="LIST",
                   help="run on these CPUs only (as taskset --cpu-list: 0 or 0-3,6); "
                        "actor processes and servers inherit it")
    p.add_argument("--json", metavar="PATH",
                   help="write results (schema: batchserve/bench/schema.json)")
    p.add_argument("--plot", metavar="PATH.png", help="write throughput and latency-CDF plots")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    return p


def resolve_scenarios(parser: argparse.ArgumentParser, args) -> list[scenarios.Scenario]:
    if not args.scenarios:
        chosen = [dataclasses.replace(scenarios.HEADLINE)]
    else:
        chosen = []
        for name in args.scenarios:
            try:
                chosen.append(scenarios.load(name))
            except FileNotFoundError:
                parser.error(f"unknown scenario {name!r}: no file {name}[.toml], and no packaged "
                             f"scenario of that name ({', '.join(scenarios.packaged_names())})")
            except (ValueError, TypeError) as exc:
                parser.error(f"scenario {name}: {exc}")
    overrides = {}
    if args.quick:
        overrides.update(scenarios.QUICK)
    for flag, field in [
        ("actors", "actors"), ("server", "server"), ("single_file", "single_file"),
        ("num_actors", "actor_counts"), ("model", "model"),
        ("hidden", "hidden"), ("actions", "actions"), ("max_batch_size", "max_batch_size"),
        ("min_batch_size", "min_batch_size"), ("timeout", "timeout"), ("device", "device"),
        ("duration", "duration"), ("warmup", "warmup"), ("rounds", "rounds"),
        ("torch_threads", "torch_threads"), ("server_nice", "server_nice"),
        ("client", "client"), ("collate", "collate"),
        ("static_batch_size", "static_batch_size"),
    ]:
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    if args.requests is not None:
        overrides["requests"] = args.requests
    elif args.duration is not None:
        overrides["requests"] = None  # a duration replaces a scenario's request count
    if args.interaction_type is not None:
        overrides["interaction_type"] = (
            None if args.interaction_type == "none" else args.interaction_type)
    if args.obs is not None:
        overrides["observation_dtype"], overrides["observation_shape"] = args.obs
    if args.image is not None:
        overrides["image_dtype"], overrides["image_shape"] = args.image
    if "actors" in overrides:  # keep a family name like mlp_threads truthful
        for i, s in enumerate(chosen):
            for kind in ("threads", "processes"):
                if s.name.endswith("_" + kind):
                    chosen[i] = dataclasses.replace(
                        s, name=s.name[: -len(kind)] + overrides["actors"]
                    )
    try:
        return [dataclasses.replace(s, **overrides).validate() for s in chosen]
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


def check_systems(parser: argparse.ArgumentParser, args) -> bool:
    """Whether torchrl runs side by side (and is installed)."""
    if args.vs != "torchrl":
        return False
    if not torchrl_available():
        parser.exit(2, "batchserve-bench: --vs torchrl needs torchrl: "
                       f"pip install torchrl (or {INSTALL_HINT})\n")
    return True


def check_plot(parser: argparse.ArgumentParser, args) -> None:
    """--plot needs matplotlib (in the bench extra)."""
    if args.plot and missing_modules(("matplotlib",)):
        parser.exit(2, f"batchserve-bench: --plot needs matplotlib: {INSTALL_HINT}\n")


def run(args, parser) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:  # piped or redirected: do not squeeze the tables to 80 columns
        out = Console(width=200)
    chosen = resolve_scenarios(parser, args)
    vs_torchrl = check_systems(parser, args)
    results = []
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(), console=err, disable=args.no_progress, transient=True,
    )
    try:
        with progress:
            default_threads = torch.get_num_threads()
            for scen in chosen:
                if scen.device.startswith("cuda") and not torch.cuda.is_available():
                    raise BenchError(f"scenario {scen.name} runs on {scen.device}, and torch "
                                     "sees no CUDA device here")
                torch.set_num_threads(scen.torch_threads or default_threads)
                slots = interleave(list(scen.actor_counts),
                                   systems_for(scen, vs_torchrl, args.limit), scen.rounds)
                # The one-actor overhead, interleaved with the bare call (thread actors).
                paired = (systems_for(scen, vs_torchrl)
                          if scen.actors == "threads" and 1 in scen.actor_counts else [])
                overall = progress.add_task(f"{scen.name}", total=len(slots) + len(paired) + 1,
                                            note="")
                measurements = []
                current = progress.add_task("bare model(td)", total=1.0, note="")
                measurements.append(measure_bare(
                    scen, tick=lambda f, t=current: progress.update(t, completed=f)))
                progress.remove_task(current)
                progress.advance(overall)
                for slot in slots:
                    label = (f"{slot.system} · {slot.actors} {scen.actors} · "
                             f"round {slot.round + 1}/{scen.rounds}")
                    current = progress.add_task(label, total=1.0, note="")
                    m = measure(slot.system, scen, slot.actors, slot.round,
                                tick=lambda f, t=current: progress.update(t, completed=f))
                    progress.remove_task(current)
                    progress.update(overall, advance=1,
                                    note=f"last: {m.requests / max(m.seconds, 1e-9):,.0f} req/s")
                    measurements.append(m)
                interleaved = {}
                for system in paired:
                    current = progress.add_task(f"{system} · 1 {scen.actors} · overhead, "
                                                "interleaved with the bare call", total=1.0,
                                                note="")
                    interleaved[system] = measure_overhead(
                        system, scen, tick=lambda f, t=current: progress.update(t, completed=f))
                    progress.remove_task(current)
                    progress.advance(overall)
                results.append((scen, report.aggregate(measurements), interleaved))
    except BenchError as exc:
        err.print(f"batchserve-bench: error: {exc}")
        return 1
    except KeyboardInterrupt:
        err.print("batchserve-bench: interrupted")
        return 130
    for scen, rows, interleaved in results:
        out.print(report.table(scen, rows))
        for system, overhead in report.overhead_us(rows).items():
            out.print(f"overhead per call at 1 actor ({system} p50 − bare p50): {overhead:.1f} µs")
        for line in report.interleaved_lines(interleaved):
            out.print(line)
        notes = report.refusal_lines(rows) + report.inline_lines(rows) + report.limit_lines(rows)
        for line in notes:
            out.print(line)
    machine = report.machine()
    out.print(f"[dim]{report.machine_line(machine)}[/dim]")
    if args.json:
        report.write_json(args.json, report.to_json(results, ["batchserve-bench", *sys.argv[1:]]))
        out.print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, results)
        out.print(f"wrote {args.plot}")
    return 0


# Scenario files with a `kind` run on their own, through their own module.
_KINDS = ("soak", "weight_sync", "ray", "collector")


def kind_scenarios(parser: argparse.ArgumentParser, args) -> list[tuple[dict, str]]:
    """The scenario files named that have a ``kind`` (soak, weight_sync, ray, collector);
    such a scenario runs alone."""
    found = []
    for name in args.scenarios:
        try:
            data, default_name = scenarios.read(name)
        except FileNotFoundError:
            continue  # resolve_scenarios reports it
        if data.get("kind") in _KINDS:
            found.append((data, default_name))
    if found and (len(found) != len(args.scenarios)
                  or len({data["kind"] for data, _ in found}) != 1):
        parser.error(f"a {found[0][0]['kind']} scenario runs on its own, not with other scenarios")
    return found


def run_kind(args, parser, found: list[tuple[dict, str]]) -> int:
    """Runs soak, weight_sync, ray or collector scenarios; exit status 1 when a soak
    lost, duplicated or misrouted a request (or hung), or an actor of a
    weight_sync or ray run failed."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    kind = found[0][0]["kind"]
    # The flags each kind takes besides --json and --no-progress (and --vs,
    # but for a soak), as argparse names them.
    if kind == "soak":
        from batchserve.bench import soak as module

        flags = ["requests"]
    elif kind == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            parser.error('a ray scenario needs Ray: pip install "batchserve[ray]"')
        from batchserve.bench import ray_actors as module

        flags = ["duration", "warmup", "rounds", "num_actors", "max_batch_size", "timeout",
                 "torch_threads"]
    elif kind == "collector":
        import importlib.util

        if importlib.util.find_spec("torchrl") is None:
            parser.error("a collector scenario needs torchrl: pip install torchrl")
        from batchserve.bench import collector as module

        flags = ["duration", "rounds", "torch_threads"]
    else:
        from batchserve.bench import weight_sync as module

        flags = ["duration", "device"]
    fields = {"num_actors": "actor_counts"}  # flag -> field, where they differ
    usage = ", ".join(f"--{f.replace('_', '-')}"
                      for f in flags + ([] if kind == "soak" else ["vs"]))
    usage += ", --json and --no-progress"
    allowed = {*flags, "json", "no_progress", "scenarios", "vs"}
    used = [k for k, v in vars(args).items() if k not in allowed and v not in (None, False)]
    if used or (kind == "soak" and args.vs != "none"):
        parser.error(f"a {kind} scenario takes only {usage}")
    err = Console(stderr=True)
    outcomes, failed = [], False
    for data, default_name in found:
        overrides = {fields.get(k, k): getattr(args, k) for k in flags
                     if getattr(args, k) is not None}
        try:
            config = module.load_config({"name": default_name, **data}, **overrides)
        except (ValueError, TypeError) as exc:
            parser.error(f"{kind} scenario {default_name}: {exc}")
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                            console=err, disable=args.no_progress, transient=True)
        with progress:
            if kind == "soak":
                task = progress.add_task(f"{config.name}: {config.requests:,} requests", total=1.0)
                outcome = module.run_soak(
                    config, progress_cb=lambda f, p=progress, t=task: p.update(t, completed=f))
            else:
                systems = list(module.BATCHSERVE_SYSTEMS)
                if check_systems(parser, args):
                    systems += module.TORCHRL_SYSTEMS
                steps = getattr(module, "steps", lambda config, systems: len(systems))
                task = progress.add_task(config.name, total=steps(config, systems))
                outcome = module.run(
                    config, systems,
                    progress_cb=lambda name, i, p=progress, t=task, c=config: p.update(
                        t, completed=i, description=f"{c.name}: {name}"))
        print(module.format_report(outcome))
        failed = failed or bool(module.failures(outcome))
        outcomes.append(outcome)
    machine = report.machine()
    print(report.machine_line(machine))
    if args.json:
        report.write_json(args.json, {"command": ["batchserve-bench", *sys.argv[1:]],
                                      "machine": machine, kind + "s": outcomes})
        print(f"wrote {args.json}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_plot(parser, args)
    found = kind_scenarios(parser, args)
    with confined_to(parser, args.cpus):
        code = run_kind(args, parser, found) if found else run(args, parser)
    sys.exit(code)


@contextlib.contextmanager
def confined_to(parser: argparse.ArgumentParser, cpus: set[int] | None):
    """Runs the body with every thread of this process on ``cpus`` only
    (None: as it is), then puts each back. The threads started meanwhile
    (servers, actor threads) inherit it; the measured scenarios' actor
    processes take the run's CPUs themselves (``runner._process_actor``),
    the other kinds' inherit them from the forkserver the run starts."""
    if cpus is None:
        yield
        return
    if not hasattr(os, "sched_setaffinity"):
        parser.error("--cpus needs os.sched_setaffinity (Linux)")
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        parser.error(f"--cpus: this process may run on CPUs {report.cpu_list(allowed)} only")
    previous: dict[int, set[int]] = {}
    for tid in _threads():
        try:
            previous[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            previous.pop(tid, None)
    try:
        yield
    finally:
        for tid, mask in previous.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:  # the thread has ended
                pass


def _threads() -> list[int]:
    """This process's thread ids (Linux); the calling thread's elsewhere."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]

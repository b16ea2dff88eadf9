"""batchserve-bench: the latency/throughput harness (``python -m batchserve.bench``).

The harness needs more than batchserve itself (the ``bench`` extra:
``pip install "batchserve[bench]"``); :func:`main` checks for it first, so a
missing package is one line saying what to install, not a traceback.
"""

from __future__ import annotations

import importlib
import sys

# What every run imports beyond batchserve's own dependencies (numpy comes
# with tensordict). matplotlib only for --plot and torchrl only for --vs
# torchrl: checked when asked for.
RUN_MODULES = ("rich",) + (("tomli",) if sys.version_info < (3, 11) else ())
INSTALL_HINT = 'pip install "batchserve[bench]"'


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules among ``names`` that cannot be imported."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> None:
    """The ``batchserve-bench`` command."""
    missing = missing_modules(RUN_MODULES)
    if missing:
        sys.stderr.write(f"batchserve-bench: needs {', '.join(missing)}: {INSTALL_HINT}\n")
        raise SystemExit(2)
    from batchserve.bench.cli import main as run

    run(argv)


__all__ = ["main", "missing_modules"]

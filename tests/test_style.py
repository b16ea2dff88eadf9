"""The repository's rules that a tool can check (docs/architecture.md): ruff
(pyproject.toml) and clang-format (.clang-format) are clean, the type stub
python/batchserve/_core.pyi matches the extension, the pure core has no
Python in it, and C++ files stay small."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with the test extra "
                    '(pip install ".[test]")')
    return path


def _cpp_sources() -> list[str]:
    patterns = ("csrc/**/*.h", "csrc/**/*.cpp", "tests/cpp/*.h", "tests/cpp/*.cpp",
                "benchmarks/*.cpp")
    return sorted({f for p in patterns for f in glob.glob(os.path.join(ROOT, p), recursive=True)})


def test_ruff_is_clean():
    done = subprocess.run([_tool("ruff"), "check", "--no-cache", ROOT], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cpp_sources_are_clang_formatted():
    sources = _cpp_sources()
    assert sources
    done = subprocess.run([_tool("clang-format"), "--dry-run", "--Werror", *sources],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]


def test_the_type_stub_matches_the_extension():
    """mypy's stubtest: every name, signature and property of batchserve._core
    (as installed) is in _core.pyi, and nothing else (tests/stubtest_allowlist.txt
    lists what pybind11 does that a stub does not spell)."""
    _tool("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "batchserve._core", "--allowlist",
         os.path.join(ROOT, "tests", "stubtest_allowlist.txt")],
        capture_output=True, text=True, timeout=300, cwd=os.path.join(ROOT, "tests"),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_core_has_no_python_in_it():
    """csrc/core/ includes neither Python, pybind11 nor the marshalling layer."""
    forbidden = re.compile(r'#\s*include\s*[<"](Python\.h|pybind11/|python/)')
    offenders = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "core", "*.h"))):
        with open(path) as f:
            offenders += [f"{os.path.relpath(path, ROOT)}: {line.strip()}"
                          for line in f if forbidden.search(line)]
    assert not offenders, offenders


def test_cpp_files_stay_small():
    """No C++ file over 700 lines; the module file, glue only, at most 400."""
    long = []
    for path in _cpp_sources():
        with open(path) as f:
            n = sum(1 for _ in f)
        limit = 400 if path.endswith("bindings.cpp") else 700
        if n > limit:
            long.append(f"{os.path.relpath(path, ROOT)}: {n} lines (at most {limit})")
    assert not long, long

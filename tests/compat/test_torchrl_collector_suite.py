"""torchrl's own AsyncBatchedCollector tests, run on batchserve's collector.

The vendored suite (``test_torchrl_suite.py``, see its header for origin and
licence) tests torchrl's ``AsyncBatchedCollector``; here the same test class
runs with the module's ``AsyncBatchedCollector`` swapped for
:class:`batchserve.AsyncBatchedCollector`, which must pass as torchrl's does.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchrl")

import test_torchrl_suite as torchrl_suite  # noqa: E402  (the vendored file, beside this one)

import batchserve  # noqa: E402


class TestBatchserveAsyncBatchedCollector(torchrl_suite.TestAsyncBatchedCollector):
    @pytest.fixture(autouse=True)
    def _batchserve_collector(self, monkeypatch):
        monkeypatch.setattr(torchrl_suite, "AsyncBatchedCollector", batchserve.AsyncBatchedCollector)

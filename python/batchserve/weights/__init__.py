"""Weights: checking and copying in-process updates (``updates``),
publishing them from a trainer process through shared memory
(``shared_memory``), and binding a server's ``weight_sync`` (batchserve's
receiver or a torchrl scheme) to it (``schemes``)."""

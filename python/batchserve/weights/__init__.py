"""Weights: checking and copying in-process updates (``updates``) and
publishing them from a trainer process through shared memory
(``shared_memory``)."""

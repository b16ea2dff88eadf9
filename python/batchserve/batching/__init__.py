"""Batching: where the server's batches come from (``batch_source``), the
fixed-schema fast path over staging memory (``fast_path``) and the general
path's collation (``collate``)."""

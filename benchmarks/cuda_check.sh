#!/usr/bin/env bash
# Issue 20's device check, in one run on a GPU machine (about 8 minutes):
# the CUDA tests, then the CUDA workload against torchrl, eager and with
# CUDA graphs (batchserve: buckets 8/16/32/64; torchrl: one graph of 64).
# Results land in ${OUT:-.}/cuda_*.json; the tables go to stdout.
#   bash benchmarks/cuda_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -p no:cacheprovider -q -rs tests/test_static_batches.py tests/test_fast_path.py \
  tests/test_shared_memory.py tests/test_weight_banks.py -k "cuda or static"
common=(--vs torchrl --no-progress --duration 2 --rounds 1)
batchserve-bench benchmarks/cuda_threads "${common[@]}" --json "$out/cuda_threads.json"
batchserve-bench benchmarks/cuda_threads "${common[@]}" --num-actors 8,32,64 \
  --static-batch-size 8,16,32,64 --json "$out/cuda_threads_graphs.json"
batchserve-bench benchmarks/cuda_processes "${common[@]}" --num-actors 8,32 \
  --json "$out/cuda_processes.json"

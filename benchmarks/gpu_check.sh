#!/usr/bin/env bash
# The one command for a GPU machine. It runs, on GPU 0:
#   the GPU-marked tests; tokens/s, MFU and peak memory of llama_60m and llama_130m at the paper's micro-batches
#   (bf16; eager vs compiled; full vs chunked loss; 30 timed updates after warm-up) and of llama_1b at the largest
#   micro-batch that fits; one AlphaDecay spectral pass on llama_130m and llama_1b against the official computation,
#   and FARMS at their shapes (window counts and times, the authors' positions against the default);
#   a 200-update AlphaDecay run of llama_60m in bf16 on the shipped sample, whose loss must fall and whose logged MFU
#   must be within 5% of the synchronised measurement of the same model and micro-batch;
#   llama_1b's start-up memory (host peak of building it and of resuming it, before vs now; the GPU build must
#   equal the host build bit for bit) and DDP's gradient memory without and with gradient_as_bucket_view;
#   llama_1b under --parallelism fsdp vs ddp on every visible GPU (memory per rank, tokens/s, the sharded spectral
#   pass, a DCP checkpoint round trip);
# writes docs/perf/gpu-<device>.md and prints it (its first line: what ran, how long, whether every check passed).
#
#   benchmarks/gpu_check.sh                           # everything (meant for <= 8 min on one H100; untimed)
#   benchmarks/gpu_check.sh --parts throughput,run     # some parts: tests, throughput, largest, esd, run, memory, fsdp
#   benchmarks/gpu_check.sh --cpu-smoke               # every part reduced, on CPU (the test suite runs this)
#   benchmarks/gpu_check.sh --peak_tflops 756         # MFU on a GPU missing from alphadecay/mfu.py's table
#
# Exit code 1 if a check failed. The measurements are in benchmarks/gpu_bench.py (its docstring says what each
# part measures and how). PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_bench.py "$@"

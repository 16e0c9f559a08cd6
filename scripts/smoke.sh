#!/usr/bin/env bash
# CPU smoke test of the whole pipeline in about a minute: scripts/train.sh runs each of the four methods for
# 8 updates on the shipped C4 sample (a 1.1M-parameter LLaMA, two seeds each, the module-wise decay pass every
# 2 updates), then scripts/make_tables.py tabulates them. Nothing is downloaded.
#
# Usage: scripts/smoke.sh
# Environment (optional): SMOKE_DIR=runs/smoke (where the runs go; each smoke run directory is replaced),
#   DRY_RUN=1 (print the commands instead of running them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SMOKE_DIR=${SMOKE_DIR:-runs/smoke}
if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi

# One process on CPU, the shipped sample and tokenizer, runs under $SMOKE_DIR.
export NGPU=1 BATCH_SIZE=8 DATASET=data/c4_sample TOKENIZER=data/tokenizer RUNS_DIR=$SMOKE_DIR
# Shrink the 60M recipe to a CPU-sized one; these flags come last, so they override train.sh's defaults.
TINY=(--model_config configs/llama_1m.json --device cpu --dtype float32 --total_batch_size 8 --max_length 128
  --num_training_steps 8 --warmup_steps 2 --eval_every 4 --save_every 8 --target_eval_tokens 20000
  --shuffle_buffer 64 --unbalancedWD_every 2 --wandb_mode disabled)

for seed in 0 1; do
  for method in uniform awd adadecay alphadecay; do
    name=smoke-$method-seed$seed
    [[ ${DRY_RUN:-0} == 1 ]] || rm -rf "${SMOKE_DIR:?}/$name"
    SEED=$seed RUN_NAME=$name scripts/train.sh "$method" adamw 60m 0.1 "${TINY[@]}"
  done
done

if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "$PYTHON scripts/make_tables.py $SMOKE_DIR"
else
  "$PYTHON" scripts/make_tables.py "$SMOKE_DIR"
fi

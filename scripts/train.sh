#!/usr/bin/env bash
# One run of the AlphaDecay paper's tables: the paper's settings for SIZE plus METHOD's official flags.
#
# Usage: scripts/train.sh METHOD OPTIMIZER SIZE WD [extra torchrun_main.py flags...]
#   METHOD     uniform | awd | adadecay | alphadecay
#   OPTIMIZER  adam | adamw          (adam = coupled L2, the paper's main table; adamw = decoupled)
#   SIZE       60m | 130m | 350m | 1b
#   WD         base weight decay as a number: 1e-5, 5e-6, 1e-6 (Adam table); 0.1, 0.05, 0.01 (AdamW); 0 = none
#   Extra flags are appended last, so they override the defaults below (the last value of a flag wins).
#
# Environment (all optional):
#   NGPU=1            processes = GPUs on this machine (torchrun --standalone: no port or address to pick)
#   BATCH_SIZE        micro-batch per GPU in sequences; default 512/NGPU, capped per size to fit 80 GB;
#                     gradient accumulation = 512 / (BATCH_SIZE * NGPU), derived by the trainer
#   SEED=0            model-initialisation seed (the official Adam scripts ran seeds 5..10)
#   DATASET=allenai/c4  hub dataset, or a local directory in C4's layout (a C4 mirror, data/c4_sample)
#   TOKENIZER=t5-base   hub tokenizer, or a local directory (a saved t5-base, data/tokenizer)
#   RUNS_DIR=runs     the run directory is $RUNS_DIR/<name>
#   RUN_NAME          overrides the generated <name> (use it when extra flags change the run's settings)
#   TORCHRUN          the torchrun executable (default: torchrun on PATH, else .venv/bin/torchrun)
#   DRY_RUN=1         print the command instead of running it
# GPUs are whatever the environment exposes; to pick some, set CUDA_VISIBLE_DEVICES yourself.
# Relative paths (DATASET, TOKENIZER, RUNS_DIR, extra flags) are relative to the repository root.
#
# Example, the paper's 130M Adam AlphaDecay run on 2 GPUs:
#   NGPU=2 SEED=5 scripts/train.sh alphadecay adam 130m 1e-5
set -euo pipefail

usage() {
  sed -n '4,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() {
  echo "scripts/train.sh: $*" >&2
  exit 2
}

[[ $# -ge 4 ]] || usage
METHOD=$1 OPTIMIZER=$2 SIZE=$3 WD=$4
shift 4

# --- the paper's settings per size (official-code.md §6.2) -----------------------------------------------------
# 60M and 130M are the official scripts' values. The official code has no 350M or 1B scripts: those steps,
# warmups and micro-batches are GaLore's (scripts/benchmark_c4/llama_{350m,1b}.sh), which the AlphaDecay
# paper builds on -- UNVERIFIED against the paper's text, as is lr 1e-3 at those sizes (GaLore's own
# scripts use 1e-2 for GaLore, not for full-rank Adam).
case $SIZE in
  60m)  STEPS=10000;  WARMUP=1000;  MAX_MICRO=512; SIZE_LABEL=60M ;;   # official: 1 GPU x 512
  130m) STEPS=20000;  WARMUP=2000;  MAX_MICRO=256; SIZE_LABEL=130M ;;  # official: 2 GPUs x 256
  350m) STEPS=60000;  WARMUP=6000;  MAX_MICRO=128; SIZE_LABEL=350M ;;  # GaLore: 4 GPUs x 128 (unverified)
  1b)   STEPS=100000; WARMUP=10000; MAX_MICRO=32;  SIZE_LABEL=1B ;;    # GaLore: 8 GPUs x 16; 32 fits 80 GB by estimate
  *) die "SIZE must be 60m, 130m, 350m or 1b, got '$SIZE'" ;;
esac
case $OPTIMIZER in
  adam | adamw) ;;
  *) die "OPTIMIZER must be adam or adamw, got '$OPTIMIZER'" ;;
esac
[[ $WD =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || die "WD must be a non-negative number such as 1e-5, got '$WD'"

# --- the method's flags, exactly as the official scripts pass them (official-code.md §1.3) ---------------------
case $METHOD in
  uniform) METHOD_FLAGS=(); TAG=uniform ;;
  awd) METHOD_FLAGS=(--use_AWD_NeurIPS2023); TAG=awd ;;
  adadecay)
    METHOD_FLAGS=(--use_modulewise_wd --alpha_positively_with_WD --unbalancedWD_every 500
      --esd_metric_for_tb gradnorm --assign_func layerwise_sigmoid)
    TAG=adadecay ;;
  alphadecay)
    # Max ratio 3 for Adam at WD 1e-5 (scripts/Adam/ours/1e-5.sh and the official README), 5 everywhere else.
    # The official 1e-5 script exists for 130M only; the same choice is applied at every size.
    if [[ $OPTIMIZER == adam ]] && awk -v wd="$WD" 'BEGIN { exit !(wd + 0 == 0.00001) }'; then
      MAX_RATIO=3
    else
      MAX_RATIO=5
    fi
    METHOD_FLAGS=(--use_modulewise_wd --alpha_positively_with_WD --unbalancedWD_every 500
      --esd_metric_for_tb alpha --assign_func tb_linear_map --wd_min_ratio 0.6666 --wd_max_ratio "$MAX_RATIO")
    TAG="alphadecay-$OPTIMIZER-1.5-${MAX_RATIO}unb" ;;  # like the official "ours-adam-1.5-3unb"
  *) die "METHOD must be uniform, awd, adadecay or alphadecay, got '$METHOD'" ;;
esac

# --- processes and batch --------------------------------------------------------------------------------------
NGPU=${NGPU:-1}
[[ $NGPU =~ ^[1-9][0-9]*$ ]] || die "NGPU must be a positive integer, got '$NGPU'"
BATCH_SIZE=${BATCH_SIZE:-$(( 512 / NGPU < MAX_MICRO ? 512 / NGPU : MAX_MICRO ))}
[[ $BATCH_SIZE =~ ^[1-9][0-9]*$ ]] || die "BATCH_SIZE must be a positive integer, got '$BATCH_SIZE'"
(( 512 % (BATCH_SIZE * NGPU) == 0 )) ||
  die "the global batch of 512 sequences is not a multiple of BATCH_SIZE x NGPU = $BATCH_SIZE x $NGPU" \
    "(set BATCH_SIZE so that it is)"
SEED=${SEED:-0}
[[ $SEED =~ ^[0-9]+$ ]] || die "SEED must be a non-negative integer, got '$SEED'"

# --- run name (official style: <method>-<optimizer>-<size>-lr<lr>-WD<wd>-<steps>, plus the seed) -------------
if [[ $METHOD == alphadecay ]]; then
  NAME_DEFAULT="$TAG-$SIZE_LABEL-lr0.001-WD$WD-$STEPS-seed$SEED"
else
  NAME_DEFAULT="$TAG-$OPTIMIZER-$SIZE_LABEL-lr0.001-WD$WD-$STEPS-seed$SEED"
fi
NAME=${RUN_NAME:-$NAME_DEFAULT}
RUNS_DIR=${RUNS_DIR:-runs}

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z ${TORCHRUN:-} ]]; then
  if command -v torchrun >/dev/null; then TORCHRUN=torchrun; else TORCHRUN=.venv/bin/torchrun; fi
fi

cmd=("$TORCHRUN" --standalone --nproc_per_node="$NGPU" torchrun_main.py
  --model_config "configs/llama_$SIZE.json" --optimizer "$OPTIMIZER" --seed "$SEED"
  --lr 0.001 --scheduler cosine --min_lr_ratio 0.1 --max_length 256
  --batch_size "$BATCH_SIZE" --total_batch_size 512 --num_training_steps "$STEPS" --warmup_steps "$WARMUP"
  --weight_decay "$WD" ${METHOD_FLAGS[@]+"${METHOD_FLAGS[@]}"}
  --dtype bfloat16 --eval_every 1000 --target_eval_tokens 10_000_000 --save_every 10000
  --dataset "${DATASET:-allenai/c4}" --tokenizer "${TOKENIZER:-t5-base}"
  --wandb_name "$NAME" --save_dir "$RUNS_DIR/$NAME"
  "$@")

printf -v line '%q ' "${cmd[@]}"
if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "${line% }"
  exit 0
fi
echo "+ ${line% }" >&2
exec "${cmd[@]}"

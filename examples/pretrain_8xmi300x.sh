#!/usr/bin/env bash
# Instella-3B on one node of 8 MI300X (192 GB each) with torchrun.
#
#   LAYOUT=tp1|tp2|pp2   parallel layout (default tp1)      RECIPE   stage1 (default), stage2, sft, ...
#   DATA_ROOT, BLEND     data directory and blend name      SAVE_DIR checkpoints; also loaded (auto-resume)
#   MBS, GBS             micro / global batch override      SEED     (default: the recipe's)
#   DRY_RUN=1            print the command instead of running it;  NPROC (default 8), PLATFORM (rocm)
#   Extra arguments are passed to the trainer unchanged.
#
# Memory per GPU for 3.11e9 parameters (N), bf16 with fp32 main grads and Adam:
#   weights 2N + main grads 4N = 18.7 GB; fp32 master + Adam m, v = 12N = 37.4 GB, divided by DP with
#   the distributed optimizer. Activations without recomputation (flash attention): ~34*s*h bytes per
#   layer and sequence = 34*4096*2560 = 0.36 GB, x 36 layers = 12.8 GB per 4096-token sequence.
#   tp1 (default): TP=1 PP=1 DP=8. States 18.7 + 37.4/8 = 23.4 GB; micro 4 -> +51 GB = ~75 GB of 192.
#                  global batch 1024 = micro 4 x DP 8 x 32 accumulation steps.
#   tp2:           TP=2 PP=1 DP=4. States (18.7 + 37.4/4)/2 = 14 GB; activations halve with sequence
#                  parallelism, micro 8 -> +51 GB. 1024 = micro 8 x DP 4 x 32.
#   pp2:           TP=1 PP=2 DP=4, 18 layers a stage. States 18.7/2 + 37.4/8 = 14 GB; 1F1B keeps 2
#                  micro-batches in flight on stage 0: 2 x 4 x 18 x 0.36 = 26 GB. 1024 = micro 4 x DP 4
#                  x 64; pipeline bubble (PP-1)/accumulation = 1/64.
# For a 3B model TP=1 wins (no tensor-parallel all-reduce per layer); tp2/pp2 are there to compare.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=examples/lib.sh
source "$HERE/lib.sh"

LAYOUT=${LAYOUT:-tp1}
RECIPE=${RECIPE:-stage1}
BLEND=${BLEND:-$RECIPE}
DATA_ROOT=${DATA_ROOT:-/shared/instella/data}
SAVE_DIR=${SAVE_DIR:-/shared/instella/runs/$RECIPE-$LAYOUT/checkpoints}
NPROC=${NPROC:-8}
GBS=${GBS:-1024}
case $LAYOUT in
  tp1) TP=1 PP=1 MBS=${MBS:-4} ;;
  tp2) TP=2 PP=1 MBS=${MBS:-8} ;;
  pp2) TP=1 PP=2 MBS=${MBS:-4} ;;
  *) echo "error: LAYOUT=$LAYOUT; choose tp1, tp2 or pp2" >&2; exit 2 ;;
esac
CP=${CP:-1}
check_layout "$NPROC" "$TP" "$PP" "$CP" "$MBS" "$GBS"
load_env_preset

LAUNCH_ARGS=(--nproc-per-node "$NPROC" --nnodes 1 --rdzv-backend static
             --rdzv-endpoint "127.0.0.1:${MASTER_PORT:-29500}")
MODEL_ARGS=(--plugin instella --instella-recipe "$RECIPE")
DATA_ARGS=(--data-blend "$BLEND" --data-root "$DATA_ROOT")
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
               --context-parallel-size "$CP")
if ((TP > 1)); then
  PARALLEL_ARGS+=(--sequence-parallel)   # norms and dropout shard their activations over the TP group
fi
BATCH_ARGS=(--micro-batch-size "$MBS" --global-batch-size "$GBS")
CKPT_ARGS=(--save "$SAVE_DIR" --load "$SAVE_DIR" --exit-signal-handler)
if [[ -n ${SEED:-} ]]; then
  CKPT_ARGS+=(--seed "$SEED")
fi
if [[ -n ${INIT_FROM:-} ]]; then
  CKPT_ARGS+=(--pretrained-checkpoint "$INIT_FROM")   # used only while SAVE_DIR holds no checkpoint
fi

run "$PYTHON" -m torch.distributed.run "${LAUNCH_ARGS[@]}" "$ROOT/pretrain_gpt.py" \
  "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${BATCH_ARGS[@]}" "${CKPT_ARGS[@]}" "$@"

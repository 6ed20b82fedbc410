#!/usr/bin/env bash
# Instella-Math GRPO (recipes grpo-stage1|2|3) on one node of 8 MI300X with torchrun.
#
#   STAGE=1|2|3          the stage (default 1: Big-Math, 8 rollouts, 8K responses, 1200 steps)
#   PROMPTS              JSONL/Parquet rows with "prompt" and "answer" (`instella data convert big-math`,
#                        deepmath-103k or deepscaler writes them)
#   INIT_FROM            the starting model: math-sft2 for stage 1, the previous stage after; it is also
#                        the KL reference, so it is passed again on every resubmission
#   SAVE_DIR             checkpoints; also loaded (auto-resume at the last GRPO step)
#   TP (1), NPROC (8), ROLLOUT_BATCH (16), DRY_RUN=1 to print the command, PLATFORM (rocm)
#   Extra arguments are passed to the trainer unchanged.
#
# The official run used 4 nodes x 8 MI300X; one node runs the same recipe more slowly (DP=8 keeps whole
# groups: each rank holds 32 / 8 = 4 prompts of every mini-batch). Memory per GPU (N = 3.11e9): policy
# bf16 weights + fp32 main grads 18.7 GB, Adam states 37.4 GB / DP; the frozen reference 6.2 GB; the
# rollout KV cache 2 (K, V) x 36 layers x 2560 x 2 bytes = 369 KB a token, 6.1 GB for a 16.5K-token
# rollout, so ROLLOUT_BATCH=16 rollouts at once take ~97 GB of 192.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=examples/lib.sh
source "$HERE/lib.sh"

STAGE=${STAGE:-1}
case $STAGE in
  1) RECIPE=grpo-stage1 SOURCE=big-math ;;
  2) RECIPE=grpo-stage2 SOURCE=deepmath-103k ;;
  3) RECIPE=grpo-stage3 SOURCE=deepscaler ;;
  *) echo "error: STAGE=$STAGE; choose 1, 2 or 3" >&2; exit 2 ;;
esac
PROMPTS=${PROMPTS:-/shared/instella/data/grpo/$SOURCE.jsonl}   # instella data convert $SOURCE
INIT_FROM=${INIT_FROM:-/shared/instella/runs/math-sft2/checkpoints}
SAVE_DIR=${SAVE_DIR:-/shared/instella/runs/$RECIPE/checkpoints}
NPROC=${NPROC:-8}
TP=${TP:-1}
ROLLOUT_BATCH=${ROLLOUT_BATCH:-16}
DP=$((NPROC / TP))
if ((NPROC % TP)) || ((32 % DP)); then
  echo "error: NPROC=$NPROC / TP=$TP gives DP=$DP, which must divide the 32 prompts of a mini-batch" >&2
  exit 2
fi
echo "$RECIPE: TP=$TP DP=$DP; each rank: $((32 / DP)) prompts of each of the 4 mini-batches a step"
load_env_preset

LAUNCH_ARGS=(--nproc-per-node "$NPROC" --nnodes 1 --rdzv-backend static
             --rdzv-endpoint "127.0.0.1:${MASTER_PORT:-29500}")
GRPO_ARGS=(--plugin instella --instella-recipe "$RECIPE" --data-path "$PROMPTS"
           --grpo-rollout-batch "$ROLLOUT_BATCH" --tensor-model-parallel-size "$TP")
CKPT_ARGS=(--pretrained-checkpoint "$INIT_FROM" --save "$SAVE_DIR" --load "$SAVE_DIR" --exit-signal-handler)

run "$PYTHON" -m torch.distributed.run "${LAUNCH_ARGS[@]}" "$ROOT/pretrain_gpt.py" \
  "${GRPO_ARGS[@]}" "${CKPT_ARGS[@]}" "$@"

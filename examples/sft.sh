#!/usr/bin/env bash
# Supervised fine-tuning of the merged stage-2 model on one node of 8 MI300X (3 epochs, 4096 tokens,
# each chat padded, loss on assistant tokens only, LR 1e-5; the optimizer starts fresh).
#   TP=1 PP=1 -> DP=8; global batch 128 = micro 4 x DP 8 x 4 accumulation steps; ~75 GB per GPU as
#   for pre-training (see pretrain_8xmi300x.sh for the arithmetic).
#   INIT_FROM (merged stage 2), SAVE_DIR, DATA_ROOT, BLEND (sft), LAYOUT, DRY_RUN=1 to print only.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export RECIPE=sft BLEND=${BLEND:-sft} LAYOUT=${LAYOUT:-tp1}
export MBS=${MBS:-4} GBS=${GBS:-128}
export INIT_FROM=${INIT_FROM:-/shared/instella/runs/stage2/merged}
export SAVE_DIR=${SAVE_DIR:-/shared/instella/runs/sft/checkpoints}
exec bash "$HERE/pretrain_8xmi300x.sh" "$@"

#!/usr/bin/env bash
# Stage 1 pre-training on 16 nodes x 8 MI300X = 128 GPUs (the official Instella scale), via sbatch.
#   TP=1 PP=1 CP=1 -> DP=128. Global batch 1024 sequences x 4096 tokens = 4.19M tokens a step
#   = micro 4 x DP 128 x 2 accumulation steps. The distributed optimizer shards fp32 master weights
#   and Adam moments (12 B/param = 37.4 GB) over 128 ranks: 0.3 GB each, plus 18.7 GB of bf16 weights
#   and fp32 grads, plus ~51 GB of activations for micro 4: ~70 GB of the 192 GB per GPU.
#   PARTITION ACCOUNT NODES(16) TIME_LIMIT DATA_ROOT RUN_DIR MBS GBS, DRY_RUN=1 to print only.
#   Re-running the script resumes from the latest checkpoint in $RUN_DIR/checkpoints.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/lib.sh
source "$HERE/lib.sh"

export RECIPE=stage1 BLEND=${BLEND:-stage1}
export TP=${TP:-1} PP=${PP:-1} CP=${CP:-1} MBS=${MBS:-4} GBS=${GBS:-1024}
export DATA_ROOT=${DATA_ROOT:-/shared/instella/data}
export RUN_DIR=${RUN_DIR:-/shared/instella/runs/stage1}
export INSTELLA_EXAMPLES=$HERE
NODES=${NODES:-16}

SBATCH_ARGS=(--parsable --nodes "$NODES" --job-name instella-stage1 --time "${TIME_LIMIT:-2-00:00:00}"
             --output "$RUN_DIR/logs/%x-%j.out" --export ALL)
if [[ -n ${PARTITION:-} ]]; then SBATCH_ARGS+=(--partition "$PARTITION"); fi
if [[ -n ${ACCOUNT:-} ]]; then SBATCH_ARGS+=(--account "$ACCOUNT"); fi

if [[ $DRY_RUN == 1 ]]; then
  run sbatch "${SBATCH_ARGS[@]}" "$HERE/pretrain_multinode.sbatch" "$@"
  echo "# each of the $NODES nodes then runs:"
  NODES=$NODES bash "$HERE/pretrain_multinode.sbatch" "$@"
  exit 0
fi
mkdir -p "$RUN_DIR/logs"
JOB=$(run sbatch "${SBATCH_ARGS[@]}" "$HERE/pretrain_multinode.sbatch" "$@" | tail -n 1)
echo "submitted stage 1 as job $JOB; log: $RUN_DIR/logs/instella-stage1-$JOB.out"

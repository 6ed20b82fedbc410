#!/usr/bin/env bash
# Stage 2: three seeds (5796, 6198, 8915) as one Slurm job array, then a merge job that averages
# the three final checkpoints; it runs only if every seed succeeds (--dependency=afterok:<array>).
# Each seed starts from the stage-1 checkpoint (weights and optimizer state; the recipe resets the
# iteration and the schedule) and trains 13,727 steps of 1024 x 4096 tokens on 16 nodes:
#   TP=1 PP=1 CP=1 -> DP=128; global batch 1024 = micro 4 x DP 128 x 2 accumulation steps.
#   SEEDS NODES(16) PARTITION ACCOUNT TIME_LIMIT DATA_ROOT RUN_DIR INIT_FROM, DRY_RUN=1 to print only.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/lib.sh
source "$HERE/lib.sh"

export RECIPE=stage2 BLEND=${BLEND:-stage2}
export SEEDS=${SEEDS:-"5796 6198 8915"}
export TP=${TP:-1} PP=${PP:-1} CP=${CP:-1} MBS=${MBS:-4} GBS=${GBS:-1024}
export DATA_ROOT=${DATA_ROOT:-/shared/instella/data}
export RUN_DIR=${RUN_DIR:-/shared/instella/runs/stage2}
export INIT_FROM=${INIT_FROM:-/shared/instella/runs/stage1/checkpoints}
export INSTELLA_EXAMPLES=$HERE
NODES=${NODES:-16}
read -r -a SEED_LIST <<<"$SEEDS"
LAST=$((${#SEED_LIST[@]} - 1))

COMMON=(--parsable --export ALL)
if [[ -n ${PARTITION:-} ]]; then COMMON+=(--partition "$PARTITION"); fi
if [[ -n ${ACCOUNT:-} ]]; then COMMON+=(--account "$ACCOUNT"); fi
ARRAY_ARGS=("${COMMON[@]}" --array "0-$LAST" --nodes "$NODES" --job-name instella-stage2
            --time "${TIME_LIMIT:-2-00:00:00}" --output "$RUN_DIR/logs/%x-%A_%a.out")
MERGE_ARGS=("${COMMON[@]}" --job-name instella-stage2-merge --output "$RUN_DIR/logs/%x-%j.out")

if [[ $DRY_RUN == 1 ]]; then
  run sbatch "${ARRAY_ARGS[@]}" "$HERE/pretrain_multinode.sbatch" "$@"
  run sbatch "${MERGE_ARGS[@]}" --dependency "afterok:<array-job-id>" "$HERE/merge_seeds.sbatch"
  for ((i = 0; i <= LAST; i++)); do
    echo "# array task $i (seed ${SEED_LIST[$i]}) runs on each of its $NODES nodes:"
    SLURM_ARRAY_TASK_ID=$i NODES=$NODES bash "$HERE/pretrain_multinode.sbatch" "$@"
  done
  echo "# the merge job runs:"
  bash "$HERE/merge_seeds.sbatch"
  exit 0
fi
mkdir -p "$RUN_DIR/logs"
ARRAY_JOB=$(run sbatch "${ARRAY_ARGS[@]}" "$HERE/pretrain_multinode.sbatch" "$@" | tail -n 1)
MERGE_JOB=$(run sbatch "${MERGE_ARGS[@]}" --dependency "afterok:$ARRAY_JOB" "$HERE/merge_seeds.sbatch" | tail -n 1)
echo "submitted seeds ${SEEDS} as array job $ARRAY_JOB (logs $RUN_DIR/logs/instella-stage2-${ARRAY_JOB}_<task>.out)"
echo "submitted merge as job $MERGE_JOB after all seeds succeed; output $RUN_DIR/merged"

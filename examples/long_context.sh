#!/usr/bin/env bash
# Instella-Long continued pre-training, PHASE=1 (64K tokens, RoPE theta 514,640, 5,000 steps) or
# PHASE=2 (256K, theta 3,691,950, 2,500 steps) on 16 nodes x 8 MI300X, with context parallelism
# over 4 GPUs of a node (all-to-all over heads, as the official runs did) and full recomputation.
#   Phase 1: CP=4 -> DP=32; global batch 64 sequences = micro 1 x DP 32 x 2 accumulation steps.
#            Each GPU holds 65536/4 = 16K tokens of a sequence: layer inputs kept for recomputation
#            36 x 16384 x 2560 x 2 B = 3 GB, one layer's activations 34 x 16384 x 2560 = 1.4 GB.
#   Phase 2: CP=4 -> DP=32; global batch 32 = micro 1 x DP 32 x 1. 64K tokens per GPU: 12 GB of
#            layer inputs + 5.7 GB for the layer being recomputed, next to ~23 GB of model states.
#   Phase 1 starts from INIT_FROM (Instella-3B-Instruct); phase 2 from phase 1 (the recipes decide
#   what is kept: weights and optimizer in phase 2, a fresh schedule in both).
#   PHASE NODES(16) PARTITION ACCOUNT TIME_LIMIT DATA_ROOT RUN_ROOT INIT_FROM, DRY_RUN=1 to print only.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/lib.sh
source "$HERE/lib.sh"

PHASE=${PHASE:-1}
RUN_ROOT=${RUN_ROOT:-/shared/instella/runs}
case $PHASE in
  1) GBS=${GBS:-64} INIT_FROM=${INIT_FROM:-$RUN_ROOT/instruct/checkpoints} ;;
  2) GBS=${GBS:-32} INIT_FROM=${INIT_FROM:-$RUN_ROOT/long-phase1/checkpoints} ;;
  *) echo "error: PHASE=$PHASE; choose 1 or 2" >&2; exit 2 ;;
esac
export RECIPE=long-phase$PHASE BLEND=${BLEND:-long-phase$PHASE} GBS INIT_FROM
export TP=${TP:-1} PP=${PP:-1} CP=${CP:-4} MBS=${MBS:-1}
export DATA_ROOT=${DATA_ROOT:-/shared/instella/data}
export RUN_DIR=${RUN_DIR:-$RUN_ROOT/long-phase$PHASE}
export INSTELLA_EXAMPLES=$HERE
NODES=${NODES:-16}

SBATCH_ARGS=(--parsable --export ALL --nodes "$NODES" --job-name "instella-long$PHASE"
             --time "${TIME_LIMIT:-2-00:00:00}" --output "$RUN_DIR/logs/%x-%j.out")
if [[ -n ${PARTITION:-} ]]; then SBATCH_ARGS+=(--partition "$PARTITION"); fi
if [[ -n ${ACCOUNT:-} ]]; then SBATCH_ARGS+=(--account "$ACCOUNT"); fi
TRAIN_EXTRA=(--cp-comm-type a2a "$@")

if [[ $DRY_RUN == 1 ]]; then
  run sbatch "${SBATCH_ARGS[@]}" "$HERE/pretrain_multinode.sbatch" "${TRAIN_EXTRA[@]}"
  echo "# each of the $NODES nodes then runs:"
  NODES=$NODES bash "$HERE/pretrain_multinode.sbatch" "${TRAIN_EXTRA[@]}"
  exit 0
fi
mkdir -p "$RUN_DIR/logs"
JOB=$(run sbatch "${SBATCH_ARGS[@]}" "$HERE/pretrain_multinode.sbatch" "${TRAIN_EXTRA[@]}" | tail -n 1)
echo "submitted long-context phase $PHASE as job $JOB; log: $RUN_DIR/logs/instella-long$PHASE-$JOB.out"

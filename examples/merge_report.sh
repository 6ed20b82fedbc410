#!/usr/bin/env bash
# The seed-soup report for the stage-2 seeds: scores each seed, each merge method (uniform, greedy
# soup, SLERP, layer-wise, TIES, DARE; TIES and DARE take task vectors against the stage-1
# checkpoint) and POINTS checkpoints on the line between every pair of seeds (the interpolation
# barrier). Writes $OUTPUT/report.md, report.json, methods.png and barrier.png. Runs on one node
# (CPU is enough: merges stream tensor by tensor; scoring runs the model on the held-out windows).
#   RUN_DIR  SEEDS("5796 6198 8915")  SEED_SUBDIR(checkpoints; "" for the tiny workflow's layout)
#   BASE(stage-1 checkpoint)  OUTPUT  POINTS(5)  METHODS(all of merge_report.yaml)
#   scoring, one of: HELDOUT (Megatron .bin/.idx prefixes) | HELDOUT_BLEND + DATA_ROOT (its valid split)
#                    | SCORE_COMMAND (prints a score; {checkpoint} is replaced; HIGHER_IS_BETTER=1)
#   EVAL_SAMPLES(64) EVAL_SEQ_LENGTH(2048)  PYTHON  DRY_RUN=1 to print the command only
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/lib.sh
source "$HERE/lib.sh"

RUN_DIR=${RUN_DIR:-/shared/instella/runs/stage2}
read -r -a SEED_LIST <<<"${SEEDS:-5796 6198 8915}"
SEED_SUBDIR=${SEED_SUBDIR-checkpoints}
BASE=${BASE:-/shared/instella/runs/stage1/checkpoints}
OUTPUT=${OUTPUT:-$RUN_DIR/seed_soup_report}
POINTS=${POINTS:-5}

INPUTS=()
for seed in "${SEED_LIST[@]}"; do
  INPUTS+=("$RUN_DIR/seed_$seed${SEED_SUBDIR:+/$SEED_SUBDIR}")
done

SCORING=()
if [[ -n ${SCORE_COMMAND:-} ]]; then
  SCORING=(--score-command "$SCORE_COMMAND")
  if [[ ${HIGHER_IS_BETTER:-0} == 1 ]]; then SCORING+=(--higher-is-better); fi
elif [[ -n ${HELDOUT_BLEND:-} ]]; then
  SCORING=(--heldout-blend "$HELDOUT_BLEND" --data-root "${DATA_ROOT:?HELDOUT_BLEND needs DATA_ROOT}")
elif [[ -n ${HELDOUT:-} ]]; then
  read -r -a HELDOUT_LIST <<<"$HELDOUT"
  SCORING=(--heldout "${HELDOUT_LIST[@]}")
else
  echo "merge_report.sh: set HELDOUT (held-out .bin/.idx prefixes), HELDOUT_BLEND + DATA_ROOT, or SCORE_COMMAND" >&2
  exit 2
fi
SCORING+=(--eval-samples "${EVAL_SAMPLES:-64}" --eval-seq-length "${EVAL_SEQ_LENGTH:-2048}")

REPORT=(--inputs "${INPUTS[@]}" --base "$BASE" --output "$OUTPUT" --points "$POINTS" --overwrite)
if [[ -n ${METHODS:-} ]]; then
  read -r -a METHOD_LIST <<<"$METHODS"
  REPORT+=(--methods "${METHOD_LIST[@]}")
fi

run "$PYTHON" -m instella_plugin.cli merge report "${REPORT[@]}" "${SCORING[@]}"
if [[ $DRY_RUN != 1 ]]; then
  cat "$OUTPUT/report.md"
fi

#!/usr/bin/env bash
# The RoPE-method ablation: extend the same short-context checkpoint to TARGET tokens with each method
# (base-law: Instella-Long's scaling-law theta; linear: position interpolation; ntk: NTK-aware base;
# yarn), then measure retrieval at the target length (needle in a haystack over lengths x depths) and
# retention at the original context (validation loss there, and the short benchmark suite when
# EVAL_DATA is given). Prints one table, writes $WORK/rope_ablation.{json,png}.
#   Full size (one node): SHORT_CKPT (the 4K model) DATA_ROOT BLEND(long-phase1) TARGET(65536)
#     ITERS(200) NPROC(8) CP(4) NIAH_LENGTHS(8K,16K,32K,64K) EVAL_DATA (optional, instella-base data)
#   TINY=1: everything on CPU at tiny size (a 64-token model from the demo corpus, extended to 256):
#     the slow test tier runs this.   METHODS("base-law linear ntk yarn")  WORK  PYTHON  DRY_RUN=1
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=examples/lib.sh
source "$HERE/lib.sh"

TINY=${TINY:-0}
WORK=${WORK:-$(mktemp -d -t instella-rope-ablation-XXXXXX)}
read -r -a METHOD_LIST <<<"${METHODS:-base-law linear ntk yarn}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [[ $TINY == 1 ]]; then
  NPROC=${NPROC:-2} SHORT_LEN=64 TARGET=${TARGET:-256} ITERS=${ITERS:-6} EVAL_ITERS=${EVAL_ITERS:-2}
  NIAH_LENGTHS=${NIAH_LENGTHS:-128,240} NIAH_SAMPLES=${NIAH_SAMPLES:-2} DATA_ROOT=$WORK/data BLEND=tiny
  COMMON=(--plugin instella --instella-recipe tiny-cpu --data-blend tiny --data-root "$DATA_ROOT" --device cpu
          --no-plot --log-interval 1)
  EXTEND=(--lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 1 --lr-warmup-init 1e-4)
  DEVICE=(--device cpu)
else
  : "${SHORT_CKPT:?set SHORT_CKPT to the short-context checkpoint to extend}"
  : "${DATA_ROOT:?set DATA_ROOT}"
  NPROC=${NPROC:-8} SHORT_LEN=${SHORT_LEN:-4096} TARGET=${TARGET:-65536} ITERS=${ITERS:-200} EVAL_ITERS=${EVAL_ITERS:-10}
  NIAH_LENGTHS=${NIAH_LENGTHS:-8K,16K,32K,64K} NIAH_SAMPLES=${NIAH_SAMPLES:-4} BLEND=${BLEND:-long-phase1}
  COMMON=(--plugin instella --instella-recipe long-phase1 --data-blend "$BLEND" --data-root "$DATA_ROOT"
          --context-parallel-size "${CP:-4}" --log-interval 10)
  EXTEND=(--lr-warmup-iters $((ITERS / 10)))
  DEVICE=()
fi
TRAIN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$ROOT/pretrain_gpt.py" "${COMMON[@]}")
INSTELLA=("$PYTHON" -m instella_plugin.cli)
FACTOR=$((TARGET / SHORT_LEN))

run mkdir -p "$WORK"
if [[ $TINY == 1 ]]; then
  run "$PYTHON" -c "from instella_plugin.data.demo_corpus import build_demo_corpus
build_demo_corpus('$DATA_ROOT', num_docs=300, num_chats=16)"
  echo "# the short-context model: $SHORT_LEN tokens, from scratch"
  run "${TRAIN[@]}" --seq-length "$SHORT_LEN" --train-iters 30 --lr-warmup-iters 3 --save "$WORK/short"
  SHORT_CKPT=$WORK/short
fi

for METHOD in "${METHOD_LIST[@]}"; do
  if [[ $METHOD == base-law ]]; then  # the scaling-law base for TARGET (Instella-Long's method)
    THETA=$(run "${INSTELLA[@]}" rope --train-context "$SHORT_LEN" --base 10000 --target "$TARGET" | tail -n 1)
    [[ $DRY_RUN == 1 ]] && THETA=THETA
  else
    THETA=10000
  fi
  ROPE=(--rope-scaling "$METHOD" --rope-original-context "$SHORT_LEN" --rope-scaling-factor "$FACTOR"
        --rotary-base "$THETA")
  echo "# $METHOD: extend to $TARGET tokens (theta $THETA, factor $FACTOR), $ITERS iterations"
  run "${TRAIN[@]}" "${ROPE[@]}" "${EXTEND[@]}" --load "$SHORT_CKPT" --finetune --override-rope-theta \
      --seq-length "$TARGET" --max-position-embeddings "$TARGET" --train-iters "$ITERS" \
      --lr-decay-iters "$ITERS" --save "$WORK/$METHOD"
  echo "# $METHOD: retrieval at $NIAH_LENGTHS"
  run "${INSTELLA[@]}" eval niah --load "$WORK/$METHOD" --lengths "$NIAH_LENGTHS" --depths 0,0.25,0.5,0.75,1 \
      --samples "$NIAH_SAMPLES" "${DEVICE[@]}" --output-dir "$WORK/$METHOD/niah"
  echo "# $METHOD: retention, validation loss at $SHORT_LEN tokens"
  run "${TRAIN[@]}" "${ROPE[@]}" --load "$WORK/$METHOD" --skip-train --no-load-optim --no-load-rng \
      --seq-length "$SHORT_LEN" --eval-iters "$EVAL_ITERS" --seed 6198 --save "$WORK/$METHOD/short"
  if [[ -n ${EVAL_DATA:-} ]]; then
    run "${INSTELLA[@]}" eval --load "$WORK/$METHOD" --suite instella-base --data-dir "$EVAL_DATA" \
        --output "$WORK/$METHOD/short_suite.json"
  fi
done

run "$PYTHON" -m instella_plugin.evaluation.rope_ablation "$WORK" --methods "$(IFS=,; echo "${METHOD_LIST[*]}")"

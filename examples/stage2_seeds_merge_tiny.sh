#!/usr/bin/env bash
# The stage-2 seed workflow at tiny scale, on CPU: a tiny stage 1, stage 2 from it with the three
# Instella seeds (each loads the stage-1 weights AND optimizer state; iteration and LR schedule
# restart), the uniform merge of the three, then the eval loss of each seed and of the merge on the
# same validation samples. Prints a table and writes $WORK/eval_losses.json.
#   WORK (scratch dir)  NPROC(2, TP=2 as in tiny-cpu)  S1_ITERS(40)  S2_ITERS(20)  EVAL_ITERS(4)
#   SEEDS("5796 6198 8915")  PYTHON  DRY_RUN=1 to print the commands only
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=examples/lib.sh
source "$HERE/lib.sh"

WORK=${WORK:-$(mktemp -d -t instella-seeds-XXXXXX)}
NPROC=${NPROC:-2}
S1_ITERS=${S1_ITERS:-40}
S2_ITERS=${S2_ITERS:-20}
EVAL_ITERS=${EVAL_ITERS:-4}
read -r -a SEED_LIST <<<"${SEEDS:-5796 6198 8915}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

TRAIN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$ROOT/pretrain_gpt.py"
       --plugin instella --instella-recipe tiny-cpu --data-blend tiny --data-root "$WORK/data"
       --device cpu --log-interval 5 --no-plot)
# stage 2 at tiny scale: linear decay from the stage-1 floor to 0, no warmup (the stage2 recipe's shape)
STAGE2=(--load "$WORK/stage1" --reset-iteration --lr 3.0e-4 --min-lr 0 --lr-warmup-iters 0
        --lr-decay-style linear --train-iters "$S2_ITERS" --lr-decay-iters "$S2_ITERS")
# evaluation: weights only, the same validation samples (same --seed) for every checkpoint
EVAL=(--skip-train --no-load-optim --no-load-rng --eval-iters "$EVAL_ITERS" --seed 6198)

run mkdir -p "$WORK"
run "$PYTHON" -c "import sys; sys.path.insert(0, '$ROOT')
from instella_plugin.data.demo_corpus import build_demo_corpus
build_demo_corpus('$WORK/data', num_docs=400, num_chats=16)"

echo "# stage 1: $S1_ITERS iterations from scratch"
run "${TRAIN[@]}" --train-iters "$S1_ITERS" --lr-warmup-iters 4 --save "$WORK/stage1" --save-interval "$S1_ITERS"

INPUTS=()
for seed in "${SEED_LIST[@]}"; do
  echo "# stage 2, seed $seed: $S2_ITERS iterations from stage 1 (weights + optimizer state)"
  run "${TRAIN[@]}" "${STAGE2[@]}" --seed "$seed" --save "$WORK/seed_$seed" --save-interval "$S2_ITERS"
  INPUTS+=("$WORK/seed_$seed")
done

echo "# merge: uniform mean of the ${#INPUTS[@]} seeds"
run "$PYTHON" -m instella_plugin.cli merge --inputs "${INPUTS[@]}" --output "$WORK/merged" --overwrite

for name in stage1 "${SEED_LIST[@]/#/seed_}" merged; do
  echo "# eval: $name"
  run "${TRAIN[@]}" "${EVAL[@]}" --load "$WORK/$name" --save "$WORK/eval_$name"
done

if [[ $DRY_RUN != 1 ]]; then
  "$PYTHON" - "$WORK" stage1 "${SEED_LIST[@]/#/seed_}" merged <<'EOF'
import json, os, sys
sys.path.insert(0, os.environ["PYTHONPATH"].split(":")[0])
from instella_plugin.testing.trainer import read_log
work, names = sys.argv[1], sys.argv[2:]
losses = {}
for name in names:
    _, evals = read_log(os.path.join(work, f"eval_{name}"))
    losses[name] = evals[max(evals)]
seeds = [losses[n] for n in names if n.startswith("seed_")]
losses["mean_of_seeds"] = sum(seeds) / len(seeds)
print(f"{'checkpoint':16s} eval loss")
for name, value in losses.items():
    print(f"{name:16s} {value:.4f}")
with open(os.path.join(work, "eval_losses.json"), "w") as f:
    json.dump(losses, f, indent=1)
EOF
fi

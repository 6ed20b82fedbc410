#!/usr/bin/env bash
# One short run of every GPU check, for a GPU machine with its own Python and CUDA (or ROCm) torch and
# no network. Each check prints PASS, FAIL or SKIP with a reason; a failure does not stop the others;
# the summary gives the total time. Exit status: 1 if any check failed, else 0.
#
#   bash tests/gpu/run_gpu_checks.sh                 # everything (about 5-8 minutes on one H100/H200)
#   bash tests/gpu/run_gpu_checks.sh --no-kernels    # without tests/gpu/check_kernels.py
#   bash tests/gpu/run_gpu_checks.sh --dry-run       # the same Python code on the CPU (no GPU needed)
#
# Options: --budget SECONDS (default 480: checks that would start past it are skipped and each one's
# time limit is cut to what is left), --steps N (training steps, default 20). PYTHON=... picks the
# interpreter (default python3). When $OUT is set, the full log and the summary are copied there.
#
# Checks, in order:
#   env         torch, CUDA, GPUs, megatron-core and Transformer Engine versions
#   wheels      pip install --no-deps --no-index of every carried wheel (shared/wheels/*.whl, then
#               wheels/*.whl) whose package does not import yet
#   install     pip install --no-deps --no-build-isolation --no-index -e . (INSTELLA_KERNELS=none: the
#               kernels check builds its own); on failure the checks still run from the checkout
#   cpu-mode    cpu_mode.enable_if_no_gpu() is False, enable() refuses, torch.cuda/megatron untouched
#   spec-parity bf16 logits of instella-te, instella-fused (our GPU kernels), instella-fused-te and
#               instella-fused-apex vs fp32 `instella` on instella-test (a spec whose library does
#               not import is listed as skipped)
#   train       20 steps of pretrain_gpt.py --plugin instella --bf16 --mock-data with NCCL:
#               instella-tiny and instella-1b at TP=1, and at TP=2 where 2 GPUs exist; prints
#               tokens/s, TFLOP/s per device and MFU (parsed from the trainer's log)
#   output-loss bench/bench_output_loss.py --part op: output layer + loss at vocab 50304, 4 x 4096
#               tokens, hidden 2560, bf16: megatron's path vs the fused one, time and peak memory
#   generate    bench/bench_generate.py: megatron-core generation vs transformers' generate, instella-1b
#               bf16, batch 1 and 16, tokens/s and ratio
#   eval-throughput bench/bench_eval.py: multiple-choice scoring examples/s, our evaluator (HF and
#               Megatron backends) vs lm-eval's HF backend on the same examples, instella-1b bf16
#   grpo        bench/bench_grpo.py: a GRPO smoke run (two steps of the outer loop on instella-1b, rollouts
#               from megatron-core's engine on the live policy) and its rollout tokens/s vs transformers'
#               generate on the same weights, with the step's rollout/scoring/update split
#   kernels     tests/gpu/check_kernels.py (builds and checks the fused kernels), if present
#   train fused the tiny preset at TP=1 again with --spec instella-fused (fails unless the kernels
#               run natively)
#
# What the GPU machine needs beside its Python and torch (it has no network): megatron-core, PyYAML
# and numpy (and packaging, setuptools for the editable install) as wheels for its Python, in
# shared/wheels/ of this checkout. Fetch them here with:
#   python -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform any -c constraints.txt -d shared/wheels megatron-core pyyaml numpy packaging setuptools
# (about 21 MB; numpy and pyyaml are skipped there when they already import).
set -u
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
BUDGET=480
STEPS=20
DRY=0
KERNELS=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-kernels) KERNELS=0 ;;
    --budget) BUDGET="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
WORK="$(mktemp -d -t gpu_checks.XXXXXX)"
LOG="$WORK/gpu_checks.log"
SUMMARY="$WORK/gpu_checks_summary.txt"
: >"$LOG"
: >"$SUMMARY"
FAILED=0
DRYFLAG=()
[[ $DRY -eq 1 ]] && DRYFLAG=(--dry-run)

elapsed() { echo $(( $(date +%s) - START )); }

record() {  # record STATUS NAME DETAIL
  printf '%-4s  %-22s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"
  [[ "$1" == FAIL ]] && FAILED=$((FAILED + 1))
  return 0
}

check() {  # check NAME LIMIT_S MIN_S CMD...  (skipped when less than MIN_S of the budget is left)
  local name="$1" limit="$2" need="$3"
  shift 3
  local left=$(( BUDGET - $(elapsed) ))
  if (( left < need )); then
    record SKIP "$name" "only ${left}s of the ${BUDGET}s budget left (needs ${need}s); run it alone"
    return 0
  fi
  (( limit > left )) && limit=$left
  local out="$WORK/$name.log" t0 rc line status detail
  t0=$(date +%s)
  echo "----- $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=15 "$limit" "$@" >"$out" 2>&1
  rc=$?
  grep -v -e 'UserWarning' -e 'warnings.warn' "$out" >>"$LOG"
  line="$(grep '^RESULT ' "$out" | tail -n 1)"
  if [[ -n "$line" ]]; then
    status="$(awk '{print $2}' <<<"$line")"
    detail="$(cut -d' ' -f3- <<<"$line")"
  elif (( rc == 124 || rc == 137 )); then
    status=FAIL; detail="timed out after ${limit}s"
  elif (( rc == 0 )); then
    status=PASS; detail="$(grep -E 'failed checks|PASS|ok' "$out" | tail -n 1)"
  else
    status=FAIL; detail="exit status $rc"
  fi
  if [[ "$status" == FAIL ]]; then
    echo "  last lines of $name:"; grep -v -e 'UserWarning' -e 'warnings.warn' "$out" | tail -n 25 | sed 's/^/  | /'
  fi
  record "$status" "$name" "$detail ($(( $(date +%s) - t0 ))s)"
}

echo "GPU checks in $ROOT with $PY; budget ${BUDGET}s$([[ $DRY -eq 1 ]] && echo ', DRY RUN on the CPU')"
check env 60 10 "$PY" tests/gpu/gpu_checks.py env "${DRYFLAG[@]}"

if [[ $DRY -eq 1 ]]; then
  record SKIP wheels "dry run: nothing is installed"
  record SKIP install "dry run: nothing is installed"
else
  WHEEL_DIR=""
  for d in shared/wheels wheels; do
    if compgen -G "$d/*.whl" >/dev/null; then WHEEL_DIR="$d"; break; fi
  done
  if [[ -n "$WHEEL_DIR" ]]; then
    check wheels 240 30 "$PY" tests/gpu/gpu_checks.py wheels "$WHEEL_DIR"
  else
    record SKIP wheels "no shared/wheels/*.whl carried (megatron-core must then already import)"
  fi
  check install 240 30 env INSTELLA_KERNELS=none "$PY" -m pip install -q --no-deps --no-build-isolation \
    --no-index -e "$ROOT"
fi

check cpu-mode 120 20 "$PY" tests/gpu/gpu_checks.py cpu-mode "${DRYFLAG[@]}"
check spec-parity 240 40 "$PY" tests/gpu/gpu_checks.py spec-parity "${DRYFLAG[@]}"

if [[ $DRY -eq 1 ]]; then
  NGPU=2; PRESETS=(instella-test); STEPS=4
  record SKIP "train instella-1b" "dry run: too big for the CPU (instella-test stands in)"
else
  NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)"
  NGPU="${NGPU:-0}"
  PRESETS=(instella-tiny instella-1b)
fi
for tp in 1 2; do
  for preset in "${PRESETS[@]}"; do
    name="train ${preset#instella-} tp$tp"
    if (( NGPU < tp )); then
      record SKIP "$name" "needs $tp GPUs, this machine has $NGPU$( (( NGPU == 1 )) && echo ': single GPU, TP=1 only')"
      continue
    fi
    limit=180; [[ "$preset" == instella-1b ]] && limit=300
    check "$name" "$limit" 60 "$PY" tests/gpu/gpu_checks.py train --preset "$preset" --tp "$tp" \
      --steps "$STEPS" --timeout "$limit" "${DRYFLAG[@]}"
  done
done

# The output layer + loss at Instella's vocabulary and the 3B recipe's micro-batch (4 x 4096 tokens),
# bf16: megatron's linear + vocab-parallel cross-entropy vs the fused path (--fused-output-loss),
# time and peak memory; PASS when the fused peak is lower by at least the logits.
if [[ $DRY -eq 1 ]]; then
  check output-loss 240 30 "$PY" bench/bench_output_loss.py --part op --device cpu --reps 1 \
    --chunks 256 --out "$WORK/output_loss.json"
elif (( NGPU >= 1 )); then
  check output-loss 180 40 "$PY" bench/bench_output_loss.py --part op --device cuda --dtype bf16 --mbs 4 \
    --seq 4096 --hidden 2560 --reps 3 --out "$WORK/output_loss.json"
fi

# Generation throughput: megatron-core's engine (MegatronGenerator) vs transformers' generate on the
# same weights, greedy, KV cache on, batch 1 and 16 (the ratio is printed, not asserted).
if [[ $DRY -eq 1 ]]; then
  check generate 240 30 "$PY" bench/bench_generate.py --device cpu --batches 1,4 --new 8 --prompt 16 \
    --repeats 1 --out "$WORK/generate.json"
elif (( NGPU >= 1 )); then
  check generate 300 60 "$PY" bench/bench_generate.py --device cuda --preset instella-1b --dtype bfloat16 \
    --batches 1,16 --new 128 --prompt 256 --out "$WORK/generate.json"
fi

# Multiple-choice scoring throughput: our evaluator (HF and Megatron backends) vs lm-eval's HFLM on the
# same 1,000 ARC-style examples (the ratio is printed, not asserted; per-example acc/acc_norm compared).
if ! "$PY" -c "import lm_eval" 2>/dev/null; then
  record SKIP eval-throughput "lm-eval is not installed for $PY (the lm-eval baseline needs it)"
elif [[ $DRY -eq 1 ]]; then
  check eval-throughput 300 40 "$PY" bench/bench_eval.py --examples 16 --megatron --out "$WORK/eval.json"
elif (( NGPU >= 1 )); then
  check eval-throughput 300 60 "$PY" bench/bench_eval.py --preset instella-1b --dtype bfloat16 --examples 1000 \
    --batch-size 32 --megatron --out "$WORK/eval.json"
fi

# GRPO smoke: two steps of the outer loop (rollouts, reward, advantages, policy and reference log-probs,
# update) on one GPU, and the rollout tokens/s against transformers' generate (printed, not asserted).
if [[ $DRY -eq 1 ]]; then
  check grpo 240 30 "$PY" bench/bench_grpo.py --device cpu --prompts 2 --n 2 --new 8 --no-save
elif (( NGPU >= 1 )); then
  check grpo 300 60 "$PY" bench/bench_grpo.py --device cuda --preset instella-1b --prompts 16 --n 8 --new 256 \
    --no-save
fi

if [[ ! -f tests/gpu/check_kernels.py ]]; then
  record SKIP kernels "tests/gpu/check_kernels.py is not in this checkout"
elif [[ $KERNELS -eq 0 ]]; then
  record SKIP kernels "--no-kernels"
elif [[ $DRY -eq 1 ]]; then
  record SKIP kernels "dry run (its CPU path: python tests/gpu/check_kernels.py --no-install --device cpu)"
else
  check kernels 300 120 "$PY" tests/gpu/check_kernels.py
fi

# The tiny preset again with the fused kernels that the kernels check has just built (the install
# step skips them): tokens/s side by side with the run above.
if [[ $KERNELS -eq 0 && $DRY -eq 0 ]]; then
  record SKIP "train ${PRESETS[0]#instella-} fused tp1" "--no-kernels: the fused GPU kernels were not built"
elif [[ $DRY -eq 1 ]] || (( NGPU >= 1 )); then
  check "train ${PRESETS[0]#instella-} fused tp1" 180 60 "$PY" tests/gpu/gpu_checks.py train --preset "${PRESETS[0]}" \
    --tp 1 --steps "$STEPS" --spec instella-fused --timeout 180 "${DRYFLAG[@]}"
fi

total=$(elapsed)
{
  echo
  echo "===== summary: $(grep -c '^PASS' "$SUMMARY") passed, $FAILED failed, $(grep -c '^SKIP' "$SUMMARY") skipped; total ${total}s ====="
} | tee -a "$SUMMARY"
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp "$LOG" "$SUMMARY" "$OUT"/ 2>/dev/null || true
fi
echo "full log: $LOG"
(( FAILED == 0 ))

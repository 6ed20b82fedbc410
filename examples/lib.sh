# shellcheck shell=bash
# Helpers shared by the example launchers (sourced, not run): dry-run printing, the launch
# environment presets, and the parallel-layout arithmetic. Nothing here starts a job.
#
#   DRY_RUN=1   print every command (fully quoted) instead of running it
#   PYTHON      interpreter with instella_plugin importable (default: python3)
#   PLATFORM    rocm | nvidia | cpu | auto (default rocm: these examples target MI300X nodes)

PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
PLATFORM=${PLATFORM:-rocm}

# Print a command with shell quoting, then run it unless DRY_RUN=1.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
  fi
}

# Export the platform's launch variables (values already set win) and print them with reasons.
load_env_preset() {
  local exports
  exports=$("$PYTHON" -m instella_plugin.launch.env --platform "$PLATFORM" --format export)
  eval "$exports"
  "$PYTHON" -m instella_plugin.launch.env --platform "$PLATFORM" --format table
}

# check_layout WORLD TP PP CP MBS GBS: sets DP and ACC (gradient-accumulation steps) or fails.
#   DP = WORLD / (TP x PP x CP);  global batch = micro x DP x accumulation
check_layout() {
  local world=$1 tp=$2 pp=$3 cp=$4 mbs=$5 gbs=$6 model
  model=$((tp * pp * cp))
  if ((world % model)); then
    echo "error: $world ranks are not divisible by TP x PP x CP = $tp x $pp x $cp = $model" >&2
    return 1
  fi
  DP=$((world / model))
  if ((gbs % (mbs * DP))); then
    echo "error: global batch $gbs is not divisible by micro-batch $mbs x DP $DP = $((mbs * DP))" >&2
    return 1
  fi
  ACC=$((gbs / (mbs * DP)))
  echo "layout: $world ranks = TP $tp x PP $pp x CP $cp x DP $DP; global batch $gbs = micro $mbs x DP $DP x $ACC accumulation"
}

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
#   The arithmetic is the trainer's own (instella_plugin/training/layout.py): DP = WORLD / (TP x PP x CP),
#   global batch = micro x DP x accumulation.
check_layout() {
  local out
  out=$("$PYTHON" -m instella_plugin.training.layout check "$@") || return 1
  # shellcheck disable=SC2034  # DP and ACC are read by the launchers that source this file
  read -r DP ACC <<<"${out%%$'\n'*}"
  echo "${out#*$'\n'}"
}

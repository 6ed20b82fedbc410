"""Render the bash batch scripts ``instella submit`` writes into a run directory.

A training script runs unchanged under ``sbatch`` (one ``srun`` task per node, each running torchrun
with the rendezvous address taken from the Slurm node list) and under plain ``bash`` (``--local``:
one node, 127.0.0.1). Save and load point at the same checkpoint directory, so running the script
again resumes from ``latest_checkpointed_iteration.txt`` there. A seed list makes it an array job:
task i trains seed i into ``seed_<seed>/checkpoints``; the merge script averages those directories.

Signals: the job asks for ``--signal=USR1@<signal_seconds>``, which Slurm sends to every process of
the job steps (not to the batch shell). torchrun would die on USR1, so it is started with USR1
ignored; the training ranks install their own handler (``--exit-signal-handler``), save a checkpoint
and exit, and the step then ends cleanly.
"""
import shlex
from dataclasses import dataclass, field

from instella_plugin.checkpoint_layout import TRACKER


@dataclass
class JobSpec:
    run_name: str
    run_dir: str
    recipe: str
    blend: str                 # a named blend (with the profile's data_root), or None with data_path
    profile: object            # launch.profile.Profile
    layout: object             # launch.profile.Layout
    platform: str
    seeds: list = field(default_factory=list)   # >1: array job; one: fixed seed; empty: recipe's seed
    train_iters: int = None
    extra_args: list = field(default_factory=list)
    instella_home: str = None  # prepended to PYTHONPATH when the package is not installed
    entry: list = field(default_factory=lambda: ["-m", "instella_plugin.training.entry"])
    data_path: str = None      # instead of a blend: the trainer's --data-path (a GRPO prompt file, a prefix)

    def data_lines(self):
        """The trainer's data flags: ``--data-path`` alone, or the blend and the root its prefixes are under."""
        if self.data_path:
            return [f"  --instella-recipe {q(self.recipe)} --data-path {q(self.data_path)}"]
        return [f"  --instella-recipe {q(self.recipe)} --data-blend {q(self.blend)}",
                f"  --data-root {q(self.profile.data_root)}"]

    @property
    def is_array(self):
        return len(self.seeds) > 1

    def checkpoint_dir(self, seed=None):
        if self.is_array:
            return f"{self.run_dir}/seed_{seed}/checkpoints"
        return f"{self.run_dir}/checkpoints"


def q(s):
    return shlex.quote(str(s))


def _header(spec, job_name, *, nodes, gpus, time_limit, array=None, signal=True):
    p = spec.profile
    log = f"{spec.run_dir}/logs/%x-%A_%a.out" if array else f"{spec.run_dir}/logs/%x-%j.out"
    lines = [f"#SBATCH --job-name={job_name}", f"#SBATCH --partition={p.partition}"]
    if p.account:
        lines.append(f"#SBATCH --account={p.account}")
    lines += [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    if gpus and spec.platform != "cpu":
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if p.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={p.cpus_per_task}")
    lines += [f"#SBATCH --time={time_limit}", f"#SBATCH --output={log}", "#SBATCH --open-mode=append"]
    if signal:
        lines.append(f"#SBATCH --signal=USR1@{p.signal_seconds}")
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines += [f"#SBATCH {x}" for x in p.sbatch_extra]
    return lines


def _software(spec):
    p = spec.profile
    lines = ["# --- software environment (cluster profile: activate, python)"]
    if p.activate:  # files it sources exist on the cluster only: shellcheck is told not to follow them
        # (the lines go in unchanged, not indented: a here-document's terminator must stay at column 0)
        lines += ["# shellcheck disable=SC1090,SC1091", "{", *str(p.activate).strip().splitlines(), "}"]
    lines.append(f"PYTHON=${{INSTELLA_PYTHON:-{q(p.python)}}}")
    if spec.instella_home:
        lines.append(f'export PYTHONPATH={q(spec.instella_home)}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    lines.append("")
    lines.append("# --- launch environment: profile env, then the platform presets (values already set win)")
    lines += [f"export {k}={q(v)}" for k, v in p.env.items()]
    lines.append(f'PRESET=$("$PYTHON" -m instella_plugin.launch.env --platform {spec.platform} --format export)')
    lines.append('eval "$PRESET"')
    lines.append(f'"$PYTHON" -m instella_plugin.launch.env --platform {spec.platform} --format table')
    return lines


def render_train_script(spec):
    """The training job: array job over ``spec.seeds`` when there are several."""
    p, lay = spec.profile, spec.layout
    array = f"0-{len(spec.seeds) - 1}" if spec.is_array else None
    out = ["#!/bin/bash",
           f"# instella training job for run {spec.run_name}: recipe {spec.recipe}, "
           + (f"data {spec.data_path}" if spec.data_path else f"blend {spec.blend}")
           + f", cluster profile {p.name or p.path}.",
           f"# Layout: {lay.describe()}.",
           "# Written by `instella submit`; submitting the same run again resumes from its latest checkpoint.",
           "# Runs under sbatch, or with plain bash on one machine (instella submit --local)."]
    out += _header(spec, f"instella-{spec.run_name}", nodes=p.nodes, gpus=p.gpus_per_node,
                   time_limit=p.time_limit, array=array)
    out += ["set -euo pipefail", "", f"RUN_DIR={q(spec.run_dir)}"]
    if spec.is_array:
        out += [f"SEEDS=({' '.join(str(s) for s in spec.seeds)})",
                "TASK=${SLURM_ARRAY_TASK_ID:-${INSTELLA_ARRAY_TASK:-0}}",
                'SEED=${SEEDS[$TASK]}',
                'CKPT_DIR="$RUN_DIR/seed_$SEED/checkpoints"']
    else:
        out.append('CKPT_DIR="$RUN_DIR/checkpoints"')
    out += ["", *_software(spec), ""]
    out += ["# --- rendezvous: rank 0 runs on the first host of the Slurm node list",
            "if [[ -n ${SLURM_JOB_ID:-} ]]; then",
            "  NNODES=$SLURM_JOB_NUM_NODES",
            '  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            "  JOB_KEY=$SLURM_JOB_ID",
            "else",
            "  NNODES=1",
            "  MASTER_ADDR=127.0.0.1",
            "  JOB_KEY=$$",
            "fi",
            f"MASTER_PORT=${{MASTER_PORT:-$(({p.master_port} + JOB_KEY % 1000))}}",
            "",
            "TORCHRUN=(",
            f'  "$PYTHON" -m torch.distributed.run --nproc-per-node {p.gpus_per_node} --nnodes "$NNODES"',
            '  --rdzv-backend static --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --max-restarts 0',
            ")",
            f"TRAIN=({' '.join(q(x) for x in spec.entry)})",
            "TRAIN_ARGS=(",
            *spec.data_lines(),
            '  --save "$CKPT_DIR" --load "$CKPT_DIR"',
            f"  --tensor-model-parallel-size {lay.tp} --pipeline-model-parallel-size {lay.pp}"
            f" --context-parallel-size {lay.cp}"]
    if lay.micro_batch_size:
        out.append(f"  --micro-batch-size {lay.micro_batch_size}")
    if lay.global_batch_size:
        out.append(f"  --global-batch-size {lay.global_batch_size}")
    if spec.is_array:
        out.append('  --seed "$SEED"')
    elif spec.seeds:
        out.append(f"  --seed {spec.seeds[0]}")
    if spec.train_iters:
        out.append(f"  --train-iters {spec.train_iters}")
    out.append("  --exit-signal-handler")
    if spec.extra_args:
        out.append("  " + " ".join(q(a) for a in spec.extra_args))
    out += [")", "",
            'mkdir -p "$CKPT_DIR"',
            f'if [[ -f "$CKPT_DIR/{TRACKER}" ]]; then',
            f'  echo "[instella] resuming from iteration $(cat "$CKPT_DIR/{TRACKER}") in $CKPT_DIR"',
            "else",
            '  echo "[instella] starting from scratch; checkpoints go to $CKPT_DIR"',
            "fi",
            'CMD=("${TORCHRUN[@]}" "${TRAIN[@]}" "${TRAIN_ARGS[@]}")',
            'echo "[instella] command: ${CMD[*]}"',
            "# torchrun ignores USR1 (its default action would kill it mid-save); the ranks catch it.",
            "# shellcheck disable=SC2016",
            "NODE_LAUNCH='export PET_NODE_RANK=${SLURM_NODEID:-0}; trap \"\" USR1; exec \"$@\"'",
            "if [[ -n ${SLURM_JOB_ID:-} ]]; then",
            "  # One task per node; each runs torchrun, which starts the node's ranks.",
            "  srun " + " ".join(_srun_flags(spec)) + ' bash -c "$NODE_LAUNCH" node-launch "${CMD[@]}"',
            "else",
            '  bash -c "$NODE_LAUNCH" node-launch "${CMD[@]}"',
            "fi",
            f'echo "[instella] finished: latest checkpoint iteration $(cat "$CKPT_DIR/{TRACKER}" 2>/dev/null || echo none)"',
            ""]
    return "\n".join(out)


def _srun_flags(spec):
    p = spec.profile
    flags = ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if p.cpus_per_task:
        flags.append(f"--cpus-per-task={p.cpus_per_task}")
    if p.container:
        flags.append(f"--container-image={q(p.container['image'])}")
        mounts = p.container.get("mounts") or []
        if mounts:
            flags.append(f"--container-mounts={q(','.join(mounts))}")
    return flags


def render_merge_script(spec, merge_dir):
    """Weight-average the seeds' checkpoints (submitted with --dependency=afterok on the array)."""
    p = spec.profile
    inputs = " ".join(q(spec.checkpoint_dir(s)) for s in spec.seeds)
    out = ["#!/bin/bash",
           f"# instella seed merge for run {spec.run_name}: uniform mean of seeds "
           f"{', '.join(str(s) for s in spec.seeds)}.",
           "# Submitted with --dependency=afterok:<array job>, so it runs only when every seed succeeded."]
    out += _header(spec, f"instella-{spec.run_name}-merge", nodes=1, gpus=0, time_limit=p.merge_time_limit,
                   signal=False)
    out += ["set -euo pipefail", "", *_software(spec), "",
            f"INPUTS=({inputs})",
            f"OUTPUT={q(merge_dir)}",
            'echo "[instella] merging ${INPUTS[*]} -> $OUTPUT"',
            'MERGE_ARGS=(--inputs "${INPUTS[@]}" --output "$OUTPUT")',
            "# A resubmitted run merges its seeds' latest checkpoints again, replacing the earlier merge.",
            'if [[ -e $OUTPUT ]]; then MERGE_ARGS+=(--overwrite); fi',
            '"$PYTHON" -m instella_plugin.cli merge "${MERGE_ARGS[@]}"',
            'echo "[instella] merged checkpoint written to $OUTPUT"', ""]
    return "\n".join(out)

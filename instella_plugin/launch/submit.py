"""``instella submit``: Slurm batch submission from a recipe and a cluster profile.

Checks the profile and the parallel/batch arithmetic first (nothing is written or submitted when
they are wrong), writes the batch script(s) to ``<output_root>/<run-name>/submit/``, then submits
them with ``sbatch`` (or only prints what it would do with ``--dry-run``, or runs them here with
bash with ``--local``). Several seeds make a job array plus a merge job that depends on the whole
array succeeding (``--dependency=afterok``). Submitting the same run name again reuses its
checkpoint directories, so the trainer resumes from the latest checkpoint.

Data: a named blend (``--blend`` or the recipe's ``data_blend``; its prefixes are relative to the
profile's ``data_root``), or one ``--data-path`` for a recipe that names no blend: a GRPO recipe's
prompt file (JSONL/Parquet), otherwise a Megatron-LM data prefix. A relative data path is taken
relative to the profile's ``data_root``, as blend prefixes are; it must exist on the submitting host
(login and compute nodes share the file system), except with ``--dry-run``, which only warns.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from instella_plugin.flag_types import non_negative_int, positive_int
from instella_plugin.launch import jobscript
from instella_plugin.launch.profile import Layout, ProfileError, check_layout, expand, load_profile
from instella_plugin.launch.recipe_defaults import available_recipes, recipe_defaults

PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def add_arguments(p):
    p.add_argument("--recipe", required=True, help=f"training recipe: {', '.join(available_recipes())}")
    p.add_argument("--profile", required=True, help="cluster profile: bundled name or YAML path")
    p.add_argument("--run-name", help="run directory under the profile's output_root (default: recipe name)")
    p.add_argument("--blend", help="data blend (default: the recipe's)")
    p.add_argument("--data-path", metavar="PATH",
                   help="instead of a blend, for a recipe that names none: a GRPO recipe's prompt file "
                        "(JSONL/Parquet), else a Megatron-LM data prefix; relative paths are under the "
                        "profile's data_root")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", help="one seed, or several for a job array + merge")
    p.add_argument("--no-merge", action="store_true", help="with several seeds: submit no merge job")
    p.add_argument("--nodes", type=positive_int, help="override the profile's node count")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=positive_int)
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=positive_int)
    p.add_argument("--cp", "--context-parallel-size", dest="cp", type=positive_int)
    p.add_argument("--micro-batch-size", type=positive_int)
    p.add_argument("--global-batch-size", type=positive_int)
    p.add_argument("--train-iters", type=positive_int)
    p.add_argument("--init-from", metavar="DIR",
                   help="checkpoint to start from while the run has none of its own (Megatron-LM's "
                        "--pretrained-checkpoint), e.g. stage 1 for stage 2")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile key, e.g. --set output_root=/scratch/runs (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="write the scripts and print what would be submitted")
    p.add_argument("--local", action="store_true", help="run the same scripts here with bash, without Slurm")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run's scripts and run.json when an earlier submission wrote them with other "
                        "settings (identical ones are reused without it)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER,
                   help="after --: further trainer flags, passed unchanged")


def plan(args):
    """Validate everything and return (spec, merge_dir); raises ProfileError/ValueError."""
    overrides = list(args.overrides) + ([f"nodes={args.nodes}"] if args.nodes is not None else [])
    profile = load_profile(args.profile, overrides)
    defaults = recipe_defaults(args.recipe)

    def pick(name, fallback=None):
        v = getattr(args, name, None)
        return v if v is not None else defaults.get(name, fallback)

    layout = check_layout(Layout(profile.nodes, profile.gpus_per_node, pick("tp", 1), pick("pp", 1),
                                 pick("cp", 1), pick("micro_batch_size"), pick("global_batch_size")))
    blend, data_path = _data_source(args, defaults, profile)
    if defaults.get("dataset_type") == "grpo":
        _check_grpo_split(layout, defaults, args.trainer_args or [])
    seeds = args.seeds or defaults.get("seeds") or ([defaults["seed"]] if "seed" in defaults else [])
    if len(set(seeds)) != len(seeds):
        raise ProfileError(f"--seeds {seeds} repeats a seed; each seed trains its own copy")
    platform = profile.platform  # "auto": detected inside the job
    run_name = args.run_name or args.recipe
    if "/" in run_name or run_name.startswith("."):
        raise ProfileError(f"--run-name {run_name!r} must be a plain directory name")
    extra = list(args.trainer_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.init_from:
        extra = ["--pretrained-checkpoint", os.path.abspath(args.init_from)] + extra
    home = None if "site-packages" in str(PACKAGE_PARENT) else str(PACKAGE_PARENT)
    entry = ["-m", "instella_plugin.training.entry"]
    if home and (PACKAGE_PARENT / "pretrain_gpt.py").exists():
        entry = [str(PACKAGE_PARENT / "pretrain_gpt.py"), "--plugin", "instella"]
    spec = jobscript.JobSpec(run_name=run_name, run_dir=os.path.join(profile.output_root, run_name),
                             recipe=args.recipe, blend=blend, data_path=data_path, profile=profile, layout=layout,
                             platform=platform, seeds=list(seeds), train_iters=args.train_iters,
                             extra_args=extra, instella_home=home, entry=entry)
    merge_dir = os.path.join(spec.run_dir, "merged") if spec.is_array and not args.no_merge else None
    return spec, merge_dir


def _data_source(args, defaults, profile):
    """(blend, None) or (None, absolute data path); ProfileError when neither or both are given, when the
    recipe's own blend would override the path inside the trainer, or when the path does not exist."""
    if args.blend and args.data_path:
        raise ProfileError("--blend and --data-path are alternatives: pass a blend (named sources under the "
                           "profile's data_root) or one data path (e.g. a GRPO prompt file), not both")
    if not args.data_path:
        blend = args.blend or defaults.get("data_blend")
        if not blend:
            raise ProfileError(f"recipe {args.recipe!r} names no data blend; pass --blend NAME, or --data-path PATH "
                               "(for a GRPO recipe: the JSONL/Parquet prompt file)")
        return blend, None
    if defaults.get("data_blend"):
        raise ProfileError(f"recipe {args.recipe!r} trains on the blend {defaults['data_blend']!r}, which the trainer "
                           "uses before any --data-path; drop --data-path, or pass --blend NAME for another blend")
    path = os.path.join(profile.data_root, expand(args.data_path))  # an absolute path stays as it is
    grpo = defaults.get("dataset_type") == "grpo"
    found = os.path.isfile(path) if grpo else (os.path.exists(path) or _prefix_files(path))
    if not found:
        what = "prompt file" if grpo else "data prefix (no PREFIX*.bin files)"
        msg = f"--data-path {args.data_path!r}: {what} {path} not found on this host"
        if not args.dry_run:
            raise ProfileError(msg + "; relative paths are under the profile's data_root (--set data_root=DIR), "
                               "or give an absolute path")
        print(f"[instella] warning: {msg}; the job will fail unless it exists where the job runs", file=sys.stderr)
    return None, path


def _check_grpo_split(layout, defaults, trainer_args):
    """The trainer's rule (rl/settings.py), checked before a job waits in the queue: a GRPO optimizer update
    takes global-batch / group-size prompts, and every data-parallel rank keeps whole groups."""
    group = defaults.get("grpo_group_size")
    if "--grpo-group-size" in trainer_args[:-1]:
        value = trainer_args[trainer_args.index("--grpo-group-size") + 1]
        group = int(value) if value.isdigit() else group  # anything else: the trainer's parser says what is wrong
    if not group or not layout.global_batch_size:
        return
    prompts = layout.global_batch_size // group
    if prompts % layout.dp:
        per_node = layout.dp // layout.nodes
        fits = [n for n in range(layout.nodes, 0, -1) if prompts % (n * per_node) == 0]
        hint = f"--nodes {fits[0]}" if fits else "a larger --tp"
        raise ProfileError(f"GRPO: a mini-batch of {prompts} prompts (global batch {layout.global_batch_size} / "
                           f"group size {group}) does not split over {layout.dp} data-parallel ranks (each rank keeps "
                           f"whole groups); use {hint}")


def _prefix_files(prefix):
    """A Megatron-LM prefix exists when files PREFIX.bin or PREFIX_<part>.bin (SFT/DPO stores) do."""
    folder, name = os.path.split(prefix)
    return os.path.isdir(folder) and any(f == f"{name}.bin" or (f.startswith(f"{name}_") and f.endswith(".bin"))
                                         for f in os.listdir(folder))


def _write(path, text, mode=0o755):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _check_same_run(spec, record_path):
    """A run directory keeps its recipe and seeds; anything else belongs in a new --run-name."""
    if not record_path.exists():
        return
    old = json.loads(record_path.read_text())
    for key, new in (("recipe", spec.recipe), ("seeds", spec.seeds)):
        if old.get(key) != new:
            raise ProfileError(f"run {spec.run_name!r} in {spec.run_dir} was submitted with {key}={old.get(key)!r}, "
                               f"not {new!r}; resubmitting resumes that run, so pick another --run-name")


def resume_state(spec):
    """{checkpoint dir: latest iteration or None} for every checkpoint directory of the run."""
    dirs = [spec.checkpoint_dir(s) for s in spec.seeds] if spec.is_array else [spec.checkpoint_dir()]
    out = {}
    for d in dirs:
        f = Path(d) / jobscript.TRACKER
        out[d] = f.read_text().strip() if f.exists() else None
    return out


def _sbatch(argv):
    res = subprocess.run(["sbatch", "--parsable", *argv], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"sbatch {' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def _queued_jobs(job_name):
    if not shutil.which("squeue"):
        return []
    res = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%i"], capture_output=True, text=True)
    return res.stdout.split() if res.returncode == 0 else []


def _run_local(script, log, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            f.write(line)
            f.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
    return proc.wait()


def run(args):
    try:
        spec, merge_dir = plan(args)
        run_dir = Path(spec.run_dir)
        _check_same_run(spec, run_dir / "run.json")
        if not (args.dry_run or args.local) and not shutil.which("sbatch"):
            raise ProfileError("sbatch not found on PATH: run on a Slurm login node, or use --local / --dry-run")
    except (ProfileError, ValueError) as e:
        print(f"instella submit: error: {e}", file=sys.stderr)
        return 2
    train = run_dir / "submit" / ("train_seeds.sbatch" if spec.is_array else "train.sbatch")
    merge = run_dir / "submit" / "merge.sbatch" if merge_dir else None
    data = {"data_path": spec.data_path} if spec.data_path else {"blend": spec.blend}
    record = {"run_name": spec.run_name, "recipe": spec.recipe, **data, "seeds": spec.seeds,
              "profile": spec.profile.path, "layout": spec.layout.describe()}
    outputs = {train: (jobscript.render_train_script(spec), 0o755),
               run_dir / "run.json": (json.dumps(record, indent=1) + "\n", 0o644)}
    if merge:
        outputs[merge] = (jobscript.render_merge_script(spec, merge_dir), 0o755)
    changed = [str(path) for path, (text, _) in outputs.items() if path.exists() and path.read_text() != text]
    if changed and not args.overwrite:
        print(f"instella submit: error: this submission would replace {', '.join(changed)}, written by an earlier "
              "submission with other settings; pass --overwrite to replace them (the run's checkpoints are kept "
              "and resumed), or choose another --run-name", file=sys.stderr)
        return 2
    for path, (text, mode) in outputs.items():
        _write(path, text, mode)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    print(f"[instella] run {spec.run_name}: {spec.layout.describe()}")
    for d, it in resume_state(spec).items():
        fresh = f"starts from {os.path.abspath(args.init_from)}" if args.init_from else "starts from scratch"
        print(f"[instella] {d}: " + (f"resumes from iteration {it}" if it else fresh))
    print(f"[instella] scripts: {train}" + (f", {merge}" if merge else ""))
    logs = run_dir / "logs"
    submitted = {}
    if args.dry_run:
        print(f"[instella] dry run; would submit: sbatch --parsable {train}")
        if merge:
            print(f"[instella] then: sbatch --parsable --dependency=afterok:<array job id> {merge}")
        return 0
    if args.local:
        rcs = []
        for i in range(len(spec.seeds) if spec.is_array else 1):
            log = logs / (f"local-train-{spec.seeds[i]}.out" if spec.is_array else "local-train.out")
            print(f"[instella] running {train} locally (task {i}), log {log}")
            rcs.append(_run_local(train, log, {"INSTELLA_ARRAY_TASK": str(i)}))
        if merge and all(rc == 0 for rc in rcs):
            rcs.append(_run_local(merge, logs / "local-merge.out"))
        print(f"[instella] local run finished with exit codes {rcs}")
        return 0 if all(rc == 0 for rc in rcs) else 1
    busy = _queued_jobs(f"instella-{spec.run_name}")
    if busy:
        print(f"instella submit: error: run {spec.run_name} still has jobs queued or running ({', '.join(busy)}); "
              "wait for them or scancel them before resubmitting", file=sys.stderr)
        return 2
    try:
        submitted["train"] = _sbatch([str(train)])
        if merge:
            submitted["merge"] = _sbatch([f"--dependency=afterok:{submitted['train']}", "--kill-on-invalid-dep=yes",
                                          str(merge)])
    except RuntimeError as e:
        print(f"instella submit: error: {e}", file=sys.stderr)
        return 1
    pattern = "%x-%A_%a.out" if spec.is_array else "%x-%j.out"
    print(f"[instella] submitted training job {submitted['train']}"
          + (f" (array of {len(spec.seeds)}: seeds {spec.seeds})" if spec.is_array else "")
          + f"; logs: {logs}/{pattern.replace('%x', f'instella-{spec.run_name}')}")
    if merge:
        print(f"[instella] submitted merge job {submitted['merge']} (after all seeds succeed); "
              f"logs: {logs}/instella-{spec.run_name}-merge-{submitted['merge']}.out; output: {merge_dir}")
    entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "jobs": submitted,
             "resume": resume_state(spec)}
    with open(run_dir / "submit" / "submissions.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="instella submit",
                                description="Slurm batch submission from a recipe and a cluster profile.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

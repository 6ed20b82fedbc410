"""``instella submit``: the scripts it writes, what it hands to sbatch, resubmission and --local.

sbatch/squeue are replaced by stubs that record their arguments; the real Slurm run is in
test_slurm_e2e.py (slow tier). ``--local`` runs the written script with bash and real torchrun, with a
stand-in trainer that writes a checkpoint tracker, so resuming is observable.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from instella_plugin.launch import submit
from instella_plugin.training.arguments import parse_args

ROOT = Path(__file__).resolve().parents[1]
STUB_SBATCH = """#!/bin/sh
n=$(($(cat "{d}/count" 2>/dev/null || echo 100) + 1)); echo $n > "{d}/count"
echo "$@" >> "{d}/sbatch_calls"
echo "$n"
"""


@pytest.fixture
def slurm_stub(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(STUB_SBATCH.format(d=tmp_path))
    (bin_dir / "squeue").write_text("#!/bin/sh\ncat \"%s/queued\" 2>/dev/null\n" % tmp_path)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def cli(tmp_path, *extra, recipe="tiny-cpu"):
    return submit.main(["--recipe", recipe, "--profile", "local-cpu", "--blend", "tiny",
                        "--set", f"output_root={tmp_path}/runs", "--set", f"data_root={tmp_path}/data", *extra])


def calls(tmp_path):
    f = tmp_path / "sbatch_calls"
    return f.read_text().splitlines() if f.exists() else []


def test_dry_run_writes_a_clean_script(tmp_path, slurm_stub, capsys):
    rc = cli(tmp_path, "--run-name", "r1", "--tp", "1", "--pp", "1", "--micro-batch-size", "2", "--global-batch-size", "8",
             "--train-iters", "20", "--seeds", "77", "--init-from", str(tmp_path / "init"), "--dry-run",
             "--", "--log-interval", "1")
    out = capsys.readouterr().out
    assert rc == 0 and calls(tmp_path) == []
    script = tmp_path / "runs/r1/submit/train.sbatch"
    text = script.read_text()
    assert "global batch 8 = micro 2 x DP 2 x 2 accumulation" in out
    for line in ["#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --time=00:30:00", "#SBATCH --signal=USR1@60",
                 f"#SBATCH --output={tmp_path}/runs/r1/logs/%x-%j.out",
                 "--nproc-per-node 2", "--instella-recipe tiny-cpu --data-blend tiny",
                 f"--data-root {tmp_path}/data", '--save "$CKPT_DIR" --load "$CKPT_DIR"',
                 "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --context-parallel-size 1",
                 "--micro-batch-size 2", "--global-batch-size 8", "--seed 77", "--train-iters 20",
                 "--exit-signal-handler", f"--pretrained-checkpoint {tmp_path}/init --log-interval 1",
                 "export GLOO_SOCKET_IFNAME=lo", "--platform cpu --format export)", 'eval "$PRESET"', 'trap "" USR1']:
        assert line in text, line
    assert "--gpus-per-node" not in text  # CPU profile asks Slurm for no GPUs
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck); bash -n passed")
    res = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_seed_array_and_dependent_merge(tmp_path, slurm_stub, capsys):
    rc = cli(tmp_path, "--run-name", "s2", "--seeds", "5796", "6198", "8915", recipe="stage2")
    out = capsys.readouterr().out
    assert rc == 0
    train, merge = calls(tmp_path)
    assert train == f"--parsable {tmp_path}/runs/s2/submit/train_seeds.sbatch"
    assert merge == f"--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes {tmp_path}/runs/s2/submit/merge.sbatch"
    assert "submitted training job 101 (array of 3: seeds [5796, 6198, 8915])" in out
    assert f"logs: {tmp_path}/runs/s2/logs/instella-s2-%A_%a.out" in out
    assert "submitted merge job 102" in out and f"output: {tmp_path}/runs/s2/merged" in out
    text = (tmp_path / "runs/s2/submit/train_seeds.sbatch").read_text()
    assert "#SBATCH --array=0-2" in text and "SEEDS=(5796 6198 8915)" in text and '--seed "$SEED"' in text
    assert 'CKPT_DIR="$RUN_DIR/seed_$SEED/checkpoints"' in text
    m = (tmp_path / "runs/s2/submit/merge.sbatch").read_text()
    for s in (5796, 6198, 8915):
        assert f"{tmp_path}/runs/s2/seed_{s}/checkpoints" in m
    assert 'MERGE_ARGS=(--inputs "${INPUTS[@]}" --output "$OUTPUT")' in m
    assert '-m instella_plugin.cli merge "${MERGE_ARGS[@]}"' in m
    assert f"OUTPUT={tmp_path}/runs/s2/merged" in m
    record = json.loads((tmp_path / "runs/s2/submit/submissions.jsonl").read_text())
    assert record["jobs"] == {"train": "101", "merge": "102"}
    for script in ("train_seeds.sbatch", "merge.sbatch"):
        subprocess.run(["bash", "-n", str(tmp_path / "runs/s2/submit" / script)], check=True)
        if shutil.which("shellcheck"):
            res = subprocess.run(["shellcheck", str(tmp_path / "runs/s2/submit" / script)], capture_output=True, text=True)
            assert res.returncode == 0, res.stdout


def test_resubmit_resumes_and_guards_the_run(tmp_path, slurm_stub, capsys):
    assert cli(tmp_path, "--run-name", "r") == 0
    ckpt = tmp_path / "runs/r/checkpoints"
    assert "checkpoints: starts from scratch" in capsys.readouterr().out
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("40\n")
    assert cli(tmp_path, "--run-name", "r") == 0
    assert f"{ckpt}: resumes from iteration 40" in capsys.readouterr().out
    assert len(calls(tmp_path)) == 2  # same script again: --load = --save picks up the checkpoint
    (tmp_path / "queued").write_text("555\n")
    assert cli(tmp_path, "--run-name", "r") == 2
    assert "still has jobs queued or running (555)" in capsys.readouterr().err
    (tmp_path / "queued").unlink()
    assert cli(tmp_path, "--run-name", "r", recipe="stage1") == 2
    assert "was submitted with recipe='tiny-cpu'" in capsys.readouterr().err
    assert len(calls(tmp_path)) == 2


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli(tmp_path) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err


STUB_TRAINER = '''
import argparse, json, os
p = argparse.ArgumentParser(); p.add_argument("--save"); p.add_argument("--load"); p.add_argument("--seed")
p.add_argument("--train-iters", type=int); a, _ = p.parse_known_args()
tracker = os.path.join(a.load, "latest_checkpointed_iteration.txt")
start = int(open(tracker).read()) if os.path.exists(tracker) else 0
if int(os.environ["RANK"]) == 0:
    with open(os.path.join(a.save, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"start": start, "world": int(os.environ["WORLD_SIZE"]), "seed": a.seed}) + "\\n")
    open(tracker, "w").write(str(start + a.train_iters))
'''


def test_local_runs_the_same_script_and_resumes(tmp_path, monkeypatch, capsys):
    """--local: bash runs the written script for each seed, torchrun starts 2 ranks; a seed with a
    checkpoint resumes from it."""
    stub = tmp_path / "stub_trainer.py"
    stub.write_text(STUB_TRAINER)
    real_plan = submit.plan

    def plan_with_stub(args):
        spec, merge_dir = real_plan(args)
        spec.entry = [str(stub)]
        return spec, merge_dir

    monkeypatch.setattr(submit, "plan", plan_with_stub)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no sbatch needed for --local
    args = ("--run-name", "loc", "--seeds", "11", "22", "--no-merge", "--train-iters", "5", "--local")
    done = tmp_path / "runs/loc/seed_11/checkpoints"  # seed 11 saved iteration 5 in an earlier run
    done.mkdir(parents=True)
    (done / "latest_checkpointed_iteration.txt").write_text("5")
    assert cli(tmp_path, *args) == 0
    out = capsys.readouterr().out
    calls_11 = [json.loads(x) for x in (done / "calls.jsonl").read_text().splitlines()]
    calls_22 = [json.loads(x) for x in (tmp_path / "runs/loc/seed_22/checkpoints/calls.jsonl").read_text().splitlines()]
    assert calls_11 == [{"start": 5, "world": 2, "seed": "11"}]
    assert calls_22 == [{"start": 0, "world": 2, "seed": "22"}]
    assert f"resuming from iteration 5 in {done}" in out and "starting from scratch" in out
    assert (done / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert "TOKENIZERS_PARALLELISM=false" in out and "local run finished with exit codes [0, 0]" in out
    assert (tmp_path / "runs/loc/logs/local-train-22.out").exists()


def test_recipe_defaults_drive_the_layout_and_seeds(tmp_path, capsys):
    """stage2 on the 16-node MI300X profile: the recipe's batch sizes and its three seeds."""
    rc = submit.main(["--recipe", "stage2", "--profile", "mi300x-16node", "--set", f"output_root={tmp_path}",
                      "--set", f"data_root={tmp_path}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "128 ranks = TP 1 x PP 1 x CP 1 x DP 128; global batch 1024 = micro 4 x DP 128 x 2" in out
    text = (tmp_path / "stage2/submit/train_seeds.sbatch").read_text()
    assert "#SBATCH --array=0-2" in text and "SEEDS=(5796 6198 8915)" in text
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --nodes=16" in text and "#SBATCH --exclusive" in text
    assert "--data-blend stage2" in text and "--platform rocm --format export" in text
    assert "--train-iters" not in text  # the recipe's own schedule stays in charge
    assert (tmp_path / "stage2/submit/merge.sbatch").exists()


# ---- --data-path: one data file instead of a blend (GRPO prompt files) --------------------------------
def trainer_argv(script):
    """The trainer's argv as the job script hands it over (entry after its script path, then TRAIN_ARGS),
    expanded by bash itself: the TRAIN=( ... ) and TRAIN_ARGS=( ... ) arrays, with CKPT_DIR and SEED set."""
    lines = Path(script).read_text().splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("TRAIN=("))
    end = next(i for i in range(lines.index("TRAIN_ARGS=(", start), len(lines)) if lines[i] == ")")
    snippet = "\n".join(['CKPT_DIR=/ckpt/run', "SEED=7", *lines[start:end + 1],
                         'printf "%s\\0" "${TRAIN[@]:1}" "${TRAIN_ARGS[@]}"'])
    out = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def submit_grpo(tmp_path, *extra, profile="mi300x-1node"):
    return submit.main(["--recipe", "grpo-stage1", "--profile", profile, "--set", f"output_root={tmp_path}/runs",
                        "--set", f"data_root={tmp_path}/data", *extra])


def test_grpo_recipe_with_a_prompt_file_gives_a_command_the_trainer_accepts(tmp_path, capfd, monkeypatch):
    """A relative --data-path is under the profile's data_root; the script passes it as the trainer's
    --data-path (no blend, no data root) and the trainer's own parser accepts the whole command.
    (capfd: the trainer's plugin imports megatron's inference package, whose faulthandler needs real fds.)"""
    prompts = tmp_path / "data/grpo/big-math.jsonl"
    prompts.parent.mkdir(parents=True)
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}=?", "answer": str(2 * a)}) + "\n" for a in range(4)))
    rc = submit_grpo(tmp_path, "--data-path", "grpo/big-math.jsonl", "--init-from", str(tmp_path / "math-sft2"),
                     "--dry-run", "--", "--grpo-rollout-batch", "16")
    out = capfd.readouterr().out
    assert rc == 0
    assert "8 ranks = TP 1 x PP 1 x CP 1 x DP 8; global batch 256 = micro 1 x DP 8 x 32 accumulation" in out
    script = tmp_path / "runs/grpo-stage1/submit/train.sbatch"
    text = script.read_text()
    assert f"  --instella-recipe grpo-stage1 --data-path {prompts}\n" in text
    assert "--data-blend" not in text and "--data-root" not in text
    assert f"recipe grpo-stage1, data {prompts}, cluster profile mi300x-1node." in text
    record = json.loads((tmp_path / "runs/grpo-stage1/run.json").read_text())
    assert record["data_path"] == str(prompts) and "blend" not in record and record["seeds"] == [6198]
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout

    argv = trainer_argv(script)
    assert argv[argv.index("--data-path") + 1] == str(prompts)
    monkeypatch.setenv("WORLD_SIZE", "8")
    run, plugin = parse_args(argv)
    settings = plugin.grpo_settings(run)
    assert run.data.kind == "grpo" and run.data.named[0] == str(prompts)
    assert (run.flags.instella_recipe, run.flags.save, run.flags.load) == ("grpo-stage1", "/ckpt/run", "/ckpt/run")
    assert (run.layout.tp, run.layout.dp, run.layout.global_batch_size) == (1, 8, 256)
    assert (settings.group_size, settings.prompts_per_step, settings.rollout_batch) == (8, 128, 16)
    assert run.flags.pretrained_checkpoint == str(tmp_path / "math-sft2") and run.flags.seed == 6198


def test_blend_or_data_path_errors(tmp_path, slurm_stub, capsys):
    """Neither, both, a recipe whose blend the trainer would use instead, a missing file, GRPO groups that
    do not split over the data-parallel ranks: exit 2 with the fix, nothing written or submitted. A dry run
    only warns about a missing file."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1=?", "answer": "2"}) + "\n")
    assert submit_grpo(tmp_path) == 2
    assert ("recipe 'grpo-stage1' names no data blend; pass --blend NAME, or --data-path PATH (for a GRPO recipe: "
            "the JSONL/Parquet prompt file)") in capsys.readouterr().err
    assert submit_grpo(tmp_path, "--blend", "tiny", "--data-path", str(prompts)) == 2
    assert "--blend and --data-path are alternatives" in capsys.readouterr().err
    assert submit.main(["--recipe", "tiny-cpu", "--profile", "local-cpu", "--data-path", str(prompts),
                        "--set", f"output_root={tmp_path}/runs"]) == 2
    assert ("recipe 'tiny-cpu' trains on the blend 'tiny', which the trainer uses before any --data-path"
            in capsys.readouterr().err)
    assert submit_grpo(tmp_path, "--data-path", "missing.jsonl") == 2
    err = capsys.readouterr().err
    assert f"--data-path 'missing.jsonl': prompt file {tmp_path}/data/missing.jsonl not found on this host" in err
    assert "under the profile's data_root" in err
    assert not (tmp_path / "runs").exists() and calls(tmp_path) == []
    assert submit_grpo(tmp_path, "--data-path", "missing.jsonl", "--dry-run") == 0
    assert f"warning: --data-path 'missing.jsonl': prompt file {tmp_path}/data/missing.jsonl" in capsys.readouterr().err
    assert submit_grpo(tmp_path, "--run-name", "big", "--data-path", str(prompts), "--dry-run",
                       profile="mi300x-16node") == 2
    assert ("GRPO: a mini-batch of 32 prompts (global batch 256 / group size 8) does not split over 128 data-parallel "
            "ranks (each rank keeps whole groups); use --nodes 4") in capsys.readouterr().err
    assert submit_grpo(tmp_path, "--run-name", "big", "--data-path", str(prompts), "--dry-run", "--",
                       "--grpo-group-size", "4", profile="mi300x-16node") == 2  # the trainer flag counts
    assert ("a mini-batch of 64 prompts (global batch 256 / group size 4) does not split over 128 data-parallel "
            "ranks (each rank keeps whole groups); use --nodes 8") in capsys.readouterr().err
    assert not (tmp_path / "runs/big").exists()
    assert submit_grpo(tmp_path, "--run-name", "g4", "--data-path", str(prompts), "--dry-run", "--nodes", "4",
                       profile="mi300x-16node") == 0  # the official 4 x 8 MI300X: one prompt a rank per update
    assert "32 ranks = TP 1 x PP 1 x CP 1 x DP 32;" in capsys.readouterr().out
    assert submit_grpo(tmp_path, "--run-name", "g", "--data-path", str(prompts)) == 0  # absolute: as given
    assert calls(tmp_path) == [f"--parsable {tmp_path}/runs/g/submit/train.sbatch"]
    assert f"--data-path {prompts}\n" in (tmp_path / "runs/g/submit/train.sbatch").read_text()

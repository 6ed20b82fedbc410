"""End to end on a real Slurm: a single-node cluster (munged, slurmctld, slurmd from Debian's slurm-wlm
and munge) started on this machine for the module and stopped by pid at the end.

1. The signal path: a job written by ``instella submit`` gets USR1 (as ``--signal=USR1@secs`` delivers
   it); torchrun must survive it and every rank must see it, so the job ends COMPLETED.
2. The tiny CPU recipe through ``instella submit`` (2 ranks via srun + torchrun, gloo): the job
   succeeds, the loss falls, a checkpoint exists; resubmitting resumes from it; then the three-seed
   array and the merge job that depends on it.
Skipped, with the reason, where the Slurm binaries are not installed (.ci/run installs them).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, missing_reason  # noqa: E402

from instella_plugin.launch import jobscript, submit  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def env_for(cluster):
    return {**cluster.env(), "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def submit_cli(cluster, *args):
    res = subprocess.run([sys.executable, "-m", "instella_plugin.cli", "submit", *args], env=env_for(cluster),
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = re.findall(r"submitted (?:training|merge) job (\d+)", res.stdout)
    return res.stdout, jobs


def job_logs(logs):
    """The tail of every job log under ``logs``: what a failed assertion on job states should show."""
    return "\n".join(f"== {f}\n" + f.read_text()[-3000:] for f in sorted(Path(logs).glob("*.out")))


def assert_completed(cluster, jobs, timeout, logs):
    states = cluster.wait_jobs(jobs, timeout)
    bad = {k: (v.get("JobState"), v.get("ExitCode")) for k, v in states.items()
           if v.get("JobState") != "COMPLETED" or v.get("ExitCode") != "0:0"}
    if bad:
        pytest.fail(f"jobs did not complete: {bad}\n{job_logs(logs)}")
    return states


STUB_TRAINER = '''
import argparse, os, signal, sys, time
p = argparse.ArgumentParser(); p.add_argument("--save"); a, _ = p.parse_known_args()
rank = int(os.environ["RANK"]); got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
open(os.path.join(a.save, f"started.{rank}"), "w").write(str(os.getppid()))
for _ in range(1200):
    if got:
        time.sleep(2)  # a checkpoint save takes a while: torchrun must not die meanwhile
        open(os.path.join(a.save, f"saved.{rank}"), "w").write("ok")
        sys.exit(0)
    time.sleep(0.1)
sys.exit(3)
'''


def test_usr1_reaches_the_ranks_and_torchrun_survives(cluster, tmp_path):
    stub = tmp_path / "stub_trainer.py"
    stub.write_text(STUB_TRAINER)
    args = submit.argparse.ArgumentParser()
    submit.add_arguments(args)
    spec, _ = submit.plan(args.parse_args(["--recipe", "tiny-cpu", "--profile", "local-cpu", "--blend", "tiny",
                                           "--set", f"output_root={tmp_path}", "--run-name", "sig"]))
    spec.entry = [str(stub)]
    script = tmp_path / "sig.sbatch"
    script.write_text(jobscript.render_train_script(spec))
    (tmp_path / "sig/logs").mkdir(parents=True)
    jid = subprocess.run(["sbatch", "--parsable", str(script)], env=env_for(cluster), capture_output=True,
                         text=True, check=True).stdout.strip()
    ckpt = tmp_path / "sig/checkpoints"
    deadline = time.time() + 120
    while not all((ckpt / f"started.{r}").exists() for r in (0, 1)):
        assert time.time() < deadline, cluster.job_state(jid)
        time.sleep(0.5)
    # What --signal=USR1@secs does at the warning time: USR1 to every process of the job steps.
    subprocess.run(["scancel", "--signal=USR1", jid], env=env_for(cluster), check=True)
    assert_completed(cluster, [jid], 120, tmp_path / "sig/logs")
    assert all((ckpt / f"saved.{r}").read_text() == "ok" for r in (0, 1))


SEED_STUB = """
import argparse, json, os, sys
p = argparse.ArgumentParser(); p.add_argument("--save"); p.add_argument("--seed"); a, _ = p.parse_known_args()
tracker = os.path.join(a.save, "latest_checkpointed_iteration.txt")
start = int(open(tracker).read()) if os.path.exists(tracker) else 0
if os.environ["RANK"] == "0":
    with open(os.path.join(a.save, "starts.txt"), "a") as f:
        f.write(f"{start}\\n")
    if a.seed == os.environ.get("FAIL_SEED"):
        sys.exit(1)
    open(tracker, "w").write(str(start + 4))
"""
MERGE_STUB = """
import argparse, json, os
p = argparse.ArgumentParser(); p.add_argument("--inputs", nargs="+"); p.add_argument("--output")
p.add_argument("--overwrite", action="store_true"); a = p.parse_args()
os.makedirs(a.output, exist_ok=True)
json.dump(a.inputs, open(os.path.join(a.output, "inputs.json"), "w"))
"""


def test_merge_runs_only_after_every_seed_succeeded(cluster, tmp_path, monkeypatch):
    """Array + afterok merge with stand-ins for the trainer and merge: one failing seed cancels the
    merge; resubmitting the run resumes the seeds and the merge then runs on all three."""
    (tmp_path / "seed.py").write_text(SEED_STUB)
    (tmp_path / "merge.py").write_text(MERGE_STUB)
    real_plan, real_merge = submit.plan, jobscript.render_merge_script

    def plan(args):
        spec, merge_dir = real_plan(args)
        spec.entry = [str(tmp_path / "seed.py")]
        return spec, merge_dir

    monkeypatch.setattr(submit, "plan", plan)
    monkeypatch.setattr(jobscript, "render_merge_script", lambda spec, d: real_merge(spec, d).replace(
        "-m instella_plugin.cli merge", str(tmp_path / "merge.py")))
    for k, v in env_for(cluster).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FAIL_SEED", "6198")
    argv = ["--recipe", "stage2", "--profile", "local-cpu", "--blend", "tiny", "--set", f"output_root={tmp_path}",
            "--run-name", "s2", "--seeds", "5796", "6198", "8915"]
    run = tmp_path / "s2"

    def submit_and_wait():
        assert submit.main(argv) == 0
        jobs = json.loads((run / "submit/submissions.jsonl").read_text().splitlines()[-1])["jobs"]
        states = cluster.wait_jobs([jobs["train"], jobs["merge"]], 300)
        return {k: v["JobState"] for k, v in states.items()}, jobs

    states, jobs = submit_and_wait()
    seeds = [s for k, s in states.items() if not k.startswith(jobs["merge"])]
    assert sorted(seeds) == ["COMPLETED", "COMPLETED", "FAILED"], f"{states}\n{job_logs(run / 'logs')}"
    assert states[jobs["merge"]] == "CANCELLED" and not (run / "merged").exists()

    monkeypatch.delenv("FAIL_SEED")
    states, jobs = submit_and_wait()
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{job_logs(run / 'logs')}"
    starts = {s: (run / f"seed_{s}/checkpoints/starts.txt").read_text().split() for s in (5796, 6198, 8915)}
    assert starts == {5796: ["0", "4"], 6198: ["0", "0"], 8915: ["0", "4"]}  # resumed where they had saved
    merged = json.loads((run / "merged/inputs.json").read_text())
    assert merged == [str(run / f"seed_{s}/checkpoints") for s in (5796, 6198, 8915)]


def _losses(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(r["iteration"], r["loss"]) for r in rows if "loss" in r]  # training steps, not eval rows


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    if not (ROOT / "pretrain_gpt.py").exists():
        pytest.fail("pretrain_gpt.py is not at the repository root: the trainer these tests submit is missing")
    from instella_plugin.data.demo_corpus import build_demo_corpus
    return build_demo_corpus(str(tmp_path_factory.mktemp("data")), num_docs=400, num_chats=16)


# Short runs: warm up over 2 steps instead of the recipe's 20, log every step.
TRAINER_ARGS = ["--", "--log-interval", "1", "--lr-warmup-iters", "2"]


def tiny_args(tmp_path, data_root, run_name, *extra):
    return ["--recipe", "tiny-cpu", "--profile", "local-cpu", "--run-name", run_name,
            "--set", f"output_root={tmp_path}/runs", "--set", f"data_root={data_root}", *extra, *TRAINER_ARGS]


def test_tiny_cpu_recipe_trains_then_resumes(cluster, tiny_data, tmp_path):
    """tiny-cpu (TP=2 over 2 gloo ranks) through srun + torchrun: success, falling loss, a checkpoint;
    the same submission with a longer schedule resumes from it."""
    out, [jid] = submit_cli(cluster, *tiny_args(tmp_path, tiny_data, "tiny", "--train-iters", "20"))
    assert "starts from scratch" in out
    run = tmp_path / "runs/tiny"
    assert_completed(cluster, [jid], 240, run / "logs")
    ckpt = run / "checkpoints"
    assert (ckpt / TRACKER).read_text().strip() == "20"
    assert (ckpt / "iter_0000020").is_dir(), sorted(os.listdir(ckpt))
    losses = _losses(ckpt / "train_log.jsonl")
    assert [it for it, _ in losses] == list(range(1, 21))
    first, last = [x[1] for x in losses[:5]], [x[1] for x in losses[-5:]]
    assert sum(last) / 5 < 0.8 * sum(first) / 5, losses
    log = (run / "logs" / f"instella-tiny-{jid}.out").read_text()
    assert "launch environment for platform cpu" in log and "iteration      20/20" in log

    out, [jid2] = submit_cli(cluster, *tiny_args(tmp_path, tiny_data, "tiny", "--train-iters", "26", "--overwrite"))
    assert f"{ckpt}: resumes from iteration 20" in out
    assert_completed(cluster, [jid2], 240, run / "logs")
    assert (ckpt / TRACKER).read_text().strip() == "26"
    assert "resuming from iteration 20" in (run / "logs" / f"instella-tiny-{jid2}.out").read_text()
    second = [it for it, _ in _losses(ckpt / "train_log.jsonl")][len(losses):]
    assert second == list(range(21, 27)), second


def test_tiny_cpu_seed_array_then_merge(cluster, tiny_data, tmp_path):
    """Three seeds as a Slurm array, then ``instella merge`` in a job that waits for all of them."""
    out, (arr, merge) = submit_cli(cluster, *tiny_args(tmp_path, tiny_data, "seeds", "--seeds", "5796", "6198",
                                                       "8915", "--train-iters", "3"))
    assert "array of 3" in out
    run = tmp_path / "runs/seeds"
    assert_completed(cluster, [arr, merge], 420, run / "logs")
    for seed in (5796, 6198, 8915):
        assert (run / f"seed_{seed}/checkpoints" / TRACKER).read_text().strip() == "3"
    assert (run / "merged" / TRACKER).read_text().strip() == "3"  # a Megatron checkpoint of the final step
    assert "merged 3 checkpoints" in (run / "logs" / f"instella-seeds-merge-{merge}.out").read_text()

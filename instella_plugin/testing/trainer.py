"""Run ``pretrain_gpt.py`` under torchrun from tests and read back its per-step log."""
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = ["--plugin", "instella", "--model-preset", "instella-test", "--seq-length", "32", "--mock-data",
              "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-warmup-init", "1e-4",
              "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--decay-all-params", "--adam-beta2", "0.95",
              "--log-interval", "1", "--no-plot", "--device", "cpu"]


def run_trainer(nproc: int, args, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(REPO, "pretrain_gpt.py"), *map(str, args)]
    env = dict(env or {})
    extra_path = env.pop("PYTHONPATH", "")
    full_env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", **env)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, REPO, os.environ.get("PYTHONPATH", "")) if p)
    # Output goes through files, not pipes: a crashed rank's orphaned helper processes may keep a
    # pipe open long after the launcher has exited.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(cmd, stdout=out, stderr=err, env=full_env, timeout=timeout).returncode
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_log(save_dir: str):
    """(train losses by iteration, eval losses by iteration) from ``SAVE/train_log.jsonl``."""
    train, evals = {}, {}
    with open(os.path.join(save_dir, "train_log.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("loss") is not None:
                train[r["iteration"]] = r["loss"]
            if "eval_loss" in r:
                evals[r["iteration"]] = r["eval_loss"]
    return train, evals

"""``make demo``: train a tiny Instella on CPU with TP=2 on a generated corpus, then show the result.

Builds the demo corpus (tokenised with the real Instella tokenizer) under ``OUT/data``, runs
``torchrun --nproc-per-node 2 pretrain_gpt.py --plugin instella --instella-recipe tiny-cpu`` into
``OUT/run`` (a fresh run each time), and prints the first and final losses, the checkpoint and the
loss plot. Extra arguments are passed to the trainer (e.g. ``--train-iters 50``).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys

from instella_plugin.checkpoint_layout import TRACKER, iteration_dir, latest_iteration
from instella_plugin.testing.trainer import read_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "demo"))
    parser.add_argument("--nproc", type=int, default=2)
    args, trainer_args = parser.parse_known_args(argv)
    from instella_plugin.data.demo_corpus import build_demo_corpus  # megatron-core's dataset writer: seconds

    data, run = os.path.join(args.out, "data"), os.path.join(args.out, "run")
    if not os.path.isdir(os.path.join(data, "tiny")):
        print(f"building the demo corpus in {data} ...", flush=True)
        build_demo_corpus(data)
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           os.path.join(REPO, "pretrain_gpt.py"), "--plugin", "instella", "--instella-recipe", "tiny-cpu",
           "--tensor-model-parallel-size", str(args.nproc), "--data-root", data, "--save", run, "--load", run,
           *trainer_args]
    print(" ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"))
    code = subprocess.call(cmd, env=env)
    if code:
        return code
    train, evals = read_log(run)
    steps = sorted(train)
    first, last20 = train[steps[0]], statistics.mean(train[s] for s in steps[-20:])
    print("\n=== demo result ===")
    print(f"loss: first step {first:.3f} -> mean of the last 20 steps {last20:.3f} ({last20 / first:.2f}x)")
    if evals:
        print("eval loss: " + ", ".join(f"iteration {k}: {v:.3f}" for k, v in sorted(evals.items())))
    print(f"checkpoint: {iteration_dir(run, latest_iteration(run))} (tracker {TRACKER})")
    print(f"loss curve: {run}/loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

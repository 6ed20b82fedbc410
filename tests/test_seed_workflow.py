"""The stage-2 seed workflow end to end (slow): examples/stage2_seeds_merge_tiny.sh on CPU.

A tiny stage 1 (tiny-cpu recipe, TP=2 over two gloo ranks), stage 2 from it with seeds 5796, 6198
and 8915 (stage-1 weights and optimizer state, iteration and schedule reset), ``instella merge``,
and the eval loss of stage 1, each seed and the merge on the same validation samples. Checked: the
seeds really differ, the merged checkpoint is weights only and equals the element-wise mean of the
three seeds computed here, every eval loss is finite, stage 2 improves on stage 1, and the merge is
no worse than the mean of the seeds' losses (plus a small margin). The losses are printed.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (5796, 6198, 8915)


@pytest.mark.slow
def test_stage2_seeds_merge_and_eval(tmp_path):
    from instella_plugin.hf.megatron_io import MegatronCheckpoint, param_names
    from instella_plugin.training.checkpointing import read_meta, resolve_checkpoint_dir

    env = dict(os.environ, WORK=str(tmp_path), S1_ITERS="30", S2_ITERS="12", EVAL_ITERS="4", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "stage2_seeds_merge_tiny.sh")], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    print(proc.stdout[proc.stdout.rindex("checkpoint "):])
    stage1 = tmp_path / "stage1" / "iter_0000030"
    assert proc.stdout.count(f"loaded checkpoint {stage1} (iteration 30); starting at iteration 0") == 3
    losses = json.loads((tmp_path / "eval_losses.json").read_text())
    assert all(math.isfinite(v) for v in losses.values()), losses

    meta = read_meta(str(tmp_path / "merged"))
    assert meta["contents"] == ["model"] and len(meta["merge"]["inputs"]) == 3
    seeds = [MegatronCheckpoint(resolve_checkpoint_dir(str(tmp_path / f"seed_{s}")), 4) for s in SEEDS]
    merged = MegatronCheckpoint(resolve_checkpoint_dir(str(tmp_path / "merged")), 4)
    for name in param_names(4)[::7]:
        a, b, c = (ck.read_param(name).float() for ck in seeds)
        assert not torch.equal(a, b), f"seeds 5796 and 6198 trained to identical {name}"
        want = (((a + b) + c) / 3).to(merged.read_param(name).dtype)
        assert torch.equal(merged.read_param(name), want), name

    seed_losses = [losses[f"seed_{s}"] for s in SEEDS]
    assert max(seed_losses) < losses["stage1"], losses
    assert losses["merged"] <= sum(seed_losses) / 3 + 0.02, losses

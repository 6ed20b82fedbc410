"""Multi-process runs of pretrain_gpt.py on CPU: exact resume, DP / distributed optimizer, interleaved
PP, loading at another layout, crash-safe saves, a spec from another distribution, and the stock
megatron-core GPT without ``--plugin``.

Launches are shared between assertions (each rank costs seconds of imports on two cores).
"""
import os
import textwrap

import pytest

from instella_plugin.testing.trainer import TINY_MODEL, read_log, run_trainer
from instella_plugin.training import checkpointing

pytestmark = pytest.mark.dist


# ---- exact resume at TP=2 x PP=2 (2 micro-batches per step) ----------------------------------------
def test_resume_is_bitwise_exact_at_tp2_pp2(tmp_path):
    common = TINY_MODEL + ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2,
                           "--micro-batch-size", 1, "--global-batch-size", 2, "--train-iters", 6]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_trainer(4, common + ["--save", full, "--save-interval", 3])
    out = run_trainer(4, common + ["--load", full / "iter_0000003", "--save", resumed])
    assert "resuming at iteration 3" in out.stdout
    ref, _ = read_log(full)
    got, _ = read_log(resumed)
    assert sorted(got) == [4, 5, 6]
    assert all(got[i] == ref[i] for i in (4, 5, 6)), (got, ref)  # bitwise


# ---- DP=2 with the distributed optimizer, PP=2 x VPP=2, and a spec from another distribution ------
SPEC_PACKAGE = textwrap.dedent('''
    import os
    from instella_plugin.model.rms_norm import InstellaRMSNorm
    from instella_plugin.model.specs import InstellaLocalProvider

    class MarkedRMSNorm(InstellaRMSNorm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            open(os.environ["MARKER_FILE"], "a").write("used\\n")

    class MarkedProvider(InstellaLocalProvider):
        def layer_norm(self, rms_norm=True, for_qk=False):
            return super().layer_norm(rms_norm, for_qk) if for_qk else MarkedRMSNorm
''')


def _throwaway_distribution(root):
    (root / "thirdparty_specs.py").write_text(SPEC_PACKAGE)
    info = root / "thirdparty_specs-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-specs\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[instella_layer_specs]\nthirdparty = thirdparty_specs:MarkedProvider\n")


def test_data_parallel_and_interleaved_pipeline_match_single_rank(tmp_path):
    common = TINY_MODEL + ["--micro-batch-size", 1, "--global-batch-size", 4, "--train-iters", 5]
    dist = tmp_path / "dist"
    dist.mkdir()
    _throwaway_distribution(dist)
    marker = tmp_path / "marker"
    env = {"PYTHONPATH": f"{dist}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "MARKER_FILE": str(marker)}
    out = run_trainer(1, common + ["--spec", "thirdparty", "--save", tmp_path / "ref"], env=env)
    assert marker.read_text().count("used") >= 1  # the entry-point spec built the model
    assert "layer: norm MarkedRMSNorm, attention SelfAttention (InstellaDotProductAttention)" in out.stdout
    ref, _ = read_log(tmp_path / "ref")

    run_trainer(2, common + ["--use-distributed-optimizer", "--save", tmp_path / "dp2", "--save-interval", 3])
    dp2, _ = read_log(tmp_path / "dp2")
    run_trainer(2, common + ["--use-distributed-optimizer", "--load", tmp_path / "dp2" / "iter_0000003",
                             "--save", tmp_path / "dp2r"])
    dp2r, _ = read_log(tmp_path / "dp2r")
    run_trainer(2, common + ["--pipeline-model-parallel-size", 2, "--num-layers-per-virtual-pipeline-stage", 1,
                             "--save", tmp_path / "vpp"])
    vpp, _ = read_log(tmp_path / "vpp")

    for it in range(1, 6):
        assert abs(dp2[it] - ref[it]) <= 1e-5 * abs(ref[it]), (it, dp2[it], ref[it])
        assert abs(vpp[it] - ref[it]) <= 1e-5 * abs(ref[it]), (it, vpp[it], ref[it])
    assert all(dp2r[i] == dp2[i] for i in (4, 5))  # bitwise resume with the distributed optimizer


# ---- save at TP=2/PP=1 (stopped by --exit-interval), load at TP=1/PP=2 ------------------------------
def test_checkpoint_loads_at_another_layout_with_the_same_eval_loss(tmp_path):
    common = TINY_MODEL + ["--micro-batch-size", 2, "--global-batch-size", 2, "--train-iters", 4,
                           "--eval-interval", 4, "--eval-iters", 2]
    run_trainer(2, common + ["--tensor-model-parallel-size", 2, "--exit-interval", 2, "--save", tmp_path / "a"])
    assert checkpointing.latest_iteration(str(tmp_path / "a")) == 2
    meta = checkpointing.read_meta(str(tmp_path / "a"))
    assert meta["layout"]["tp"] == 2 and meta["model"]["hidden_size"] == 320 and "optimizer" in meta["contents"]
    _, eval_a = read_log(tmp_path / "a")
    run_trainer(2, common + ["--pipeline-model-parallel-size", 2, "--load", tmp_path / "a", "--skip-train",
                             "--save", tmp_path / "b"])
    _, eval_b = read_log(tmp_path / "b")
    assert set(eval_a) == {2} and set(eval_b) == {2}
    assert abs(eval_a[2] - eval_b[2]) <= 1e-5 * eval_a[2], (eval_a, eval_b)


# ---- a crash mid-save leaves the previous checkpoint loadable ---------------------------------------
def test_fault_mid_save_resumes_from_previous_iteration(tmp_path):
    save = tmp_path / "run"
    common = TINY_MODEL + ["--micro-batch-size", 2, "--global-batch-size", 2, "--train-iters", 6,
                           "--save", save, "--load", save, "--save-interval", 2]
    crashed = run_trainer(1, common, env={"INSTELLA_CKPT_FAULT": "4"}, check=False)
    assert crashed.returncode != 0
    assert checkpointing.latest_iteration(str(save)) == 2
    assert (save / "iter_0000004.partial").exists() and not (save / "iter_0000004").exists()
    out = run_trainer(1, common)
    assert "resuming at iteration 2" in out.stdout
    assert checkpointing.latest_iteration(str(save)) == 6
    assert not (save / "iter_0000004.partial").exists()


# ---- without --plugin: megatron-core's stock GPT, the baseline ------------------------------------------
def test_stock_gpt_without_plugin_trains(tmp_path):
    """No plugin: Megatron-LM's model flags, megatron's local spec and init; the first loss is that of
    near-uniform predictions over the 512-token vocabulary (init std 0.02), and it falls."""
    import math

    args = ["--num-layers", 2, "--hidden-size", 64, "--num-attention-heads", 4, "--vocab-size", 512,
            "--seq-length", 32, "--mock-data", "--lr", "3e-3", "--train-iters", 8, "--lr-warmup-iters", 1,
            "--micro-batch-size", 2, "--global-batch-size", 4, "--tensor-model-parallel-size", 2,
            "--device", "cpu", "--no-plot", "--log-interval", 1, "--save", tmp_path / "stock"]
    out = run_trainer(2, args)
    assert "attention SelfAttention (DotProductAttention)" in out.stdout and "fused kernels" not in out.stdout
    losses, _ = read_log(tmp_path / "stock")
    assert abs(losses[1] - math.log(512)) < 0.1, losses
    assert losses[8] < losses[1] - 0.3, losses

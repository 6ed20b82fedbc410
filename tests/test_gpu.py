"""GPU tests: the checks of ``tests/gpu/gpu_checks.py`` under pytest, skipped where torch sees no GPU.

On a GPU machine: the CPU mode changes nothing, ``instella-te`` and the fused specs give ``instella``'s
logits within bf16 tolerance (those whose library does not import are named as skipped), and the
trainer runs with NCCL at TP=1 (and TP=2 with two GPUs) with finite losses and a throughput line.
``tests/gpu/run_gpu_checks.sh`` runs the same checks, plus the 1B preset, the kernels and a fused-spec
run, in one timed script. On the CPU: the script's log parser keeps in step with the trainer's log
line, and (slow tier) the whole script passes its dry run.
"""
import io
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stdout
from types import SimpleNamespace

import pytest
import torch

CHECKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu", "gpu_checks.py")
NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(NGPU == 0, reason="no GPU: torch sees no CUDA/ROCm device; these tests run on a "
                                                 "GPU machine (or use tests/gpu/run_gpu_checks.sh there)")


def _check(*args, timeout=600):
    """(status, detail) of one gpu_checks.py subcommand."""
    proc = subprocess.run([sys.executable, CHECKS, *args], capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no RESULT line (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    _, status, detail = (lines[-1] + " ").split(" ", 2)
    return status, f"{detail}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}" if status == "FAIL" else detail


@pytest.mark.gpu
@needs_gpu
def test_cpu_mode_patches_nothing_on_a_gpu():
    status, detail = _check("cpu-mode")
    assert status == "PASS", detail


@pytest.mark.gpu
@needs_gpu
def test_other_specs_logits_match_local_spec_in_bf16():
    status, detail = _check("spec-parity")
    if status == "SKIP":
        pytest.skip(detail)  # none of the other specs' libraries import on this GPU machine
    assert status == "PASS", detail


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tp", [1, 2])
def test_trainer_runs_with_nccl(tp):
    if NGPU < tp:
        pytest.skip(f"TP={tp} needs {tp} GPUs; this machine has {NGPU}")
    status, detail = _check("train", "--preset", "instella-tiny", "--tp", str(tp), "--steps", "10")
    assert status == "PASS", detail
    assert "tokens/s" in detail and "MFU" in detail


def test_log_parser_reads_the_trainers_progress_line():
    """The GPU script reads tokens/s, TFLOP/s and MFU from the line ``Progress`` prints (CPU, no launch)."""
    sys.path.insert(0, os.path.dirname(CHECKS))
    from gpu_checks import parse_log

    from instella_plugin.model.config import get_preset
    from instella_plugin.training.progress import Progress, train_flops_per_token

    cfg = get_preset("instella-test")
    args = SimpleNamespace(save=None, tensorboard_dir=None, wandb_project=None, log_interval=2, train_iters=4,
                           global_batch_size=3, no_plot=True)
    p = Progress(SimpleNamespace(flags=args, model=cfg), 0, True)
    buf = io.StringIO()
    with redirect_stdout(buf):
        for it in range(1, 5):
            time.sleep(0.05)  # a measurable step time (the line prints whole milliseconds)
            p.step(it, 5.0 - it / 2, 1e-3, 0.5)
    rows = parse_log(buf.getvalue())
    assert [r[0] for r in rows] == [2, 4]
    assert [r[1] for r in rows] == [4.0, 3.0]
    for _, _, ms, tokens, tflops, mfu in rows:
        assert tokens == pytest.approx(3 * cfg.seq_length / (ms / 1000), rel=0.02, abs=2)
        assert tflops == pytest.approx(tokens * train_flops_per_token(cfg) / 1e12, abs=0.006)
        assert mfu == ("n/a" if NGPU == 0 else mfu)


def test_gpu_script_is_valid_bash():
    """The script only runs on a GPU machine: check its syntax (and shellcheck, where installed) here."""
    script = os.path.join(os.path.dirname(CHECKS), "run_gpu_checks.sh")
    res = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


@pytest.mark.slow
def test_gpu_script_dry_run_passes_on_the_cpu():
    """Everything but the GPU itself: the script's Python paths on the CPU (gloo, tiny preset), ~30 s."""
    script = os.path.join(os.path.dirname(CHECKS), "run_gpu_checks.sh")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    res = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, env=env, timeout=600)
    summary = [ln for ln in res.stdout.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))]
    assert res.returncode == 0 and not any(ln.startswith("FAIL") for ln in summary), res.stdout[-4000:]
    passed = {ln.split("  ")[1].strip() for ln in summary if ln.startswith("PASS")}
    assert {"cpu-mode", "spec-parity", "train test tp1", "train test tp2", "train test fused tp1", "output-loss",
            "generate", "grpo"} <= passed, summary

"""The example launchers: bash -n, shellcheck, and the dry-run commands they print (parallel sizes,
batch arithmetic, recipe, seeds, dependencies, launch environment)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".sh", ".sbatch"))


def dry_run(script, *args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(DRY_RUN="1", PYTHON=sys.executable, PYTHONPATH=str(ROOT), **env)
    res = subprocess.run(["bash", str(ROOT / "examples" / script), *args], capture_output=True, text=True, env=full)
    return res.returncode, res.stdout, res.stderr


def commands(out, prog):
    """The printed commands ('+ prog ...') as lists of shell words."""
    import shlex
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith(f"+ {prog} ") or
            line.startswith(f"+ {sys.executable} ") and prog == "python"]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"pretrain_8xmi300x.sh", "pretrain_multinode.sbatch", "stage1_16nodes.sh", "stage2_seeds.sh",
            "merge_seeds.sbatch", "long_context.sh", "sft.sh", "lib.sh"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run installs it)")
    res = subprocess.run(["shellcheck", "-x", *[str(p.relative_to(ROOT)) for p in EXAMPLES]], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("layout, tp, pp, mbs, acc", [("tp1", 1, 1, 4, 32), ("tp2", 2, 1, 8, 32),
                                                       ("pp2", 1, 2, 4, 64)])
def test_single_node_layouts(layout, tp, pp, mbs, acc):
    rc, out, err = dry_run("pretrain_8xmi300x.sh", "--train-iters", "7", LAYOUT=layout)
    assert rc == 0, err
    dp = 8 // (tp * pp)
    assert f"global batch 1024 = micro {mbs} x DP {dp} x {acc} accumulation" in out
    assert mbs * dp * acc == 1024
    [cmd] = commands(out, sys.executable)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node"] and flag(cmd, "--nproc-per-node") == "8"
    assert cmd[cmd.index("--plugin") - 1] == str(ROOT / "pretrain_gpt.py")
    assert (flag(cmd, "--tensor-model-parallel-size"), flag(cmd, "--pipeline-model-parallel-size")) == (str(tp), str(pp))
    assert (flag(cmd, "--micro-batch-size"), flag(cmd, "--global-batch-size")) == (str(mbs), "1024")
    assert flag(cmd, "--instella-recipe") == "stage1" and flag(cmd, "--save") == flag(cmd, "--load")
    assert ("--sequence-parallel" in cmd) == (tp > 1)
    assert "--exit-signal-handler" in cmd and cmd[-2:] == ["--train-iters", "7"]
    assert "GPU_MAX_HW_QUEUES=2" in out and "NCCL_IB_GID_INDEX=3" in out and "platform rocm" in out


def test_single_node_bad_batch_and_nvidia_preset():
    rc, out, err = dry_run("pretrain_8xmi300x.sh", GBS="1000")
    assert rc != 0 and "global batch 1000 is not divisible by micro-batch 4 x DP 8 = 32" in err
    assert not commands(out, sys.executable)
    rc, out, err = dry_run("pretrain_8xmi300x.sh", PLATFORM="nvidia")
    assert rc == 0 and "platform nvidia" in out and "HSA_ENABLE_SDMA" not in out


def test_stage1_16_nodes():
    rc, out, err = dry_run("stage1_16nodes.sh", PARTITION="mi300x")
    assert rc == 0, err
    [sb] = commands(out, "sbatch")
    assert flag(sb, "--nodes") == "16" and flag(sb, "--partition") == "mi300x"
    assert sb[-1].endswith("examples/pretrain_multinode.sbatch")
    [srun] = commands(out, "srun")
    assert "--ntasks-per-node=1" in srun and 'trap "" USR1' in flag(srun, "-c")
    assert flag(srun, "--nnodes") == "16" and flag(srun, "--nproc-per-node") == "8"
    assert flag(srun, "--rdzv-endpoint") == "node001:29500"
    assert "global batch 1024 = micro 4 x DP 128 x 2 accumulation" in out
    assert flag(srun, "--instella-recipe") == "stage1"
    multinode = (ROOT / "examples/pretrain_multinode.sbatch").read_text()
    assert "#SBATCH --signal=USR1@900" in multinode and "#SBATCH --gpus-per-node=8" in multinode


def test_stage2_seed_array_then_merge():
    rc, out, err = dry_run("stage2_seeds.sh")
    assert rc == 0, err
    array, merge = commands(out, "sbatch")
    assert flag(array, "--array") == "0-2" and flag(array, "--nodes") == "16"
    assert flag(merge, "--dependency") == "afterok:<array-job-id>"
    runs = commands(out, "srun")
    assert [flag(c, "--seed") for c in runs] == ["5796", "6198", "8915"]
    saves = [flag(c, "--save") for c in runs]
    assert saves == [f"/shared/instella/runs/stage2/seed_{s}/checkpoints" for s in (5796, 6198, 8915)]
    assert all(flag(c, "--pretrained-checkpoint") == "/shared/instella/runs/stage1/checkpoints" for c in runs)
    [mcmd] = commands(out, sys.executable)
    inputs = mcmd[mcmd.index("--inputs") + 1: mcmd.index("--output")]
    assert inputs == saves and flag(mcmd, "--output") == "/shared/instella/runs/stage2/merged"


@pytest.mark.parametrize("phase, gbs, acc", [("1", 64, 2), ("2", 32, 1)])
def test_long_context_phases(phase, gbs, acc):
    rc, out, err = dry_run("long_context.sh", PHASE=phase)
    assert rc == 0, err
    [srun] = commands(out, "srun")
    assert flag(srun, "--context-parallel-size") == "4" and flag(srun, "--cp-comm-type") == "a2a"
    assert flag(srun, "--instella-recipe") == f"long-phase{phase}"
    assert f"CP 4 x DP 32; global batch {gbs} = micro 1 x DP 32 x {acc} accumulation" in out
    rc, _, err = dry_run("long_context.sh", PHASE="3")
    assert rc == 2 and "PHASE=3" in err


def test_sft():
    rc, out, err = dry_run("sft.sh")
    assert rc == 0, err
    [cmd] = commands(out, sys.executable)
    assert flag(cmd, "--instella-recipe") == "sft" and flag(cmd, "--data-blend") == "sft"
    assert flag(cmd, "--global-batch-size") == "128" and "micro 4 x DP 8 x 4 accumulation" in out
    assert flag(cmd, "--pretrained-checkpoint") == "/shared/instella/runs/stage2/merged"
    assert re.search(r"TORCH_NCCL_HIGH_PRIORITY=1 +\[preset\]", out)

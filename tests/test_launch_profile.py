"""Cluster profiles and layout checks: every bad input is refused with a clear message before anything
is written or submitted."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instella_plugin.launch.profile import (PROFILES_DIR, REQUIRED, Layout, ProfileError, bundled_profiles,
                                            check_layout, load_profile)

ROOT = Path(__file__).resolve().parents[1]


def write_profile(tmp_path, **changes):
    data = yaml.safe_load((PROFILES_DIR / "mi300x-16node.yaml").read_text())
    data.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        data.pop(k)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bundled_profiles_load():
    names = bundled_profiles()
    assert {"local-cpu", "mi300x-16node", "mi300x-1node", "nvidia-h100"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.nodes >= 1 and p.gpus_per_node >= 1 and Path(p.output_root).is_absolute()
    big = load_profile("mi300x-16node")
    assert (big.platform, big.nodes, big.gpus_per_node, big.world_size) == ("rocm", 16, 8, 128)


def test_overrides_and_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTELLA_DATA_ROOT", str(tmp_path / "data"))
    p = load_profile("local-cpu", ["nodes=3", f"output_root={tmp_path}/runs", "env={A: 1}"])
    assert p.nodes == 3 and p.output_root == f"{tmp_path}/runs" and p.env == {"A": "1"}
    assert p.data_root == str(tmp_path / "data")
    assert p.python == sys.executable  # python: null -> the submitting interpreter
    monkeypatch.delenv("INSTELLA_DATA_ROOT")
    assert load_profile("local-cpu").data_root == str(Path("~/.cache/instella/data").expanduser())


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_required_key(tmp_path, key):
    with pytest.raises(ProfileError, match=f"missing required key\\(s\\): {key}"):
        load_profile(write_profile(tmp_path, **{key: None}))


@pytest.mark.parametrize("changes, message", [
    ({"nodes": 0}, "nodes must be a positive integer"),
    ({"gpus_per_node": "eight"}, "gpus_per_node must be a positive integer"),
    ({"time_limit": "two days"}, "is not a Slurm time"),
    ({"platform": "tpu"}, "platform must be rocm, nvidia, cpu or auto"),
    ({"partion": "x"}, "unknown key\\(s\\) partion"),
    ({"container": "rocm/megatron"}, "container must be a mapping with an image key"),
])
def test_bad_values(tmp_path, changes, message):
    with pytest.raises(ProfileError, match=message):
        load_profile(write_profile(tmp_path, **changes))


def test_unknown_profile_lists_bundled():
    with pytest.raises(ProfileError, match="local-cpu"):
        load_profile("no-such-cluster")
    with pytest.raises(ProfileError, match="expected KEY=VALUE"):
        load_profile("local-cpu", ["nodes"])


def test_layout_arithmetic():
    lay = check_layout(Layout(16, 8, tp=1, pp=1, cp=1, micro_batch_size=4, global_batch_size=1024))
    assert (lay.world_size, lay.dp, lay.accumulation) == (128, 128, 2)
    assert "TP 1 x PP 1 x CP 1 x DP 128" in lay.describe()
    assert "global batch 1024 = micro 4 x DP 128 x 2 accumulation" in lay.describe()
    lay = check_layout(Layout(1, 8, tp=2, pp=2, cp=2, micro_batch_size=1, global_batch_size=32))
    assert (lay.dp, lay.accumulation) == (1, 32)


@pytest.mark.parametrize("layout, message", [
    (Layout(3, 8, tp=1, pp=16), "3 x 8 = 24 is not divisible by TP x PP x CP = 1 x 16 x 1 = 16"),
    (Layout(2, 8, tp=4, cp=4), "TP x CP = 4 x 4 = 16 is larger than the 8 GPUs of one node"),
    (Layout(2, 8, tp=2, micro_batch_size=4, global_batch_size=100),
     "global batch 100 is not divisible by micro-batch 4 x DP 8 = 32"),
    (Layout(1, 8, tp=0), "tp must be a positive integer"),
])
def test_layout_errors(layout, message):
    with pytest.raises(ProfileError, match=message.replace("(", "\\(").replace(")", "\\)")):
        check_layout(layout)


@pytest.mark.parametrize("extra, message", [
    (["--set", "nodes=3", "--pp", "16"], "is not divisible by TP x PP x CP"),
    (["--tp", "8", "--cp", "2"], "TP x CP = 8 x 2 = 16 is larger than the 2 GPUs"),
    (["--micro-batch-size", "3", "--global-batch-size", "16"], "global batch 16 is not divisible by micro-batch 3"),
    (["--set", "time_limit="], "missing required key(s): time_limit"),
])
def test_submit_refuses_before_writing_or_submitting(tmp_path, extra, message):
    """The CLI exits 2 with the message; no run directory, no sbatch call (a stub would record one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho called >> {tmp_path}/sbatch_calls\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    if "--tp" in extra:
        extra = ["--set", "gpus_per_node=2"] + extra + ["--set", "nodes=8"]
    cmd = [sys.executable, "-m", "instella_plugin.cli", "submit", "--recipe", "tiny-cpu", "--profile", "local-cpu",
           "--blend", "tiny", "--set", f"output_root={tmp_path}/runs", *extra]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "instella submit: error:" in res.stderr and message in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "sbatch_calls").exists()

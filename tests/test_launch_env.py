"""Launch environment presets: the MI300X variables AMD's launchers set, precedence, detection, export."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from instella_plugin.launch import env as launch_env

# Independent reference: the MI300X launch environment listed in shared/MEGATRON-NOTES.md (Primus).
PRIMUS_MI300X = {
    "GPU_MAX_HW_QUEUES": "2", "HSA_ENABLE_SDMA": "1", "HSA_NO_SCRATCH_RECLAIM": "1",
    "TORCH_NCCL_HIGH_PRIORITY": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_IB_GID_INDEX": "3",
    "NCCL_CROSS_NIC": "0", "NCCL_CHECKS_DISABLE": "1", "RCCL_MSCCL_ENABLE": "0",
    "NVTE_CK_USES_BWD_V3": "1", "NVTE_USE_CAST_TRANSPOSE_TRITON": "1",
}
PRIMUS_DETERMINISTIC = {"NCCL_ALGO": "Ring", "ROCBLAS_DEFAULT_ATOMICS_MODE": "0"}


def rows(platform, **kw):
    return {r.name: r for r in launch_env.resolve_env_preset(platform, environ=kw.pop("environ", {}),
                                                            detect=False, **kw)}


def test_rocm_preset_is_amds_list_with_reasons():
    r = rows("rocm")
    got = {k: v.value for k, v in r.items() if v.source == "preset" and k != "PYTHONUNBUFFERED"}
    assert got == PRIMUS_MI300X
    det = {k: v.value for k, v in rows("rocm", deterministic=True).items() if v.source == "deterministic"}
    assert det == PRIMUS_DETERMINISTIC
    for platform in launch_env.PLATFORMS:
        for row in launch_env.resolve_env_preset(platform, environ={}, deterministic=True, detect=False):
            assert row.reason and "\n" not in row.reason and len(row.reason) < 130, row


def test_nvidia_preset_has_no_rocm_variables():
    r = rows("nvidia")
    assert r["CUDA_DEVICE_MAX_CONNECTIONS"].value == "1"
    assert not [k for k in r if k.startswith(("HSA_", "RCCL_", "GPU_MAX", "NVTE_CK"))]
    assert rows("nvidia", deterministic=True)["CUBLAS_WORKSPACE_CONFIG"].value == ":4096:8"


def test_precedence_override_then_environment_then_preset():
    environ = {"HSA_ENABLE_SDMA": "0", "NCCL_IB_GID_INDEX": "3"}
    lines = []
    got = launch_env.apply_env_preset("rocm", environ=environ, overrides={"GPU_MAX_HW_QUEUES": "4", "MY_VAR": "x"},
                                      log=lines.append)
    assert got["HSA_ENABLE_SDMA"] == "0" and environ["HSA_ENABLE_SDMA"] == "0"      # user's export kept
    assert got["GPU_MAX_HW_QUEUES"] == "4" and environ["GPU_MAX_HW_QUEUES"] == "4"  # explicit override
    assert got["MY_VAR"] == "x"
    assert environ["RCCL_MSCCL_ENABLE"] == "0"                                      # preset filled in
    table = lines[0]
    assert "platform rocm" in table
    assert "HSA_ENABLE_SDMA=0" in table and "[environment]" in table
    assert "GPU_MAX_HW_QUEUES=4" in table and "[override]" in table
    gid_line = [line for line in table.splitlines() if "NCCL_IB_GID_INDEX=3" in line]
    assert len(gid_line) == 1 and "[preset]" in gid_line[0]   # same value as the preset: not an override


def test_detect_platform(monkeypatch):
    assert launch_env.detect_platform({"INSTELLA_PLATFORM": "nvidia"}) == "nvidia"
    with pytest.raises(ValueError, match="INSTELLA_PLATFORM='tpu'"):
        launch_env.detect_platform({"INSTELLA_PLATFORM": "tpu"})
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True),
                                 version=types.SimpleNamespace(hip="6.2"))
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert launch_env.detect_platform({}) == "rocm"
    fake.version.hip = None
    assert launch_env.detect_platform({}) == "nvidia"
    fake.cuda.is_available = lambda: False
    assert launch_env.detect_platform({}) == "cpu"


def test_network_detection(tmp_path):
    route = tmp_path / "route"
    route.write_text("Iface\tDestination\tGateway\n"
                     "ib0\t000200C0\t00000000\n"
                     "ens5\t00000000\t010200C0\n")
    assert launch_env.default_route_interface(str(route)) == "ens5"
    assert launch_env.default_route_interface(str(tmp_path / "none")) is None
    ib = tmp_path / "ib"
    ib.mkdir()
    for name in ("rdma1", "rdma0"):
        (ib / name).mkdir()
    assert launch_env.rdma_devices(str(ib)) == "rdma0,rdma1"
    assert launch_env.rdma_devices(str(tmp_path / "missing")) is None


def test_shell_export_keeps_values_already_set():
    script = ('eval "$("$PY" -m instella_plugin.launch.env --platform rocm --format export)"; '
              'echo "$HSA_ENABLE_SDMA $GPU_MAX_HW_QUEUES $RCCL_MSCCL_ENABLE"')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "HSA_ENABLE_SDMA": "0", "PY": sys.executable,
                              "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.split() == ["0", "2", "0"]

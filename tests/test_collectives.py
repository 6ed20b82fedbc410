"""Host-side reductions run on the device the process group's backend needs (NCCL: GPU, gloo: CPU)."""
import os

import pytest
import torch

from instella_plugin.training import collectives


@pytest.fixture
def gloo_world_of_one(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29000 + os.getpid() % 1000))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_reductions_return_new_cpu_tensors(gloo_world_of_one):
    assert collectives.collective_device() == torch.device("cpu")
    t = torch.tensor([1.5, 2.0], dtype=torch.float64)
    out = collectives.all_reduce_host(t, op=torch.distributed.ReduceOp.MAX)
    assert out.device.type == "cpu" and out.tolist() == [1.5, 2.0] and out.data_ptr() != t.data_ptr()
    assert collectives.broadcast_host(t, src=0).tolist() == [1.5, 2.0]


def test_nccl_groups_reduce_on_the_current_gpu(monkeypatch, gloo_world_of_one):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.collective_device() == torch.device("cuda", 3)


def test_without_a_process_group_the_value_comes_back():
    assert not torch.distributed.is_initialized()
    t = torch.tensor([4.0])
    assert collectives.all_reduce_host(t).tolist() == [4.0]

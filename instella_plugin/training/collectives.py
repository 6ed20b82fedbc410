"""Reductions of small host-side numbers (loss sums, stop flags, metric totals) across ranks.

NCCL reduces only GPU tensors and gloo only CPU ones, so each reduction runs on the device the
group's backend needs and hands back a CPU tensor.
"""
import torch


def collective_device(group=None) -> torch.device:
    """Where a tensor must live for a collective on ``group``: the current GPU under NCCL, else the CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(t: torch.Tensor, op=torch.distributed.ReduceOp.SUM, group=None) -> torch.Tensor:
    """``t`` reduced over ``group`` (every rank when None), as a new CPU tensor; ``t`` itself is unchanged."""
    if not torch.distributed.is_initialized():
        return t.clone().cpu()
    x = t.to(collective_device(group), copy=True)
    torch.distributed.all_reduce(x, op=op, group=group)
    return x.cpu()


def broadcast_host(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """``t`` of global rank ``src``, on every rank of ``group``, as a new CPU tensor."""
    if not torch.distributed.is_initialized():
        return t.clone().cpu()
    x = t.to(collective_device(group), copy=True)
    torch.distributed.broadcast(x, src=src, group=group)
    return x.cpu()

"""Instella's QK-norm: one RMSNorm over the *full* projected width of q (and of k), before RoPE.

megatron-core's ``qk_layernorm`` normalises each head separately (over head_dim); Instella
normalises all heads together (over 2560). This module plugs into ``SelfAttentionSubmodules`` as
``q_layernorm`` / ``k_layernorm``: megatron builds it with ``hidden_size=head_dim`` and calls it on
``[sq, b, heads_local, head_dim]`` before RoPE.

Under tensor parallelism each rank holds ``heads/tp`` heads, so the sum of squares is all-reduced
over the TP group. The reduction is autograd-aware both ways (forward all-reduce, backward
all-reduce), built from megatron's own mappings. The weight is sharded like the heads it scales
(TP axis 0) and checkpointed as a TP-sharded tensor, so the global tensor is the full-width vector
of the Hugging Face checkpoint.

``config.qk_layernorm`` must stay False: megatron's ``finalize_model_grads`` would otherwise sum
these (sharded) weight gradients over TP as if they were replicated per-head norms. For the same
reason the weight never carries the ``sequence_parallel`` mark.
"""
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


def all_reduce_sum_autograd(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group with a gradient that is also summed (megatron's mappings composed)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x
    return reduce_from_tensor_model_parallel_region(copy_to_tensor_model_parallel_region(x))


class FullWidthQKNorm(torch.nn.Module):
    """RMSNorm over all (local) heads of q or k jointly; ``which`` is "q" or "k"."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, which: str = "q"):
        super().__init__()
        if which not in ("q", "k"):
            raise ValueError(f"FullWidthQKNorm(which={which!r}): expected 'q' or 'k'")
        if getattr(config, "qk_layernorm", False):
            raise ValueError("full-width QK-norm needs config.qk_layernorm=False (megatron would all-reduce the "
                             "grads of its TP-sharded weights as if replicated); the spec supplies the norm")
        heads = config.num_attention_heads if which == "q" else config.num_query_groups
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.head_dim = hidden_size
        self.global_width = heads * hidden_size
        self.local_width = self.global_width // tp
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.local_width, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [sq, b, heads_local, head_dim] -> flat [sq, b, heads_local * head_dim]
        shape = x.shape
        flat = x.reshape(*shape[:-2], shape[-2] * shape[-1])
        x32 = flat.float()
        sum_sq = all_reduce_sum_autograd(x32.pow(2).sum(-1, keepdim=True))
        normed = x32 * torch.rsqrt(sum_sq / self.global_width + self.eps)
        return (self.weight * normed.to(x.dtype)).reshape(shape)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)

    def extra_repr(self) -> str:
        return f"local {self.local_width} of {self.global_width}, eps={self.eps}"

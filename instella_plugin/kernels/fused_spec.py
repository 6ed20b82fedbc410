"""The ``instella-fused`` layer spec: the ``instella`` (local) spec with the fused kernels.

Same layer shape, parameter names and checkpoints as ``instella``; RMSNorm, full-width QK-norm
with RoPE, and SwiGLU run as ``torch.ops.instella`` kernels (native where built, PyTorch otherwise).
Selected by name like the other specs (``--spec instella-fused``): the package declares it in the
``instella_layer_specs`` entry-point group; ``register()`` adds it from code.
"""
from typing import Optional

from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from instella_plugin.model import specs

NAME = "instella-fused"


def instella_fused_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from instella_plugin.kernels.modules import FusedQKNormRope, FusedRMSNorm, FusedRopeSelfAttention, FusedSwiGLUMLP
    from instella_plugin.model.packed_attention import InstellaDotProductAttention

    layer = specs.instella_layer_spec(column_linear=ColumnParallelLinear, row_linear=RowParallelLinear,
                                      core_attention=InstellaDotProductAttention, norm=FusedRMSNorm,
                                      qk_norm=FusedQKNormRope, mlp_module=FusedSwiGLUMLP)
    # instella_layer_spec fixes the attention class; swap in the one that hands RoPE to the q/k norms.
    layer.submodules.self_attention.module = FusedRopeSelfAttention
    return specs.block_spec(layer, config, vp_stage, final_norm=FusedRMSNorm)


def register() -> None:
    """Make ``instella-fused`` known to this process's spec registry (the entry point does it too)."""
    specs.register_spec(NAME, instella_fused_spec)

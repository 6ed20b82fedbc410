"""The ``instella-fused`` layer specs: the ``instella`` (local) spec with the fused kernels.

Same layer shape, parameter names and checkpoints as ``instella``; RMSNorm, full-width QK-norm
with RoPE, and SwiGLU run as ``torch.ops.instella`` kernels (native where built, PyTorch otherwise).
``instella-fused-apex`` and ``instella-fused-te`` take their RMSNorms (not the QK-norm, which is
fused with RoPE) from apex or Transformer Engine instead: see ``vendor_norms``.
Selected by name like the other specs (``--spec instella-fused``): the package declares them in the
``instella_layer_specs`` entry-point group; ``register()`` adds them from code.
"""
import logging
import sys
from typing import Optional

from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from instella_plugin.model import specs

NAME = "instella-fused"


class _MLPSubclassNotice(logging.Filter):
    """megatron's TransformerLayer hands its TP group only to exactly ``MLP`` and warns "Unknown MLP
    type ... default kwargs" for anything else, once per layer. For a subclass of ``MLP`` (ours:
    ``FusedSwiGLUMLP``) the default is the group ``MLP`` would get anyway, so that one warning is
    dropped; for any other MLP type it still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Unknown MLP type"):
            return True
        frame = sys._getframe()
        while frame is not None:  # the TransformerLayer.__init__ that is logging: its submodules.mlp
            sub = frame.f_locals.get("submodules") if frame.f_code.co_name == "__init__" else None
            if sub is not None and hasattr(sub, "mlp"):
                module = getattr(sub.mlp, "module", None)
                return not (isinstance(module, type) and issubclass(module, MLP))
            frame = frame.f_back
        return True


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_MLPSubclassNotice())


def _fused_spec(config, vp_stage, norm) -> TransformerBlockSubmodules:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from instella_plugin.kernels.modules import FusedQKNormRope, FusedRopeSelfAttention, FusedSwiGLUMLP
    from instella_plugin.model.packed_attention import InstellaDotProductAttention

    layer = specs.instella_layer_spec(column_linear=ColumnParallelLinear, row_linear=RowParallelLinear,
                                      core_attention=InstellaDotProductAttention, norm=norm,
                                      qk_norm=FusedQKNormRope, mlp_module=FusedSwiGLUMLP)
    # instella_layer_spec fixes the attention class; swap in the one that hands RoPE to the q/k norms.
    layer.submodules.self_attention.module = FusedRopeSelfAttention
    return specs.block_spec(layer, config, vp_stage, final_norm=norm)


def instella_fused_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    from instella_plugin.kernels.modules import FusedRMSNorm

    return _fused_spec(config, vp_stage, FusedRMSNorm)


def instella_fused_apex_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    from instella_plugin.kernels.vendor_norms import ApexRMSNorm, apex_rms_norm_fn

    apex_rms_norm_fn()  # fail here, before any module is built, when apex is missing
    return _fused_spec(config, vp_stage, ApexRMSNorm)


def instella_fused_te_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    from instella_plugin.kernels.vendor_norms import TERMSNorm, te_rms_norm_class

    te_rms_norm_class()
    return _fused_spec(config, vp_stage, TERMSNorm)


def register() -> None:
    """Make the fused specs known to this process's spec registry (the entry points do it too)."""
    specs.register_spec(NAME, instella_fused_spec)
    specs.register_spec(NAME + "-apex", instella_fused_apex_spec)
    specs.register_spec(NAME + "-te", instella_fused_te_spec)

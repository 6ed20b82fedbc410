"""The ``instella-fused`` layer specs: providers for the Instella layout that run the fused kernels.

Same layer shape, parameter names and checkpoints as ``instella``; RMSNorm, full-width QK-norm
with RoPE, and SwiGLU run as ``torch.ops.instella`` kernels (native where built, PyTorch otherwise).
``instella-fused-apex`` and ``instella-fused-te`` take their RMSNorms (not the QK-norm, which is
fused with RoPE) from apex or Transformer Engine instead: see ``vendor_norms``.
Selected by name like the other specs (``--spec instella-fused``): the spec registry names these
providers; ``register()`` adds them again from code.
"""
from instella_plugin.kernels.modules import FusedQKNormRope, FusedRMSNorm, FusedRopeSelfAttention, FusedSwiGLUMLP
from instella_plugin.kernels.vendor_norms import ApexRMSNorm, TERMSNorm, apex_rms_norm_fn, te_rms_norm_class
from instella_plugin.model import specs

NAME = "instella-fused"


class FusedProvider(specs.InstellaLocalProvider):
    """megatron's local linears and Instella's attention; norms, QK-norm + RoPE and SwiGLU fused (the
    attention hands its RoPE angles to the q/k norms)."""

    norm_class = FusedRMSNorm

    def layer_norm(self, rms_norm: bool = True, for_qk: bool = False) -> type:
        return FusedQKNormRope if for_qk else self.norm_class

    def self_attention(self) -> type:
        return FusedRopeSelfAttention

    def mlp(self) -> type:
        return FusedSwiGLUMLP


class FusedApexProvider(FusedProvider):
    norm_class = ApexRMSNorm

    def __init__(self):
        apex_rms_norm_fn()  # fail here, before any module is built, when apex is missing


class FusedTEProvider(FusedProvider):
    norm_class = TERMSNorm

    def __init__(self):
        te_rms_norm_class()


def register() -> None:
    """Make the fused specs known to this process's spec registry (the registry names them too)."""
    specs.register_spec(NAME, FusedProvider)
    specs.register_spec(NAME + "-apex", FusedApexProvider)
    specs.register_spec(NAME + "-te", FusedTEProvider)

"""Megatron spec modules that run the fused kernels; drop-in subclasses of the ``instella`` spec's.

- ``FusedRMSNorm``: ``InstellaRMSNorm`` computed by ``instella::rms_norm``.
- ``FusedQKNormRope``: ``FullWidthQKNorm`` that, when its attention hands it the RoPE angles,
  normalises over the full (local) width and applies RoPE in one kernel; under tensor parallelism
  it runs the split form (local sum of squares, megatron's autograd-aware all-reduce, apply).
- ``FusedRopeSelfAttention``: megatron ``SelfAttention`` that gives the angles to its q/k norms and
  skips its own RoPE, in the cases the fused kernel covers (rotate-half, full rotary dim, no YaRN
  scale, no THD packing, no inference cache); otherwise it is plain ``SelfAttention``.
- ``FusedSwiGLUMLP``: megatron ``MLP`` whose gated activation is ``instella::swiglu_fwd``.
Parameter names, shapes, sharding and checkpoints are those of the modules they replace.
"""
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config as rope_mscale,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP

from instella_plugin import kernels as K
from instella_plugin.model.full_width_qk_norm import FullWidthQKNorm, all_reduce_sum_autograd
from instella_plugin.model.rms_norm import InstellaRMSNorm


class FusedRMSNorm(InstellaRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps)


class FusedQKNormRope(FullWidthQKNorm):
    """Full-width QK-norm; also applies RoPE when ``rope_freqs`` ([s, 1, 1, head_dim]) is set."""

    rope_freqs = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = self.rope_freqs
        if freqs is None:
            return super().forward(x)
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return K.qk_norm_rope(x, self.weight, freqs, self.eps)
        return K.qk_norm_rope_tp(x, self.weight, freqs, self.global_width, all_reduce_sum_autograd, self.eps)


class FusedRopeSelfAttention(SelfAttention):
    """SelfAttention whose RoPE is fused into the q/k norms (``FusedQKNormRope``)."""

    def _fusable(self, rotary_pos_emb, packed_seq_params, inference_context) -> bool:
        cfg = self.config
        return (rotary_pos_emb is not None and inference_context is None
                and isinstance(self.q_layernorm, FusedQKNormRope) and isinstance(self.k_layernorm, FusedQKNormRope)
                and (packed_seq_params is None or getattr(packed_seq_params, "qkv_format", None) != "thd")
                and not cfg.rotary_interleaved and not getattr(cfg, "multi_latent_attention", False)
                and rope_mscale(cfg) == 1.0
                and not (cfg.no_rope_freq and cfg.no_rope_freq[self.layer_number - 1]))

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, packed_seq_params=None, **kwargs):
        if not self._fusable(rotary_pos_emb, packed_seq_params, inference_context):
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, *args, packed_seq_params=packed_seq_params, **kwargs)
        q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        if q_freqs.shape[-1] != self.hidden_size_per_attention_head:
            raise ValueError(f"instella-fused: RoPE angles cover {q_freqs.shape[-1]} of head_dim "
                             f"{self.hidden_size_per_attention_head}; the fused kernel needs rotary_percent=1.0")
        self.q_layernorm.rope_freqs, self.k_layernorm.rope_freqs = q_freqs, k_freqs
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   None, *args, packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self.q_layernorm.rope_freqs = self.k_layernorm.rope_freqs = None


class FusedSwiGLUMLP(MLP):
    """MLP with the fused SwiGLU; other activations, biases or per-token scales use megatron's path."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        cfg = self.config
        if not (cfg.gated_linear_unit and cfg.activation_func is F.silu and per_token_scale is None
                and not cfg.use_te_activation_func and cfg.activation_func_clamp_value is None
                and cfg.glu_linear_offset == 0.0):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(K.swiglu(intermediate))

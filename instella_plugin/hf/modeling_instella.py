"""``InstellaForCausalLM`` for transformers 5.24 (no remote code): the Instella network of INSTELLA.md.

Pre-norm decoder: ``x + Attn(RMSNorm(x))``, ``x + MLP(RMSNorm(x))``, final RMSNorm, untied LM head.
Attention is plain MHA (or GQA if the config says so) with one RMSNorm over the *full* projected
width of q and of k, applied before the head split and before RoPE (rotate-half, fp32 tables).
RMSNorm casts to fp32, normalises, casts back, then scales by the weight. SwiGLU MLP:
``down(silu(gate(x)) * up(x))``. No biases, no dropout at inference.

Tensor names are the official ones: ``model.layers.{i}.pre_attention_layernorm.weight``,
``self_attn.{q,k,v,o}_proj.weight``, ``self_attn.{q,k}_norm.weight``,
``pre_feedforward_layernorm.weight``, ``mlp.{gate,up,down}_proj.weight``, ``model.embed_tokens``,
``model.norm``, ``lm_head``. The KV cache, padding masks and the attention backends (eager, sdpa)
come from transformers' own utilities.
"""
from typing import Callable, Optional

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from instella_plugin.hf.configuration_instella import InstellaConfig


class InstellaRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return x32.to(dtype) * self.weight


class InstellaRotaryEmbedding(nn.Module):
    """cos/sin tables [b, s, head_dim] in fp32 for the given positions (non-interleaved RoPE).

    ``rope_parameters["rope_type"]`` other than ``default`` (a context-extension method: linear, yarn, ...)
    takes its inverse frequencies and attention factor from transformers' ``ROPE_INIT_FUNCTIONS``; the
    factor multiplies cos and sin (YaRN's; 1.0 for the others, so plain RoPE is unchanged)."""

    def __init__(self, config: InstellaConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init = (self.compute_default_rope_parameters if self.rope_type == "default"
                else ROPE_INIT_FUNCTIONS[self.rope_type])
        inv_freq, self.attention_scaling = init(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: InstellaConfig, **kwargs):
        dim = config.hidden_size // config.num_attention_heads
        base = float(config.rope_parameters["rope_theta"])
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update  # rope types whose frequencies depend on the input length (dynamic, longrope)
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling  # x 1.0 is exact


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d]; cos/sin [b, s, d] fp32; the rotation is computed in fp32."""
    x32 = x.float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


def eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Reference attention: q/k/v [b, heads, s, d] (k/v repeated for GQA); returns [b, s, heads, d]."""
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class InstellaAttention(nn.Module):
    def __init__(self, config: InstellaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        q_width, kv_width = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=False)
        self.q_norm = InstellaRMSNorm(q_width, config.rms_norm_eps)  # full width, before the head split
        self.k_norm = InstellaRMSNorm(kv_width, config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, position_embeddings, attention_mask, cache: Optional[Cache] = None, **kwargs):
        b, s, _ = hidden_states.shape
        q = self.q_norm(self.q_proj(hidden_states)).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states)).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                 dropout=self.config.attention_dropout if self.training else 0.0, **kwargs)
        return self.o_proj(out.reshape(b, s, -1).contiguous()), weights


class InstellaMLP(nn.Module):
    def __init__(self, config: InstellaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class InstellaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: InstellaConfig, layer_idx: int):
        super().__init__()
        self.pre_attention_layernorm = InstellaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = InstellaAttention(config, layer_idx)
        self.pre_feedforward_layernorm = InstellaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = InstellaMLP(config)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        attn, _ = self.self_attn(self.pre_attention_layernorm(hidden_states), position_embeddings,
                                 attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.pre_feedforward_layernorm(hidden_states))


class InstellaPreTrainedModel(PreTrainedModel):
    config_class = InstellaConfig
    config: InstellaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InstellaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class InstellaModel(InstellaPreTrainedModel):
    def __init__(self, config: InstellaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([InstellaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = InstellaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = InstellaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Optional[Cache] = None,
                inputs_embeds=None, use_cache: Optional[bool] = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                                  position_ids=position_ids, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class InstellaForCausalLM(InstellaPreTrainedModel, GenerationMixin):
    def __init__(self, config: InstellaConfig):
        super().__init__(config)
        self.model = InstellaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Optional[Cache] = None,
                inputs_embeds=None, labels=None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


__all__ = ["InstellaForCausalLM", "InstellaModel", "InstellaPreTrainedModel"]

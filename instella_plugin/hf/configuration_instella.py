"""``InstellaConfig`` for transformers: the config.json keys of the official Instella checkpoints.

Keys (INSTELLA.md): hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, max_position_embeddings, vocab_size (the padded 50304), rms_norm_eps,
rope_theta, tie_word_embeddings (false), bos/eos 0, pad 1, hidden_act silu. transformers 5.24 reads
the RoPE base from ``rope_parameters``; a legacy top-level ``rope_theta`` (the official files) is
folded into it on load, and both are written on save so older readers find it too. A
context-extension method is a ``rope_parameters`` rope type of transformers' ``ROPE_INIT_FUNCTIONS``
(linear, yarn, ...; what ``instella convert`` writes for ``--rope-scaling``); a rope type transformers
does not define is refused when the config is built.

This is the Hugging Face class; ``instella_plugin.model.config.InstellaConfig`` is the plugin's own
dataclass. ``to_plugin_config`` / ``from_plugin_config`` translate between them.
"""
from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

from instella_plugin.model.config import InstellaConfig as PluginConfig


@strict
class InstellaConfig(PreTrainedConfig):
    model_type = "instella"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 50304
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)  # folds a legacy top-level rope_theta into rope_parameters
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"config rope_parameters has rope_type {rope_type!r}, which transformers does not "
                             f"define; use 'default' or one of {', '.join(ROPE_INIT_FUNCTIONS)}")

    @property
    def rope_base(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    def to_dict(self):
        out = super().to_dict()
        out["rope_theta"] = self.rope_base  # for readers that predate rope_parameters
        return out

    # ---- plugin dataclass <-> HF config --------------------------------------------------------------
    def to_plugin_config(self, tokenizer_vocab: int = 50280) -> PluginConfig:
        return PluginConfig(
            num_layers=self.num_hidden_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, num_query_groups=self.num_key_value_heads,
            ffn_hidden_size=self.intermediate_size, vocab_size=min(tokenizer_vocab, self.vocab_size),
            padded_vocab_size=self.vocab_size, seq_length=self.max_position_embeddings,
            rotary_base=self.rope_base, norm_epsilon=self.rms_norm_eps, preset="hf")

    @classmethod
    def from_plugin_config(cls, cfg, *, rope_theta=None, max_position_embeddings=None, dtype=None,
                           rope_parameters=None):
        """``rope_parameters``: a context-extension method's (``RopeScaling.hf_rope_parameters``); default RoPE
        at ``rope_theta`` (else the config's base) when None."""
        return cls(
            vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups, rms_norm_eps=cfg.norm_epsilon,
            max_position_embeddings=int(max_position_embeddings or cfg.seq_length),
            rope_parameters=dict(rope_parameters) if rope_parameters else {
                "rope_type": "default", "rope_theta": float(rope_theta or cfg.rotary_base)},
            architectures=["InstellaForCausalLM"], dtype=dtype)


__all__ = ["InstellaConfig"]

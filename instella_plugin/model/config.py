"""Instella model configuration: one dataclass, named presets, and the megatron TransformerConfig it builds.

The parameter count comes from the dataclass alone (no model is built). Validation happens here,
before anything expensive, so a bad layout fails with the fix in the message.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from instella_plugin import cpu_mode


@dataclass(frozen=True)
class InstellaConfig:
    num_layers: int = 36
    hidden_size: int = 2560
    num_attention_heads: int = 32
    num_query_groups: int = 32
    ffn_hidden_size: int = 6912
    vocab_size: int = 50280  # tokenizer ids
    padded_vocab_size: int = 50304  # embedding / LM head rows, the same at every TP size
    seq_length: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    preset: str = "instella-3b"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_width(self) -> int:
        return self.num_query_groups * self.head_dim

    def num_parameters(self) -> int:
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.padded_vocab_size
        attention = h * (h + 2 * self.kv_width) + h * h  # fused qkv + output projection
        mlp = 3 * h * f  # gate, up, down
        norms = 2 * h + h + self.kv_width  # two pre-norms + full-width q and k norms
        return 2 * v * h + self.num_layers * (attention + mlp + norms) + h

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InstellaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Instella config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides) -> "InstellaConfig":
        return dataclasses.replace(self, **overrides)

    # ---- validation -------------------------------------------------------------------------
    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 virtual_pipeline: Optional[int] = None, context_parallel: int = 1) -> None:
        errors = []
        if self.hidden_size % self.num_attention_heads:
            errors.append(f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} heads; "
                          "choose a hidden size that is a multiple of the head count")
        if self.num_attention_heads % self.num_query_groups:
            errors.append(f"{self.num_attention_heads} heads do not split into {self.num_query_groups} KV groups")
        tp = tensor_parallel
        for what, n in (("attention heads", self.num_attention_heads),
                        ("KV heads (query groups)", self.num_query_groups),
                        ("FFN hidden size", self.ffn_hidden_size),
                        ("padded vocabulary", self.padded_vocab_size)):
            if n % tp:
                errors.append(f"{what} ({n}) is not divisible by --tensor-model-parallel-size {tp}; "
                              f"use a TP size that divides {n}")
        if self.padded_vocab_size < self.vocab_size:
            errors.append(f"padded vocab {self.padded_vocab_size} is smaller than the tokenizer's {self.vocab_size}")
        stages = pipeline_parallel * (virtual_pipeline or 1)
        if self.num_layers % stages:
            errors.append(f"{self.num_layers} layers do not split evenly over {pipeline_parallel} pipeline stages"
                          f" x {virtual_pipeline or 1} virtual stages; pick sizes whose product divides the layers")
        if context_parallel > 1 and (self.num_attention_heads // tp) % context_parallel:
            errors.append(f"{self.num_attention_heads // tp} heads per TP rank are not divisible by "
                          f"--context-parallel-size {context_parallel} (a2a shards heads)")
        if errors:
            raise ValueError("invalid Instella model layout:\n  - " + "\n  - ".join(errors))

    # ---- megatron -----------------------------------------------------------------------------
    def transformer_config(self, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                           virtual_pipeline: Optional[int] = None, context_parallel: int = 1,
                           sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                           cpu: bool = False, **extra):
        """The megatron-core TransformerConfig for this model (qk_layernorm stays off: see qk_norm.py)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.validate(tensor_parallel, pipeline_parallel, virtual_pipeline, context_parallel)
        kwargs = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.head_dim,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            qk_layernorm=False,
            rotary_interleaved=False,
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline,
            context_parallel_size=context_parallel,
            sequence_parallel=sequence_parallel and tensor_parallel > 1,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            pipeline_dtype=params_dtype,
            perform_initialization=False,  # the mitchell init is applied by init.py, layout-independently
        )
        if cpu or cpu_mode.is_enabled():
            kwargs.update(cpu_mode.cpu_safe_config_overrides())
        kwargs.update(extra)
        return TransformerConfig(**kwargs)


# ---- presets -------------------------------------------------------------------------------------
def instella_3b() -> InstellaConfig:
    return InstellaConfig()


def instella_1b() -> InstellaConfig:
    """A ~1.2B sibling for throughput checks on one GPU (same head_dim 80)."""
    return InstellaConfig(num_layers=20, hidden_size=1920, num_attention_heads=24, num_query_groups=24,
                          ffn_hidden_size=5184, preset="instella-1b")


def instella_tiny() -> InstellaConfig:
    """Demo size: hidden 320 = 4 heads of 80 (Instella's odd head size), real tokenizer vocabulary."""
    return InstellaConfig(num_layers=4, hidden_size=320, num_attention_heads=4, num_query_groups=4,
                          ffn_hidden_size=864, seq_length=256, preset="instella-tiny")


def instella_test() -> InstellaConfig:
    """Unit-test size: 4 layers (so PP=2 x VPP=2 works), 4 heads of 80, small vocabulary."""
    return InstellaConfig(num_layers=4, hidden_size=320, num_attention_heads=4, num_query_groups=4,
                          ffn_hidden_size=432, vocab_size=500, padded_vocab_size=512, seq_length=64,
                          preset="instella-test")


PRESETS = {
    "instella-3b": instella_3b,
    "instella-1b": instella_1b,
    "instella-tiny": instella_tiny,
    "instella-test": instella_test,
}


def get_preset(name: str, **overrides) -> InstellaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]().replace(**overrides) if overrides else PRESETS[name]()

"""The two Hugging Face layouts an Instella model is written in, and reading either back.

``instella``: official tensor names and config keys (``model_type: "instella"``).
``olmoe``: the public OLMoE-1B-7B-0924 layout with one expert, which stock transformers, vLLM and
lm-eval load without custom code: ``input_layernorm`` / ``post_attention_layernorm`` are the two
pre-norms, ``mlp.experts.0.{gate,up,down}_proj.weight`` the MLP, and ``mlp.gate.weight`` a [1, hidden]
router of zeros (one expert: its routing weight is softmax over one logit = 1.0). OlmoeConfig's
defaults (eos 50279, 64 experts, top-8) are overridden: eos 0, bos 0, pad 1, one expert, top-1.

Every name is translated through the Instella one (``weight_map.hf_names``), so the rest of the
package deals with Instella names only.
"""
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from instella_plugin.hf.rope_parameters import export_fields, rope_from_config
from instella_plugin.hf.safetensors_io import SafetensorsDir
from instella_plugin.model.config import InstellaConfig
from instella_plugin.model.weight_map import hf_names, hf_shapes
from instella_plugin.rope.methods import RopeScaling

FORMATS = ("instella", "olmoe")
TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
_OLMOE_LAYER = {
    "pre_attention_layernorm.weight": "input_layernorm.weight",
    "pre_feedforward_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.experts.0.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.experts.0.up_proj.weight",
    "mlp.down_proj.weight": "mlp.experts.0.down_proj.weight",
}
ROUTER = "mlp.gate.weight"


class CheckpointMismatch(ValueError):
    """The weights do not match the model configuration (or each other)."""


def file_name(instella_name: str, fmt: str) -> str:
    """The on-disk name of an Instella tensor in format ``fmt``."""
    if fmt == "instella" or not instella_name.startswith("model.layers."):
        return instella_name
    _, _, i, suffix = instella_name.split(".", 3)
    return f"model.layers.{i}.{_OLMOE_LAYER.get(suffix, suffix)}"


def export_plan(cfg: InstellaConfig, fmt: str, dtype: torch.dtype) -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    """(on-disk name, shape, dtype) of every tensor, in the order they are produced."""
    shapes, plan = hf_shapes(cfg), []
    for name in hf_names(cfg):
        plan.append((file_name(name, fmt), shapes[name], dtype))
        if fmt == "olmoe" and name.endswith("mlp.down_proj.weight"):
            plan.append((name.rsplit(".", 3)[0] + "." + ROUTER, (1, cfg.hidden_size), dtype))
    return plan


def config_json(cfg: InstellaConfig, fmt: str, *, rope_theta: float, max_positions: int, dtype: torch.dtype,
                rope_scaling: Optional[RopeScaling] = None) -> dict:
    """config.json for ``fmt``; RoPE theta both where transformers 5.24 reads it and at the top level, and a
    context-extension method (``rope_scaling``) as the matching ``rope_parameters`` (``rope_parameters.py``)."""
    common = {
        "vocab_size": cfg.padded_vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_query_groups,
        "max_position_embeddings": int(max_positions), "rms_norm_eps": cfg.norm_epsilon,
        **export_fields(rope_scaling or RopeScaling(), rope_theta, cfg.hidden_size // cfg.num_attention_heads),
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "dtype": str(dtype).replace("torch.", ""),
        "transformers_version": "5.24.0", **TOKEN_IDS,
    }
    if fmt == "instella":
        return {"architectures": ["InstellaForCausalLM"], "model_type": "instella", **common}
    return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **common, "num_experts": 1,
            "num_experts_per_tok": 1, "norm_topk_prob": False, "output_router_logits": False,
            "router_aux_loss_coef": 0.01, "clip_qkv": None}


def plugin_config_from_json(config: dict, where: str, tokenizer_vocab: int = 50280) -> Tuple[InstellaConfig, str]:
    """(plugin config, format) from a config.json dict; refuses models that are not Instella-shaped."""
    model_type = config.get("model_type")
    if model_type not in FORMATS:
        raise CheckpointMismatch(f"{where}: model_type {model_type!r} is neither 'instella' nor 'olmoe'; "
                                 "only Instella checkpoints (or their one-expert OLMoE export) convert")
    if model_type == "olmoe" and (config.get("num_experts", 64) != 1 or config.get("num_experts_per_tok", 8) != 1):
        raise CheckpointMismatch(f"{where}: an OLMoE config with {config.get('num_experts', 64)} experts (top-"
                                 f"{config.get('num_experts_per_tok', 8)}) is not an Instella model; only the "
                                 "one-expert export converts back")
    if config.get("tie_word_embeddings", False):
        raise CheckpointMismatch(f"{where}: tie_word_embeddings is true; Instella's embedding and LM head are untied")
    try:
        heads = int(config["num_attention_heads"])
        theta, _ = rope_from_config(config, int(config["hidden_size"]) // heads, where)
        cfg = InstellaConfig(
            num_layers=int(config["num_hidden_layers"]), hidden_size=int(config["hidden_size"]),
            num_attention_heads=heads, num_query_groups=int(config.get("num_key_value_heads") or heads),
            ffn_hidden_size=int(config["intermediate_size"]), padded_vocab_size=int(config["vocab_size"]),
            vocab_size=min(tokenizer_vocab, int(config["vocab_size"])),
            seq_length=int(config.get("max_position_embeddings", 4096)), rotary_base=theta,
            norm_epsilon=float(config.get("rms_norm_eps", 1e-5)), preset="hf")
    except KeyError as e:
        raise CheckpointMismatch(f"{where}: config.json lacks {e}; it does not describe an Instella model") from e
    cfg.validate()
    return cfg, model_type


class HFCheckpoint:
    """An Instella model directory in either format, read tensor by tensor under Instella names."""

    def __init__(self, path: str, cfg: Optional[InstellaConfig] = None):
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointMismatch(f"{path} has no config.json: not a Hugging Face model directory")
        with open(config_path, encoding="utf-8") as f:
            self.config = json.load(f)
        own_cfg, self.format = plugin_config_from_json(self.config, path)
        self.cfg = cfg or own_cfg
        # the RoPE method the weights were trained with (plain RoPE unless config.json says otherwise)
        _, self.rope_scaling = rope_from_config(self.config, own_cfg.head_dim, path)
        self.files = SafetensorsDir(path)
        self.check()

    def expected(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """on-disk name -> (shape, Instella name or router) for this checkpoint's format."""
        out = {}
        for name, shape in hf_shapes(self.cfg).items():
            out[file_name(name, self.format)] = (shape, name)
            if self.format == "olmoe" and name.endswith("mlp.down_proj.weight"):
                out[name.rsplit(".", 3)[0] + "." + ROUTER] = ((1, self.cfg.hidden_size), ROUTER)
        return out

    def check(self) -> None:
        """Every expected tensor present with its shape, nothing extra; all problems in one message."""
        expected, present = self.expected(), set(self.files.names())
        missing = [n for n in expected if n not in present]
        extra = sorted(present - set(expected))
        problems = []
        if missing or extra:
            problems.append(f"missing tensors {missing}" if missing else "")
            problems.append(f"unexpected tensors {extra}" if extra else "")
        for name, (shape, _) in expected.items():
            if name in present and self.files.shape(name) != shape:
                problems.insert(0, f"first mismatching tensor: {name} has shape {self.files.shape(name)}, the "
                                   f"configuration needs {shape}")
                break
        problems = [p for p in problems if p]
        if problems:
            raise CheckpointMismatch(f"{self.path}: the weights do not match the model configuration "
                                     f"({self.cfg.num_layers} layers, hidden {self.cfg.hidden_size}, vocab "
                                     f"{self.cfg.padded_vocab_size}):\n  - " + "\n  - ".join(problems) +
                                     "\n  fix config.json (or --config) to describe these weights")

    def get(self, instella_name: str) -> torch.Tensor:
        return self.files.get(file_name(instella_name, self.format))

    def dtype(self) -> torch.dtype:
        return self.files.dtype(file_name("model.embed_tokens.weight", self.format))

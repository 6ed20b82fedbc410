"""Weight mapping between Hugging Face Instella tensors and megatron parameters at any TP/PP layout.

Hugging Face names (INSTELLA.md): ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``self_attn.{q,k}_norm.weight``, ``mlp.{gate,up,down}_proj.weight``, the two pre-norms,
``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``.

Megatron layouts handled here:
- ``linear_qkv.weight`` is grouped per KV group: for each group g, ``[q heads of g; k_g; v_g]``
  (each head_dim rows); TP rank r holds the contiguous block of groups ``r*G/tp .. (r+1)*G/tp``.
- ``linear_fc1.weight`` is ``[gate; up]`` *per TP rank*: rank r holds ``[gate_r; up_r]``.
- Row-parallel weights (``linear_proj``, ``linear_fc2``) shard the input dim; embeddings and the
  LM head shard the vocabulary; the full-width q/k norms shard like the heads.
Layer indices in megatron names are stage-local; ``layer_number`` (1-based, global) gives the HF index.
"""
import re
from typing import Callable, Dict, Iterator, List, Tuple

import torch

from instella_plugin.model.config import InstellaConfig

# megatron local suffix -> (HF suffix, TP axis or None for replicated)
_LAYER_MAP = {
    "input_layernorm.weight": ("pre_attention_layernorm.weight", None),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", 1),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", 0),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", 0),
    "pre_mlp_layernorm.weight": ("pre_feedforward_layernorm.weight", None),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", 1),
}
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", 0),
    "decoder.final_layernorm.weight": ("model.norm.weight", None),
    "output_layer.weight": ("lm_head.weight", 0),
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def hf_names(cfg: InstellaConfig) -> List[str]:
    """Every tensor name of an HF Instella checkpoint, in a stable order."""
    names = ["model.embed_tokens.weight"]
    per_layer = ["pre_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
                 "self_attn.k_norm.weight", "pre_feedforward_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"]
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.{s}" for s in per_layer]
    return names + ["model.norm.weight", "lm_head.weight"]


def hf_shapes(cfg: InstellaConfig) -> Dict[str, Tuple[int, ...]]:
    h, f, kv, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_width, cfg.padded_vocab_size
    suffix_shapes = {
        "pre_attention_layernorm.weight": (h,), "pre_feedforward_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
        "self_attn.q_norm.weight": (h,), "self_attn.k_norm.weight": (kv,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    out = {}
    for name in hf_names(cfg):
        if name.startswith("model.layers."):
            out[name] = suffix_shapes[name.split(".", 3)[3]]
        elif name == "model.norm.weight":
            out[name] = (h,)
        else:
            out[name] = (v, h)
    return out


def _shard(t: torch.Tensor, axis, rank: int, tp: int) -> torch.Tensor:
    if axis is None or tp == 1:
        return t
    return t.chunk(tp, dim=axis)[rank]


def fuse_qkv(q, k, v, cfg: InstellaConfig) -> torch.Tensor:
    """HF q/k/v [out, h] -> megatron's global grouped layout [(heads + 2*groups) * head_dim, h]."""
    g, d = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    q = q.reshape(g, per * d, -1)
    k = k.reshape(g, d, -1)
    v = v.reshape(g, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def split_qkv(qkv, cfg: InstellaConfig):
    g, d = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    grouped = qkv.reshape(g, (per + 2) * d, -1)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    h = qkv.shape[-1]
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def fuse_fc1(gate, up, tp: int) -> torch.Tensor:
    """HF gate/up -> megatron fc1 as saved at this TP size: [gate_0; up_0; gate_1; up_1; ...]."""
    return torch.cat([torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))])


def split_fc1(fc1, tp: int):
    gates, ups = [], []
    for shard in fc1.chunk(tp):
        g, u = shard.chunk(2)
        gates.append(g)
        ups.append(u)
    return torch.cat(gates), torch.cat(ups)


def megatron_param_from_hf(local_name: str, layer_number: int, get_hf: Callable[[str], torch.Tensor],
                           cfg: InstellaConfig, tp_rank: int, tp: int) -> torch.Tensor:
    """The local shard of megatron parameter ``local_name`` built from HF tensors (``get_hf(name)``).

    ``layer_number`` is the global 1-based layer number of the layer the name belongs to (ignored
    for non-layer names).
    """
    if local_name in _GLOBAL_MAP:
        hf, axis = _GLOBAL_MAP[local_name]
        return _shard(get_hf(hf), axis, tp_rank, tp)
    m = _LAYER_RE.match(local_name)
    if not m:
        raise KeyError(f"no Hugging Face counterpart for megatron parameter {local_name!r}")
    suffix, base = m.group(2), f"model.layers.{layer_number - 1}."
    if suffix == "self_attention.linear_qkv.weight":
        qkv = fuse_qkv(get_hf(base + "self_attn.q_proj.weight"), get_hf(base + "self_attn.k_proj.weight"),
                       get_hf(base + "self_attn.v_proj.weight"), cfg)
        return qkv.chunk(tp)[tp_rank]
    if suffix == "mlp.linear_fc1.weight":
        gate = get_hf(base + "mlp.gate_proj.weight").chunk(tp)[tp_rank]
        up = get_hf(base + "mlp.up_proj.weight").chunk(tp)[tp_rank]
        return torch.cat([gate, up])
    if suffix not in _LAYER_MAP:
        raise KeyError(f"no Hugging Face counterpart for megatron parameter {local_name!r}")
    hf, axis = _LAYER_MAP[suffix]
    return _shard(get_hf(base + hf), axis, tp_rank, tp)


def hf_from_megatron_shards(local_name: str, layer_number: int, shards: List[torch.Tensor],
                            cfg: InstellaConfig) -> Dict[str, torch.Tensor]:
    """HF tensors from the TP shards (rank order) of one megatron parameter."""
    tp = len(shards)
    if local_name in _GLOBAL_MAP:
        hf, axis = _GLOBAL_MAP[local_name]
        return {hf: shards[0] if axis is None else torch.cat(shards, dim=axis)}
    m = _LAYER_RE.match(local_name)
    if not m:
        raise KeyError(f"no Hugging Face counterpart for megatron parameter {local_name!r}")
    suffix, base = m.group(2), f"model.layers.{layer_number - 1}."
    if suffix == "self_attention.linear_qkv.weight":
        q, k, v = split_qkv(torch.cat(shards), cfg)
        return {base + "self_attn.q_proj.weight": q, base + "self_attn.k_proj.weight": k,
                base + "self_attn.v_proj.weight": v}
    if suffix == "mlp.linear_fc1.weight":
        gate, up = split_fc1(torch.cat(shards), tp)
        return {base + "mlp.gate_proj.weight": gate, base + "mlp.up_proj.weight": up}
    hf, axis = _LAYER_MAP[suffix]
    return {base + hf: shards[0] if axis is None else torch.cat(shards, dim=axis)}


def iter_local_params(model) -> Iterator[Tuple[str, int, torch.nn.Parameter]]:
    """(stage-local name, global layer number or 0, parameter) for an unwrapped GPTModel chunk."""
    layer_numbers = {}
    if getattr(model, "decoder", None) is not None:
        for i, layer in enumerate(model.decoder.layers):
            layer_numbers[i] = layer.layer_number
    for name, p in model.named_parameters():
        m = _LAYER_RE.match(name)
        yield name, layer_numbers[int(m.group(1))] if m else 0, p


@torch.no_grad()
def load_hf_into_model(model, get_hf: Callable[[str], torch.Tensor], cfg: InstellaConfig) -> None:
    """Copy HF tensors into this rank's shard of every parameter of an (unwrapped) GPTModel chunk."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, layer_number, p in iter_local_params(model):
        src = megatron_param_from_hf(name, layer_number, get_hf, cfg, rank, tp)
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"{name}: Hugging Face tensor gives shape {tuple(src.shape)}, the model has "
                             f"{tuple(p.shape)}; the checkpoint does not match this model configuration")
        p.copy_(src)

"""The independent reference for model tests: transformers' one-expert ``OlmoeForCausalLM``.

OLMoE with one expert (router weight 1.0) computes Instella's function (pre-norm, full-width
QK-norm), in a class nobody here wrote. ``build_olmoe`` loads Instella HF tensors into it (in
memory: transformers 5.x keeps the experts fused as ``gate_up_proj`` [E, 2F, h] = [gate; up]),
``olmoe_grads`` reads its gradients back under the Instella names, ``gather_hf`` collects a megatron
model's (TP-sharded) parameters or gradients under the same names, and ``check_grads`` compares.
"""
import math

import torch

from instella_plugin.model.weight_map import hf_from_megatron_shards, hf_shapes, iter_local_params
from instella_plugin.training.model_setup import unwrap


def random_hf_weights(cfg, seed=0):
    """Random Instella HF tensors; every norm weight (QK-norm included) is 1 + 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) * (0.5 / math.sqrt(shape[-1]))
    return out


def build_olmoe(cfg, hf):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    oc = OlmoeConfig(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
                     num_experts=1, num_experts_per_tok=1, rms_norm_eps=cfg.norm_epsilon,
                     max_position_embeddings=cfg.seq_length, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base})
    oc._attn_implementation = "eager"
    model = OlmoeForCausalLM(oc).float()
    sd = {k: hf[k] for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = hf[p + "pre_attention_layernorm.weight"]
        sd[p + "post_attention_layernorm.weight"] = hf[p + "pre_feedforward_layernorm.weight"]
        for s in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            sd[p + f"self_attn.{s}.weight"] = hf[p + f"self_attn.{s}.weight"]
        sd[p + "mlp.gate.weight"] = torch.zeros(1, cfg.hidden_size)
        sd[p + "mlp.experts.gate_up_proj"] = torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                       hf[p + "mlp.up_proj.weight"]])[None]
        sd[p + "mlp.experts.down_proj"] = hf[p + "mlp.down_proj.weight"][None]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def olmoe_grads(model, cfg):
    """Gradients under the HF Instella names the megatron workers report."""
    grads = {"model.embed_tokens.weight": model.model.embed_tokens.weight.grad,
             "model.norm.weight": model.model.norm.weight.grad, "lm_head.weight": model.lm_head.weight.grad}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        grads[p + "pre_attention_layernorm.weight"] = layer.input_layernorm.weight.grad
        grads[p + "pre_feedforward_layernorm.weight"] = layer.post_attention_layernorm.weight.grad
        for s in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            grads[p + f"self_attn.{s}.weight"] = getattr(layer.self_attn, s).weight.grad
        gate, up = layer.mlp.experts.gate_up_proj.grad[0].chunk(2)
        grads[p + "mlp.gate_proj.weight"], grads[p + "mlp.up_proj.weight"] = gate, up
        grads[p + "mlp.down_proj.weight"] = layer.mlp.experts.down_proj.grad[0]
    return grads


def gather_hf(chunks, cfg, attr):
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for chunk in chunks:
        for name, layer_number, p in iter_local_params(unwrap(chunk)):
            local = (getattr(p, attr) if attr else p).detach().float().contiguous()
            shards = [torch.empty_like(local) for _ in range(tp)]
            torch.distributed.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
            out.update(hf_from_megatron_shards(name, layer_number, shards, cfg))
    return out if ps.get_tensor_model_parallel_rank() == 0 else {}


def check_grads(grads, ref_grads, loss, ref_loss):
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, want in ref_grads.items():
        got = grads[name]
        scale = want.abs().max().item() + 1e-12
        assert (got - want).abs().max().item() <= 2e-5 * scale, name

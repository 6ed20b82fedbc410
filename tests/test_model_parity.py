"""Parity of the megatron Instella model with transformers' one-expert OlmoeForCausalLM, at TP/PP layouts.

The reference is a class nobody here wrote: OLMoE with one expert (router weight 1.0) computes
Instella's function (pre-norm, full-width QK-norm). Weights are random, norms 1 + 0.1 N(0, 1).
One launch per layout computes logits, the loss and every gradient; TP=2/PP=2 runs with Megatron
sequence parallelism off and on in the same launch. The PP=2 launch also checks the mitchell init.
"""
import math

import pytest
import torch

from instella_plugin.model.config import get_preset
from instella_plugin.model.init import mitchell_sigma
from instella_plugin.model.weight_map import hf_shapes
from instella_plugin.testing.distributed import run_distributed

CFG = get_preset("instella-test", num_layers=4)
SEQ, MBS, NUM_MB = 16, 2, 2


def random_hf_weights(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) * (0.5 / math.sqrt(shape[-1]))
    return out


def make_batches(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(NUM_MB):
        seq = torch.randint(0, cfg.vocab_size, (MBS, SEQ + 1), generator=g)
        mask = torch.ones(MBS, SEQ)
        mask[0, -3:] = 0  # masked positions must not count
        batches.append(dict(tokens=seq[:, :-1], labels=seq[:, 1:], loss_mask=mask,
                            position_ids=torch.arange(SEQ).expand(MBS, SEQ).clone()))
    return batches


# ---- reference -------------------------------------------------------------------------------------
def olmoe_reference(cfg, hf, batches):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    oc = OlmoeConfig(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
                     num_experts=1, num_experts_per_tok=1, rms_norm_eps=cfg.norm_epsilon,
                     max_position_embeddings=cfg.seq_length, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base})
    oc._attn_implementation = "eager"
    model = OlmoeForCausalLM(oc).float()
    sd = {"model.embed_tokens.weight": hf["model.embed_tokens.weight"], "model.norm.weight": hf["model.norm.weight"],
          "lm_head.weight": hf["lm_head.weight"]}
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

    logits, loss_sum, count = [], 0.0, 0.0
    for b in batches:
        out = model(input_ids=b["tokens"], position_ids=b["position_ids"]).logits
        logits.append(out.detach())
        ce = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), b["labels"].reshape(-1),
                                               reduction="none")
        loss_sum = loss_sum + (ce * b["loss_mask"].reshape(-1)).sum()
        count += b["loss_mask"].sum()
    loss = loss_sum / count
    loss.backward()
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
    return logits, loss.item(), grads


# ---- megatron worker (runs on every rank) -----------------------------------------------------------
def _gather_hf(chunks, cfg, attr):
    from megatron.core import parallel_state as ps

    from instella_plugin.model.weight_map import hf_from_megatron_shards, iter_local_params
    from instella_plugin.training.model_setup import unwrap

    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for chunk in chunks:
        for name, layer_number, p in iter_local_params(unwrap(chunk)):
            local = (getattr(p, attr) if attr else p).detach().float().contiguous()
            shards = [torch.empty_like(local) for _ in range(tp)]
            torch.distributed.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
            out.update(hf_from_megatron_shards(name, layer_number, shards, cfg))
    return out if ps.get_tensor_model_parallel_rank() == 0 else {}


def _megatron_worker(cfg, hf, batches, variants, check_init):
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.training.forward_step import collect_logits, run_forward_backward
    from instella_plugin.training.model_setup import unwrap, wrap_ddp

    results = []
    for variant in variants:  # extra TransformerConfig settings (sequence parallel, recompute)
        tcfg = cfg.transformer_config(tensor_parallel=ps.get_tensor_model_parallel_world_size(),
                                      virtual_pipeline=ps.get_virtual_pipeline_model_parallel_world_size(),
                                      pipeline_parallel=ps.get_pipeline_model_parallel_world_size(), **variant)
        chunks = build_gpt_chunks(cfg, tcfg, init_seed=7)
        init_weights = _gather_hf(chunks, cfg, None) if check_init else None
        for c in chunks:
            load_hf_into_model(c, hf.__getitem__, cfg)
        model = wrap_ddp(chunks)
        logits = collect_logits(model, batches, seq_length=SEQ, micro_batch_size=MBS)
        for m in model:
            m.zero_grad_buffer()
        reports = run_forward_backward(model, batches, seq_length=SEQ, micro_batch_size=MBS,
                                       num_microbatches=NUM_MB)
        loss = None
        if reports:
            total = torch.stack([r["lm loss"] for r in reports]).sum(0)
            loss = (total[0] / total[1]).item()
        grads = _gather_hf(model, cfg, "main_grad")
        results.append(dict(logits=logits, loss=loss, grads=grads, init=init_weights,
                            tp_rank=ps.get_tensor_model_parallel_rank()))
        del model, chunks
    return results


def _merge(rank_results, idx):
    logits, loss, grads, init = None, None, {}, {}
    for r in rank_results:
        res = r[idx]
        if res["logits"]:
            logits, loss = res["logits"], res["loss"]
        grads.update(res["grads"])
        init.update(res["init"] or {})
    return logits, loss, grads, init


@pytest.fixture(scope="module")
def reference():
    hf = random_hf_weights(CFG)
    batches = make_batches(CFG)
    logits, loss, grads = olmoe_reference(CFG, hf, batches)
    return hf, batches, logits, loss, grads


def _check_logits(logits, ref_logits):
    assert logits is not None and len(logits) == len(ref_logits)
    for got, want in zip(logits, ref_logits):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5


def _check_grads(grads, ref_grads, loss, ref_loss):
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, want in ref_grads.items():
        got = grads[name]
        scale = want.abs().max().item() + 1e-12
        assert (got - want).abs().max().item() <= 2e-5 * scale, name


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_parity_with_olmoe_reference(reference, tp, pp):
    hf, batches, ref_logits, ref_loss, ref_grads = reference
    res = run_distributed(_megatron_worker, tp * pp, CFG, hf, batches, [{}], pp == 2, tp=tp, pp=pp)
    logits, loss, grads, init = _merge(res, 0)
    _check_logits(logits, ref_logits)
    _check_grads(grads, ref_grads, loss, ref_loss)
    if pp == 2:  # init statistics with global layer indices (layers 2, 3 live on stage 1)
        assert set(init) == set(ref_grads)
        for name, t in init.items():
            sigma = mitchell_sigma(name, CFG)
            if sigma is None:
                assert torch.equal(t, torch.ones_like(t)), name
                continue
            n = t.numel()
            assert t.abs().max().item() <= 3 * sigma * (1 + 1e-6), name
            expected = 0.98658 * sigma
            assert abs(t.std().item() - expected) <= 4 * expected / math.sqrt(2 * n), name


RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


@pytest.mark.dist
def test_tp2_pp2_matches_reference_with_sequence_parallel_and_recompute(reference):
    """Also the QK-norm's TP all-reduce under full activation recompute (forward run twice)."""
    hf, batches, ref_logits, ref_loss, ref_grads = reference
    variants = [{}, dict(sequence_parallel=True), dict(sequence_parallel=True, **RECOMPUTE)]
    res = run_distributed(_megatron_worker, 4, CFG, hf, batches, variants, False, tp=2, pp=2)
    for idx in range(len(variants)):
        logits, loss, grads, _ = _merge(res, idx)
        _check_logits(logits, ref_logits)
        _check_grads(grads, ref_grads, loss, ref_loss)

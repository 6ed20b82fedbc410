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
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import build_olmoe, check_grads, gather_hf, olmoe_grads, random_hf_weights

CFG = get_preset("instella-test", num_layers=4)
SEQ, MBS, NUM_MB = 16, 2, 2


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
    model = build_olmoe(cfg, hf)
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
    return logits, loss.item(), olmoe_grads(model, cfg)


# ---- megatron worker (runs on every rank) -----------------------------------------------------------
def _megatron_worker(cfg, hf, batches, variants, check_init):
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.training.forward_step import collect_logits, run_forward_backward
    from instella_plugin.training.model_setup import wrap_ddp

    results = []
    for variant in variants:  # extra TransformerConfig settings (sequence parallel, recompute)
        tcfg = cfg.transformer_config(tensor_parallel=ps.get_tensor_model_parallel_world_size(),
                                      virtual_pipeline=ps.get_virtual_pipeline_model_parallel_world_size(),
                                      pipeline_parallel=ps.get_pipeline_model_parallel_world_size(), **variant)
        chunks = build_gpt_chunks(cfg, tcfg, init_seed=7)
        init_weights = gather_hf(chunks, cfg, None) if check_init else None
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
        grads = gather_hf(model, cfg, "main_grad")
        results.append(dict(logits=logits, loss=loss, grads=grads, init=init_weights, grad_norm=_grad_norm(model),
                            tp_rank=ps.get_tensor_model_parallel_rank()))
        del model, chunks
    return results


def _grad_norm(model):
    """The gradient norm exactly as megatron's optimizer computes it (and clips by)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    grads = [p.main_grad for m in model for p in m.parameters()
             if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
    return get_grad_norm_fp32(grads, grad_stats_parallel_group=ps.get_model_parallel_group())


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


def _check_grad_norm(rank_results, idx, ref_grads):
    """Every rank's clipping norm equals the reference's (TP-sharded weights counted once each)."""
    want = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()
    for r in rank_results:
        assert abs(r[idx]["grad_norm"] - want) <= 1e-5 * want, (r[idx]["grad_norm"], want)


def _check_logits(logits, ref_logits):
    assert logits is not None and len(logits) == len(ref_logits)
    for got, want in zip(logits, ref_logits):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_parity_with_olmoe_reference(reference, tp, pp):
    hf, batches, ref_logits, ref_loss, ref_grads = reference
    res = run_distributed(_megatron_worker, tp * pp, CFG, hf, batches, [{}], pp == 2, tp=tp, pp=pp)
    logits, loss, grads, init = _merge(res, 0)
    _check_logits(logits, ref_logits)
    check_grads(grads, ref_grads, loss, ref_loss)
    _check_grad_norm(res, 0, ref_grads)
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
        check_grads(grads, ref_grads, loss, ref_loss)
        _check_grad_norm(res, idx, ref_grads)

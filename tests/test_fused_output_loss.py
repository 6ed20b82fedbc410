"""The fused output layer + cross-entropy (model/fused_output_loss.py) against megatron's own path.

Single process: fp64 against a plain-PyTorch reference, bf16 within 2x of PyTorch's own bf16 error.
One 2-rank gloo launch: at TP=2 (sequence parallelism off and on) and then TP=1 (parallel state
rebuilt in the same processes), megatron's ``ColumnParallelLinear`` + ``vocab_parallel_cross_entropy``
against ``output_layer_loss`` on the same weights: per-token losses and the gradients of the hidden
states and the output weight within 1e-6 (fp32), for a loss mask, a mostly masked batch, arbitrary
per-token weights (DPO-like), with and without precomputation in the forward pass; and a whole
``FusedOutputLossGPTModel`` against ``GPTModel`` (losses, logits without labels, every gradient).
"""
import pytest
import torch

from instella_plugin.model.fused_output_loss import chunk_tokens_for, even_chunk, fused_linear_cross_entropy
from instella_plugin.testing.distributed import run_distributed

S, B, H, V = 12, 2, 16, 96  # sequence, micro-batch, hidden, vocabulary (divisible by 2)
CHUNK = 5  # at most 5 tokens a chunk (24 tokens: 5 chunks, the last of 4): chunks straddle sequence and batch rows


def _reference(hidden, weight, labels):
    return torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="none")


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S * B, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, (S * B,), generator=g)
    tok_w = torch.rand(S * B, generator=g, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), labels, tok_w.to(dtype)


def _grads(fn, hidden, weight, labels, tok_w):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss.to(tok_w.dtype) * tok_w).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("precompute", [True, False])
def test_fp64_matches_plain_pytorch(precompute):
    hidden, weight, labels, tok_w = _inputs(torch.float64)
    tok_w[::3] = 0  # masked tokens
    fused = _grads(lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_tokens=CHUNK, precompute=precompute),
                   hidden, weight, labels, tok_w)
    ref = _grads(_reference, hidden, weight, labels, tok_w)
    for got, want in zip(fused, ref):
        assert (got.double() - want).abs().max().item() < 1e-12


def test_bf16_error_within_twice_pytorch():
    hidden, weight, labels, tok_w = _inputs(torch.float64, seed=1)
    exact = _grads(_reference, hidden, weight, labels, tok_w)
    bf = [t.to(torch.bfloat16) for t in (hidden, weight)]
    ours = _grads(lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_tokens=CHUNK), *bf, labels, tok_w.float())
    torch_bf16 = _grads(lambda h, w, y: _reference(h, w, y).float(), *bf, labels, tok_w.float())
    for got, base, want in zip(ours, torch_bf16, exact):
        err = (got.double() - want).abs().max().item()
        assert err <= 2 * (base.double() - want).abs().max().item() + 1e-3 * want.abs().max().item(), err


def test_chunk_size_and_bad_shapes():
    assert chunk_tokens_for(50304, "cpu") == 640 and chunk_tokens_for(10, "cpu") % 64 == 0
    assert chunk_tokens_for(50304, "cpu", dtype=torch.bfloat16) == 384  # fp32 and bf16 buffers: 6 bytes a logit
    assert even_chunk(2048, 640) == 512 and even_chunk(24, 5) == 5 and even_chunk(26, 5) == 5 and even_chunk(10, 64) == 10
    with pytest.raises(ValueError, match="must be"):
        fused_linear_cross_entropy(torch.zeros(4, 8), torch.zeros(10, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(3, dtype=torch.long))


# ---- against megatron's path, 2 ranks ----------------------------------------------------------------
def _token_weights(kind, labels):
    g = torch.Generator().manual_seed(5)
    if kind == "mask":  # the trainer's loss mask: most tokens count
        w = torch.ones(B, S)
        w[0, -4:] = 0
        w[1, 2] = 0
    elif kind == "mostly-masked":  # SFT-like: few tokens count
        w = torch.zeros(B, S)
        w[:, -3:] = 1
    else:  # per-token weights of every size (DPO-like)
        w = torch.rand(B, S, generator=g) - 0.3
    return w


def _output_layer_pair(sequence_parallel):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, use_cpu_initialization=True,
                            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                            sequence_parallel=sequence_parallel, perform_initialization=False)
    g = torch.Generator().manual_seed(3)
    full = torch.randn(V, H, generator=g) * 0.3
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    layers = []
    for _ in range(2):
        layer = ColumnParallelLinear(H, V, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                     gather_output=False, skip_bias_add=False)
        with torch.no_grad():
            layer.weight.copy_(full.chunk(tp)[rank])
        layers.append(layer)
    return layers


def _check_output_layer(sequence_parallel, kind, precompute):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from instella_plugin.model import fused_output_loss as fol

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(S, B, H, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    w = _token_weights(kind, labels)
    if sequence_parallel:
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        hidden = hidden.chunk(tp)[rank]
    ref_layer, our_layer = _output_layer_pair(sequence_parallel)
    x_ref, x_our = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    logits, _ = ref_layer(x_ref)
    ref_loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1)
    (ref_loss * w).sum().backward()
    our_loss = fol.output_layer_loss(our_layer, x_our, labels, chunk_tokens=CHUNK) if precompute else \
        _without_precompute(our_layer, x_our, labels)
    (our_loss * w).sum().backward()
    return dict(loss=(our_loss - ref_loss).abs().max().item(), hidden=(x_our.grad - x_ref.grad).abs().max().item(),
                weight=(our_layer.weight.grad - ref_layer.weight.grad).abs().max().item(),
                scale=ref_layer.weight.grad.abs().max().item())


def _without_precompute(layer, x, labels):
    """output_layer_loss with the forward pass's precomputation off (every gradient row recomputed)."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    if layer.sequence_parallel:
        x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=layer.tp_group)
    elif layer.tp_group.size() > 1:
        x = copy_to_tensor_model_parallel_region(x, group=layer.tp_group)
    loss = fused_linear_cross_entropy(x.reshape(S * B, H), layer.weight, labels.transpose(0, 1).reshape(-1),
                                      layer.tp_group, CHUNK, precompute=False)
    return loss.view(S, B).transpose(0, 1)


def _check_gpt_model(sequence_parallel):
    """FusedOutputLossGPTModel vs GPTModel, same weights: per-token losses, logits, every gradient."""
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.config import get_preset

    cfg = get_preset("instella-test", num_layers=1, padded_vocab_size=V, vocab_size=V, seq_length=S)
    tcfg = cfg.transformer_config(tensor_parallel=ps.get_tensor_model_parallel_world_size(),
                                  sequence_parallel=sequence_parallel)
    g = torch.Generator().manual_seed(11)
    tokens, labels = torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S)
    w = _token_weights("mask", labels)
    out = {}
    for fused in (False, True):
        model = build_gpt_chunks(cfg, tcfg, init_seed=3, fused_output_loss=fused)[0]
        loss = model(tokens, pos, None, labels=labels)
        (loss * w).sum().backward()
        with torch.no_grad():
            logits = model(tokens, pos, None)
        out[fused] = (type(model).__name__, loss.detach(), logits,
                      {n: p.grad.clone() for n, p in model.named_parameters()})
    (n0, l0, lg0, g0), (n1, l1, lg1, g1) = out[False], out[True]
    assert (n0, n1) == ("GPTModel", "FusedOutputLossGPTModel")
    assert torch.equal(lg0, lg1)  # no labels: megatron's own logits path
    return dict(loss=(l0 - l1).abs().max().item(), grads=max((g0[k] - g1[k]).abs().max().item() for k in g0))


def _check_ddp_main_grad(sequence_parallel):
    """Inside megatron's DDP (overlapped gradient reduction, so each bucket's ready hook must fire), over
    two micro-batches of the trainer's forward step: GPTModel's main_grad against the fused model's, whose
    output weight gradient is accumulated straight into main_grad, for each expected per-token gradient
    (right: 1; none; wrong: 0.5) and for a loss mask of ones and zeros and one of arbitrary weights."""
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.config import get_preset
    from instella_plugin.training.forward_step import run_forward_backward
    from instella_plugin.training.model_setup import wrap_ddp

    cfg = get_preset("instella-test", num_layers=1, padded_vocab_size=V, vocab_size=V, seq_length=S)
    tcfg = cfg.transformer_config(tensor_parallel=ps.get_tensor_model_parallel_world_size(),
                                  sequence_parallel=sequence_parallel)
    g = torch.Generator().manual_seed(13 + ps.get_data_parallel_rank())  # other data on each DP rank
    masks = {"mask": [_token_weights("mask", None), _token_weights("mostly-masked", None)],
             "weights": [_token_weights("weights", None), torch.rand(B, S, generator=g)]}
    batches = [dict(tokens=torch.randint(0, V, (B, S), generator=g), labels=torch.randint(0, V, (B, S), generator=g),
                    position_ids=torch.arange(S).expand(B, S).clone()) for _ in range(2)]

    def main_grads(model, kind):
        model.zero_grad_buffer()
        run_forward_backward([model], [dict(b, loss_mask=m) for b, m in zip(batches, masks[kind])],
                             seq_length=S, micro_batch_size=B, num_microbatches=2)
        return {n: p.main_grad.clone() for n, p in model.module.named_parameters()}, model.module

    ref_model = wrap_ddp(build_gpt_chunks(cfg, tcfg, init_seed=3, fused_output_loss=False),
                         overlap_grad_reduce=True)[0]
    fused_model = wrap_ddp(build_gpt_chunks(cfg, tcfg, init_seed=3, fused_output_loss=True),
                           overlap_grad_reduce=True)[0]
    errs = {}
    for kind in masks:
        ref, _ = main_grads(ref_model, kind)
        for expected in (1.0, None, 0.5):
            fused_model.module.expected_loss_grad = expected
            got, module = main_grads(fused_model, kind)
            weight = module.output_layer.weight
            assert weight.grad is None and weight.grad_added_to_main_grad, (kind, expected)  # placeholder dropped
            assert ref["output_layer.weight"].abs().max() > 1e-3
            errs[(kind, expected)] = max((got[k] - ref[k]).abs().max().item() for k in ref)
    return errs


def _worker():
    from megatron.core import parallel_state as ps

    results = {}
    for tp in (2, 1):
        if tp == 1:  # the same two processes, rebuilt as TP=1 x DP=2
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=1)
        for sp in ((False, True) if tp == 2 else (False,)):
            for kind in ("mask", "mostly-masked", "weights"):
                for precompute in (True, False):
                    results[(tp, sp, kind, precompute)] = _check_output_layer(sp, kind, precompute)
            results[(tp, sp, "gpt model")] = _check_gpt_model(sp)
            results[(tp, sp, "ddp")] = _check_ddp_main_grad(sp)
    return results


@pytest.mark.dist
def test_matches_megatron_vocab_parallel_cross_entropy_at_tp1_and_tp2():
    per_rank = run_distributed(_worker, 2, tp=2)
    assert len(per_rank[0]) == 2 * 8 + 8
    for rank, results in enumerate(per_rank):
        for key, errs in results.items():
            if key[-1] == "ddp":
                assert len(errs) == 6 and max(errs.values()) <= 1e-6, (rank, key, errs)
                continue
            if key[-1] == "gpt model":
                assert errs["loss"] <= 1e-6 and errs["grads"] <= 1e-6, (rank, key, errs)
                continue
            assert errs["scale"] > 1e-2, (rank, key, errs)  # the gradients are not trivially zero
            assert max(errs["loss"], errs["hidden"], errs["weight"]) <= 1e-6, (rank, key, errs)

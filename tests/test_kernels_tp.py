"""Tensor parallelism of the fused QK-norm + RoPE, and training with the ``instella-fused`` spec.

One launch of 2 gloo ranks at TP=2 (each rank costs seconds of imports, so the checks share it):
1. the split kernel (local sum of squares -> megatron's autograd-aware all-reduce -> apply) on each
   rank's heads equals the unsplit kernel on all heads, forward and every gradient, fp64/fp32/bf16;
2. 50 training steps of the tiny Instella model with ``instella-fused`` track the ``instella``
   spec's losses within fp32 tolerance, from the same initial weights and batches (a minimal loop
   of megatron-core parts: DDP, the pipeline schedule, the megatron optimizer), and the fused
   attention really hands RoPE to its q/k norms.
"""
import pytest
import torch

from instella_plugin.testing.distributed import run_distributed

pytestmark = pytest.mark.dist
STEPS, SEQ, MBS = 50, 32, 2


def _split_vs_unsplit():
    from megatron.core import parallel_state as ps

    from instella_plugin import kernels as K
    from instella_plugin.model.full_width_qk_norm import all_reduce_sum_autograd

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(5)
        s, b, heads, d = 7, 3, 6, 10
        x = torch.randn(s, b, heads, d, generator=g, dtype=torch.float64).to(dtype)
        w = (1 + 0.2 * torch.randn(heads * d, generator=g, dtype=torch.float64)).to(dtype)
        dy = torch.randn(s, b, heads, d, generator=g, dtype=torch.float64).to(dtype)
        freqs = torch.randn(s, 1, 1, d, generator=g) * 20
        local = slice(rank * heads // tp, (rank + 1) * heads // tp)
        xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        yf = K.qk_norm_rope(xf, wf, freqs)
        yf.backward(dy)
        xl = x[:, :, local].clone().requires_grad_(True)
        wl = w.reshape(heads, d)[local].reshape(-1).clone().requires_grad_(True)
        yl = K.qk_norm_rope_tp(xl, wl, freqs, heads * d, all_reduce_sum_autograd)
        yl.backward(dy[:, :, local])
        out[str(dtype)] = [(a.double() - e.double()).abs().max().item() / e.double().abs().max().item() for a, e in (
            (yl, yf[:, :, local]), (xl.grad, xf.grad[:, :, local]), (wl.grad, wf.grad.reshape(heads, d)[local].reshape(-1)))]
    return out


def _train(spec_name):
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from instella_plugin.kernels import fused_spec
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.config import get_preset
    from instella_plugin.training.forward_step import run_forward_backward
    from instella_plugin.training.model_setup import wrap_ddp

    fused_spec.register()
    cfg = get_preset("instella-test")
    tcfg = cfg.transformer_config(tensor_parallel=ps.get_tensor_model_parallel_world_size())
    chunks = build_gpt_chunks(cfg, tcfg, spec_name=spec_name, init_seed=11)
    rope_handed_over = []
    for layer in chunks[0].decoder.layers:
        layer.self_attention.q_layernorm.register_forward_pre_hook(
            lambda mod, args: rope_handed_over.append(getattr(mod, "rope_freqs", None) is not None))
    model = wrap_ddp(chunks)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, adam_beta2=0.95,
                                                 clip_grad=1.0), model, config_overrides={})
    g = torch.Generator().manual_seed(3)
    # Learnable data: arithmetic sequences mod vocab, with random starts and one of 3 strides.
    losses = []
    for _ in range(STEPS):
        start = torch.randint(0, cfg.vocab_size, (MBS, 1), generator=g)
        stride = torch.randint(1, 4, (MBS, 1), generator=g)
        tokens = (start + stride * torch.arange(SEQ + 1)) % cfg.vocab_size
        batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(MBS, SEQ),
                     position_ids=torch.arange(SEQ).expand(MBS, SEQ).clone())
        for m in model:
            m.zero_grad_buffer()
        opt.zero_grad()
        reports = run_forward_backward(model, [batch], seq_length=SEQ, micro_batch_size=MBS, num_microbatches=1)
        opt.step()
        total = torch.stack([r["lm loss"] for r in reports]).sum(0)
        losses.append((total[0] / total[1]).item())
    kinds = sorted({type(layer.self_attention).__name__ for layer in chunks[0].decoder.layers})
    return dict(losses=losses, attention=kinds, rope_fused=all(rope_handed_over) and bool(rope_handed_over))


def _worker():
    return dict(split=_split_vs_unsplit(), instella=_train("instella"), fused=_train("instella-fused"))


def test_tp2_split_kernel_and_fused_spec_training():
    results = run_distributed(_worker, 2, tp=2)
    for rank, res in enumerate(results):
        tol = {"torch.float64": 1e-13, "torch.float32": 2e-6, "torch.bfloat16": 2e-2}
        for dtype, errs in res["split"].items():
            assert max(errs) <= tol[dtype], f"rank {rank} {dtype}: split vs unsplit rel. errors {errs}"
    res = results[0]
    assert res["fused"]["attention"] == ["FusedRopeSelfAttention"] and res["fused"]["rope_fused"]
    assert res["instella"]["attention"] == ["SelfAttention"]
    ref, got = torch.tensor(res["instella"]["losses"]), torch.tensor(res["fused"]["losses"])
    assert len(got) == STEPS and ref[-5:].mean() < ref[0] - 1.0, f"training did not progress: {ref.tolist()}"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"instella-fused losses drift from instella's: {m}")

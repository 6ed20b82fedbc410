"""Tensor parallelism of the fused QK-norm + RoPE, and training with the ``instella-fused`` spec.

1. One launch of 2 gloo ranks at TP=2 (each rank costs seconds of imports, so the checks share it):
   the split kernel (local sum of squares -> megatron's autograd-aware all-reduce -> apply) on each
   rank's heads equals the unsplit kernel on all heads, forward and every gradient, fp64/fp32/bf16;
   and the tiny model built with ``instella-fused`` equals the one built with ``instella`` from the
   same initial weights (logits, loss and every gradient of one forward/backward), with the fused
   attention really handing RoPE to its q/k norms.
2. 50 training steps of ``pretrain_gpt.py --spec instella-fused`` at TP=2 track ``--spec instella``'s
   losses within fp32 tolerance (same seed, data and schedule), and the run's model line names the
   fused modules and the native kernels.
"""
import pytest
import torch

from instella_plugin import kernels
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.trainer import TINY_MODEL, read_log, run_trainer

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


def _model_pass(spec_name):
    """Logits, loss and gradients (by parameter name) of one forward/backward of the tiny model."""
    from megatron.core import parallel_state as ps

    from instella_plugin.kernels import fused_spec
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.config import get_preset
    from instella_plugin.training.forward_step import collect_logits, run_forward_backward
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
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (MBS, SEQ + 1), generator=g)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(MBS, SEQ),
                 position_ids=torch.arange(SEQ).expand(MBS, SEQ).clone())
    logits = collect_logits(model, [batch], seq_length=SEQ, micro_batch_size=MBS)[0]
    reports = run_forward_backward(model, [batch], seq_length=SEQ, micro_batch_size=MBS, num_microbatches=1)
    total = torch.stack([r["lm loss"] for r in reports]).sum(0)
    grads = {n: p.main_grad.detach().clone() for n, p in model[0].module.named_parameters()}
    kinds = sorted({type(layer.self_attention).__name__ for layer in chunks[0].decoder.layers})
    return dict(logits=logits, loss=(total[0] / total[1]).item(), grads=grads, attention=kinds,
                rope_fused=all(rope_handed_over) and bool(rope_handed_over))


def _worker():
    return dict(split=_split_vs_unsplit(), instella=_model_pass("instella"), fused=_model_pass("instella-fused"))


def test_tp2_split_kernel_and_fused_model_equal_the_unfused():
    results = run_distributed(_worker, 2, tp=2)
    for rank, res in enumerate(results):
        tol = {"torch.float64": 1e-13, "torch.float32": 2e-6, "torch.bfloat16": 2e-2}
        for dtype, errs in res["split"].items():
            assert max(errs) <= tol[dtype], f"rank {rank} {dtype}: split vs unsplit rel. errors {errs}"
        ref, got = res["instella"], res["fused"]
        assert got["attention"] == ["FusedRopeSelfAttention"] and got["rope_fused"], got["attention"]
        assert ref["attention"] == ["SelfAttention"] and not ref["rope_fused"]
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (got["loss"], ref["loss"])
        assert sorted(got["grads"]) == sorted(ref["grads"])  # same parameter names and shards
        for name, g in ref["grads"].items():
            err = (got["grads"][name] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
            assert err <= 1e-4, f"rank {rank}: gradient of {name} differs by {err:.2e} (relative)"


def test_fused_spec_trains_like_instella_in_pretrain_gpt(tmp_path):
    common = TINY_MODEL + ["--tensor-model-parallel-size", 2, "--micro-batch-size", MBS,
                           "--global-batch-size", MBS, "--train-iters", STEPS]
    out = {}
    for spec in ("instella", "instella-fused"):
        proc = run_trainer(2, common + ["--spec", spec, "--save", tmp_path / spec, "--save-interval", 10 * STEPS])
        out[spec] = (proc.stdout, read_log(tmp_path / spec)[0])
    assert ("attention FusedRopeSelfAttention" in out["instella-fused"][0]
            and "mlp FusedSwiGLUMLP" in out["instella-fused"][0])
    expected = f"fused kernels: {kernels.describe_backend('cpu')}"  # names the x86 level of each kernel
    assert expected.startswith("fused kernels: native (") and expected in out["instella-fused"][0], expected
    assert "attention SelfAttention" in out["instella"][0] and "fused kernels" not in out["instella"][0]
    ref = torch.tensor([out["instella"][1][i] for i in range(1, STEPS + 1)])
    got = torch.tensor([out["instella-fused"][1][i] for i in range(1, STEPS + 1)])
    assert ref[-10:].mean() < ref[:5].mean() - 1.0, f"training did not progress: {ref.tolist()}"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"instella-fused losses drift from instella's: {m}")

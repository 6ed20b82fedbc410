"""One GRPO update at TP=2 against a plain PyTorch implementation on transformers' model.

megatron's policy (random weights, loaded from the same HF tensors) runs ``GRPOStep`` over two
micro-batches of rollouts with given old and reference log-probabilities and advantages; the token-mean
loss and every gradient must equal the GRPO loss written out here on transformers' one-expert
``OlmoeForCausalLM`` (the same function as Instella). The rollout scoring pass (vocab-parallel
log-probabilities and entropy from TP-sharded logits) must equal log_softmax of the full logits, and the
two rollout generators (the plain sampler, megatron-core's engine) continue prompts greedily alike.
"""
import pytest
import torch

from instella_plugin.model.config import get_preset
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import build_olmoe, check_grads, gather_hf, olmoe_grads, random_hf_weights

pytestmark = pytest.mark.dist
CFG = get_preset("instella-test", num_layers=2)
SEQ, ROWS, NUM_MB, CLIP, BETA, DUAL = 16, 3, 2, 0.2, 0.05, 3.0  # a larger beta than Instella's so the KL shows


def _hf_logps(model, b):
    logits = model(input_ids=b["tokens"], position_ids=b["position_ids"]).logits.float()
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, b["labels"][..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def make_batches(cfg, hf_policy, seed=5):
    """Rollout micro-batches whose old/ref log-probs are the true ones plus noise (ratios beyond the clip)."""
    g = torch.Generator().manual_seed(seed)
    model = build_olmoe(cfg, hf_policy)
    batches = []
    for _ in range(NUM_MB):
        seq = torch.randint(0, cfg.vocab_size, (ROWS, SEQ + 1), generator=g)
        mask = torch.zeros(ROWS, SEQ)
        for r in range(ROWS):
            mask[r, 4:SEQ - 2 * r] = 1.0  # prompt of 5 tokens, responses of different lengths
        b = dict(tokens=seq[:, :-1], labels=seq[:, 1:], loss_mask=mask,
                 position_ids=torch.arange(SEQ).expand(ROWS, SEQ).clone(),
                 advantages=torch.randn(ROWS, generator=g))
        with torch.no_grad():
            true, _ = _hf_logps(model, b)
        b["old_logprobs"] = true + 0.3 * torch.randn(ROWS, SEQ, generator=g)
        b["old_logprobs"][:, 5:7] -= 2.0  # ratios near e^2 > 3: the dual clip bounds those of negative advantages
        b["ref_logprobs"] = true + 0.3 * torch.randn(ROWS, SEQ, generator=g)
        batches.append(b)
    return batches


def reference_grpo(cfg, hf_policy, batches):
    """The GRPO loss in plain PyTorch: PPO-clip (dual-clipped at -A * c for A < 0, as VERL) + beta * k3, averaged
    over every response token."""
    model = build_olmoe(cfg, hf_policy)
    total, tokens = 0.0, 0.0
    for b in batches:
        logp, _ = _hf_logps(model, b)
        ratio = torch.exp(logp - b["old_logprobs"])
        adv = b["advantages"][:, None]
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * DUAL), pg)
        kl = torch.exp(b["ref_logprobs"] - logp) - (b["ref_logprobs"] - logp) - 1
        total = total + ((pg + BETA * kl) * b["loss_mask"]).sum()
        tokens += b["loss_mask"].sum()
    loss = total / tokens
    loss.backward()
    return loss.item(), olmoe_grads(model, cfg)


def _worker(cfg, hf_policy, batches):
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.rl.objective import GRPOStep, vocab_parallel_logprobs_and_entropy
    from instella_plugin.training.forward_step import run_forward_backward
    from instella_plugin.training.model_setup import unwrap, wrap_ddp

    tcfg = cfg.transformer_config(tensor_parallel=ps.get_tensor_model_parallel_world_size())
    policy = build_gpt_chunks(cfg, tcfg, init_seed=7)
    load_hf_into_model(policy[0], hf_policy.__getitem__, cfg)
    model = wrap_ddp(policy)
    with torch.no_grad():
        b = batches[0]
        logits = unwrap(model[0])(b["tokens"], b["position_ids"], None)
        scored = vocab_parallel_logprobs_and_entropy(logits, b["labels"], ps.get_tensor_model_parallel_group())
    step = GRPOStep(CLIP, BETA, DUAL)
    reports = run_forward_backward(model, batches, seq_length=SEQ, micro_batch_size=ROWS, num_microbatches=NUM_MB,
                                   step=step)
    total = torch.stack([r["lm loss"] for r in reports]).sum(0)
    stats = step.take_stats()
    # The two rollout generators agree: greedy continuations of the plain sampler and megatron-core's engine.
    from instella_plugin.data.tokenizer import load_tokenizer
    from instella_plugin.inference.api import SamplingParams
    from instella_plugin.inference.engine import MegatronGenerator
    from instella_plugin.rl.sampler import LiveModelSampler

    prompts = [b["tokens"][r, :4 + r].tolist() for r in range(ROWS)]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    tok = load_tokenizer()
    # (over the padded vocabulary, as the engine samples it; GRPO's plain sampler stops at the tokenizer's)
    plain = LiveModelSampler(model, tok, cfg.padded_vocab_size, torch.device("cpu")).generate(prompts, params)
    engine = MegatronGenerator(model[0], tok, max_sequence_length=SEQ).generate(prompts, params)
    return dict(loss=(total[0] / total[1]).item(), tokens=total[1].item(), clipped=float(stats[3] / stats[0]),
                dual_clipped=float(stats[4]),
                grads=gather_hf(model, cfg, "main_grad"), logp=scored[0], entropy=scored[1],
                plain=[c.tokens for c in plain], engine=[c.tokens for c in engine])


def test_grpo_update_gradients_match_plain_pytorch_on_transformers_at_tp2():
    hf_policy = random_hf_weights(CFG, seed=0)
    batches = make_batches(CFG, hf_policy)
    res = run_distributed(_worker, 2, CFG, hf_policy, batches, tp=2)
    ref_loss, ref_grads = reference_grpo(CFG, hf_policy, batches)
    got = res[0]
    assert got["tokens"] == sum(float(b["loss_mask"].sum()) for b in batches)
    assert 0.05 < got["clipped"] < 0.95  # both branches of the clip are exercised
    assert got["dual_clipped"] > 0  # and the dual clip
    check_grads(got["grads"], ref_grads, got["loss"], ref_loss)  # the shared helper: every tensor present
    worst = max(float((got["grads"][k] - g).abs().max()) / (float(g.abs().max()) + 1e-12) for k, g in ref_grads.items())
    print(f"GRPO at TP=2 vs plain PyTorch: loss {got['loss']:.8f} vs {ref_loss:.8f}; worst gradient error "
          f"{worst:.2e} of the tensor's largest entry")
    assert abs(got["loss"] - ref_loss) <= 1e-6 * max(abs(ref_loss), 1.0) and worst < 1e-5
    assert res[1]["loss"] == got["loss"]
    with torch.no_grad():
        want_logp, want_entropy = _hf_logps(build_olmoe(CFG, hf_policy), batches[0])
    assert res[0]["plain"] == res[0]["engine"] == res[1]["plain"] and len(res[0]["plain"][0]) == 6
    for r in res:  # every TP rank holds the full result of the scoring pass
        assert float((r["logp"] - want_logp).abs().max()) < 1e-4
        assert float((r["entropy"] - want_entropy).abs().max()) < 1e-4

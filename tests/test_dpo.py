"""DPO (``--dataset-type dpo``): the loss and every gradient against an independent reference, and
training runs through ``pretrain_gpt.py``.

1. At TP=2, megatron's policy and reference (random weights, different for each) score preference
   pairs through ``DPOStep`` over two micro-batches; the loss and every policy gradient must equal
   transformers' one-expert ``OlmoeForCausalLM`` pair computing the same DPO loss in plain PyTorch,
   length-normalised (Instella's) and summed.
2. ``pretrain_gpt.py --dataset-type dpo`` on the demo preference pairs: the first loss is ln 2 (the
   policy starts as its own reference), the loss falls; a run stopped at iteration 2 and resumed
   matches the uninterrupted run bitwise, and resuming without ``--pretrained-checkpoint`` (where
   the reference comes from) fails saying so.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from instella_plugin.model.config import get_preset
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import build_olmoe, check_grads, gather_hf, olmoe_grads, random_hf_weights
from instella_plugin.testing.trainer import read_log, run_trainer

pytestmark = pytest.mark.dist
CFG = get_preset("instella-test", num_layers=2)
SEQ, PAIRS, NUM_MB, BETA = 16, 2, 2, 5.0


def make_pair_batches(cfg, seed=3):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(NUM_MB):
        batch = {}
        for k, name in enumerate(("chosen", "rejected")):
            seq = torch.randint(0, cfg.vocab_size, (PAIRS, SEQ + 1), generator=g)
            mask = torch.ones(PAIRS, SEQ)
            mask[:, :4] = 0  # the prompt
            mask[0, SEQ - 3 - 2 * k:] = 0  # padding: chosen and rejected responses of other lengths
            batch.update({f"{name}_tokens": seq[:, :-1], f"{name}_labels": seq[:, 1:], f"{name}_loss_mask": mask,
                          f"{name}_position_ids": torch.arange(SEQ).expand(PAIRS, SEQ).clone()})
        batches.append(batch)
    return batches


def reference_dpo(cfg, hf_policy, hf_ref, batches, normalise):
    """The DPO loss written out with transformers' models; returns (loss, policy gradients)."""
    policy, ref = build_olmoe(cfg, hf_policy), build_olmoe(cfg, hf_ref)

    def logps(model, b, name):
        logits = model(input_ids=b[f"{name}_tokens"], position_ids=b[f"{name}_position_ids"]).logits.float()
        token_logp = torch.log_softmax(logits, -1).gather(-1, b[f"{name}_labels"][..., None])[..., 0]
        mask = b[f"{name}_loss_mask"]
        total = (token_logp * mask).sum(-1)
        return total / mask.sum(-1) if normalise else total

    losses = []
    for b in batches:
        with torch.no_grad():
            rc, rr = logps(ref, b, "chosen"), logps(ref, b, "rejected")
        pc, pr = logps(policy, b, "chosen"), logps(policy, b, "rejected")
        losses.append(-F.logsigmoid(BETA * ((pc - rc) - (pr - rr))))
    loss = torch.cat(losses).mean()
    loss.backward()
    return loss.item(), olmoe_grads(policy, cfg)


def _worker(cfg, hf_policy, hf_ref, batches):
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.training.dpo import DPOStep
    from instella_plugin.training.forward_step import run_forward_backward
    from instella_plugin.training.model_setup import wrap_ddp

    out = []
    for normalise in (True, False):
        tcfg = cfg.transformer_config(tensor_parallel=ps.get_tensor_model_parallel_world_size())
        policy, ref = build_gpt_chunks(cfg, tcfg, init_seed=7), build_gpt_chunks(cfg, tcfg, init_seed=8)
        load_hf_into_model(policy[0], hf_policy.__getitem__, cfg)
        load_hf_into_model(ref[0], hf_ref.__getitem__, cfg)
        model = wrap_ddp(policy)
        step = DPOStep(ref, BETA, normalise=normalise)
        reports = run_forward_backward(model, batches, seq_length=SEQ, micro_batch_size=PAIRS,
                                       num_microbatches=NUM_MB, step=step)
        total = torch.stack([r["lm loss"] for r in reports]).sum(0)
        out.append(dict(loss=(total[0] / total[1]).item(), pairs=total[1].item(),
                        grads=gather_hf(model, cfg, "main_grad")))
    return out


def test_dpo_loss_and_gradients_match_transformers_reference():
    hf_policy, hf_ref = random_hf_weights(CFG, seed=0), random_hf_weights(CFG, seed=1)
    batches = make_pair_batches(CFG)
    res = run_distributed(_worker, 2, CFG, hf_policy, hf_ref, batches, tp=2)
    for k, normalise in enumerate((True, False)):
        ref_loss, ref_grads = reference_dpo(CFG, hf_policy, hf_ref, batches, normalise)
        got = res[0][k]
        assert got["pairs"] == NUM_MB * PAIRS
        assert abs(ref_loss - math.log(2)) > 1e-3, "policy and reference too alike for a meaningful check"
        check_grads(got["grads"], ref_grads, got["loss"], ref_loss)
        assert res[1][k]["loss"] == got["loss"]  # both TP ranks report the same loss


# ---- pretrain_gpt.py (slow tier: three runs of the trainer end to end) -------------------------------------
@pytest.mark.slow
def test_dpo_trains_resumes_exactly_and_needs_its_reference_on_resume(tmp_path):
    from instella_plugin.data.demo_corpus import build_demo_corpus

    data = str(tmp_path / "data")
    build_demo_corpus(data, num_docs=50, num_chats=16)
    base = ["--plugin", "instella", "--instella-recipe", "tiny-cpu", "--device", "cpu", "--log-interval", "1",
            "--data-root", data, "--no-plot", "--tensor-model-parallel-size", "2"]
    start = tmp_path / "start"  # the "SFT" model DPO starts from: one LM step
    run_trainer(2, base + ["--data-blend", "tiny", "--train-iters", "1", "--lr-warmup-iters", "0", "--save", start])
    dpo = base + ["--data-blend", "tiny-dpo", "--dataset-type", "dpo", "--micro-batch-size", "2",
                  "--global-batch-size", "4", "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-init", "1e-5",
                  "--lr-warmup-iters", "1", "--weight-decay", "0",
                  "--train-iters", "4", "--finetune"]
    run_trainer(2, dpo + ["--pretrained-checkpoint", start, "--save", tmp_path / "full"])
    full, _ = read_log(tmp_path / "full")
    assert abs(full[1] - math.log(2)) < 1e-6, full  # policy == reference at the first step
    assert full[4] < full[1] - 0.05, full

    own = tmp_path / "own"
    run_trainer(2, dpo + ["--pretrained-checkpoint", start, "--save", own, "--load", own, "--exit-interval", "2"])
    no_ref = run_trainer(2, dpo + ["--save", own, "--load", own], check=False)
    assert no_ref.returncode != 0 and "needs --pretrained-checkpoint" in no_ref.stdout + no_ref.stderr
    run_trainer(2, dpo + ["--pretrained-checkpoint", start, "--save", own, "--load", own])
    resumed, _ = read_log(own)
    assert [resumed[i] for i in (3, 4)] == [full[i] for i in (3, 4)], (resumed, full)  # bitwise

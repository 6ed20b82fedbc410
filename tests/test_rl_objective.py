"""The GRPO objective and advantages against independent references on fixed inputs.

- TRL 1.16.0's own loss code (``GRPOTrainer._compute_loss``, loss type ``bnpo``: the PPO-clipped loss
  plus beta * k3 KL, averaged over every completion token of the batch, i.e. VERL's "token-mean") run
  on the same log-probabilities, old and reference log-probabilities, advantages and masks: loss,
  gradient with respect to the log-probabilities, KL and clip-fraction metrics within 1e-6 (float64).
- A closed-form per-token computation written here with plain Python floats.
- The dual clip (on by default, c = 3) against VERL's definition written out here per token (TRL has
  none): for A < 0, loss = min(max(-A r, -A clip(r, 1 - eps, 1 + eps)), -A c); its gradient by hand.
- Advantages against a hand computation and against TRL's ``nanstd`` (the Bessel-corrected std).
- The megatron loss function (``GRPOStep.loss``) over micro-batches reduces to the same token mean.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

from instella_plugin.rl.advantages import group_advantages
from instella_plugin.rl.objective import (
    DUAL_CLIP,
    GRPOStep,
    token_mean_loss,
    token_terms,
    vocab_parallel_logprobs_and_entropy,
)

CLIP, BETA = 0.2, 0.001


def _inputs(seed=0, b=6, s=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, s, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = old + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.3  # ratios well outside [0.8, 1.2] too
    ref = old + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.randint(2, s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None]).to(torch.float64)
    return logp, old, ref, adv, mask


def _trl_loss(logp, old, ref, adv, mask):
    """Run TRL's ``_compute_loss`` with its model forward replaced by the given log-probabilities."""
    metrics = defaultdict(lambda: defaultdict(list))
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=BETA, args=SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type="bnpo",
        epsilon_low=CLIP, epsilon_high=CLIP, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=metrics, accelerator=SimpleNamespace(reduce=lambda t, reduction="sum": t, gather=lambda t: t))
    b, s = logp.shape
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, s, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, metrics["train"]


def test_loss_gradient_kl_and_clip_fraction_equal_trl():
    for seed in range(3):
        logp, old, ref, adv, mask = _inputs(seed)
        ours_in = logp.clone().requires_grad_(True)
        trl_in = logp.clone().requires_grad_(True)
        ours = token_mean_loss(ours_in, old, ref, adv, mask, CLIP, BETA, dual_clip=None)  # TRL has no dual clip
        theirs, metrics = _trl_loss(trl_in, old, ref, adv, mask)
        ours.backward()
        theirs.backward()
        assert abs(float(ours) - float(theirs)) < 1e-6, (float(ours), float(theirs))
        assert float((ours_in.grad - trl_in.grad).abs().max()) < 1e-6
        terms = token_terms(logp, old, ref, adv, CLIP, BETA, dual_clip=None)
        n = mask.sum()
        assert abs(float((terms["kl"] * mask).sum() / n) - metrics["kl"][0]) < 1e-6
        assert abs(float((terms["clipped"] * mask).sum() / n) - metrics["clip_ratio/region_mean"][0]) < 1e-6
        assert 0 < metrics["clip_ratio/region_mean"][0] < 1  # the inputs exercise both branches


def test_per_token_terms_closed_form():
    logp, old, ref, adv, mask = _inputs(7, b=3, s=4)
    terms = token_terms(logp, old, ref, adv, CLIP, BETA, dual_clip=None)
    for i in range(3):
        for t in range(4):
            lp, o, r, a = float(logp[i, t]), float(old[i, t]), float(ref[i, t]), float(adv[i])
            ratio = math.exp(lp - o)
            pg = max(-a * ratio, -a * min(max(ratio, 1 - CLIP), 1 + CLIP))
            kl = math.exp(r - lp) - (r - lp) - 1
            assert abs(float(terms["pg"][i, t]) - pg) < 1e-12
            assert abs(float(terms["kl"][i, t]) - kl) < 1e-12
            assert abs(float(terms["loss"][i, t]) - (pg + BETA * kl)) < 1e-12
    # ratio 1 (the first mini-batch of a step): the loss is -A per token plus the KL term
    same = token_terms(old, old, ref, adv, CLIP, 0.0)
    assert torch.allclose(same["loss"], -adv[:, None].expand_as(old))


def test_megatron_loss_function_over_micro_batches_is_the_token_mean():
    """Two micro-batches' (sum, tokens), as megatron's per-token accounting adds them, equal TRL's mean."""
    logp, old, ref, adv, mask = _inputs(11)
    step = GRPOStep(CLIP, BETA, dual_clip=0)  # off, as TRL
    total, tokens = 0.0, 0
    for rows in (slice(0, 2), slice(2, 6)):
        batch = {"old_logprobs": old[rows], "ref_logprobs": ref[rows], "advantages": adv[rows],
                 "loss_mask": mask[rows]}
        loss_sum, n, report = step.loss(batch, -logp[rows])
        total += float(loss_sum)
        tokens += int(n)
        assert float(report["lm loss"][1]) == int(n)
    theirs, metrics = _trl_loss(logp.clone(), old, ref, adv, mask)
    assert tokens == int(mask.sum())
    assert abs(total / tokens - float(theirs)) < 1e-6  # float32 inside the loss function
    stats = step.take_stats()
    assert abs(float(stats[2] / stats[0]) - metrics["kl"][0]) < 1e-6
    assert float(step.take_stats().abs().sum()) == 0.0


def _verl_dual_clip_pg(lp, o, a, c):
    """VERL's per-token policy loss (``compute_policy_loss``) in plain floats: PPO's clipped loss, and for a
    negative advantage its minimum with -A * c."""
    ratio = math.exp(lp - o)
    pg = max(-a * ratio, -a * min(max(ratio, 1 - CLIP), 1 + CLIP))
    return min(pg, -a * c) if a < 0 else pg


def test_dual_clip_per_token_and_gradient_against_verls_definition():
    g = torch.Generator().manual_seed(21)
    b, s = 8, 7
    old = -torch.rand(b, s, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = old + torch.randn(b, s, generator=g, dtype=torch.float64) * 1.2  # many ratios above c = 3 and below 1/3
    ref = old + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.2
    adv = torch.tensor([-1.5, -0.4, 0.7, 1.2, -2.0, 0.3, -0.9, 0.0], dtype=torch.float64)
    assert DUAL_CLIP == 3.0  # VERL's actor.clip_ratio_c
    for c in (3.0, 1.5):
        x = logp.clone().requires_grad_(True)
        terms = token_terms(x, old, ref, adv, CLIP, BETA, dual_clip=c)
        terms["pg"].sum().backward()
        bounded = 0
        for i in range(b):
            for t in range(s):
                lp, o, a = float(logp[i, t]), float(old[i, t]), float(adv[i])
                ratio = math.exp(lp - o)
                want = _verl_dual_clip_pg(lp, o, a, c)
                assert abs(float(terms["pg"][i, t]) - want) < 1e-12, (i, t)
                kl = min(math.exp(float(ref[i, t]) - lp) - (float(ref[i, t]) - lp) - 1, 10.0)  # VERL's bound
                assert abs(float(terms["loss"][i, t]) - (want + BETA * kl)) < 1e-12
                dual = a < 0 and max(-a * ratio, -a * min(max(ratio, 1 - CLIP), 1 + CLIP)) > -a * c
                assert float(terms["dual_clipped"][i, t]) == float(dual)
                bounded += dual
                # d pg / d logp by hand: -A * ratio where the unclipped ratio decides, else 0 (a constant)
                ppo_clipped = (ratio > 1 + CLIP and a > 0) or (ratio < 1 - CLIP and a < 0)
                want_grad = 0.0 if (dual or ppo_clipped) else -a * ratio
                assert abs(float(x.grad[i, t]) - want_grad) < 1e-12, (i, t)
        assert 0 < bounded < int((adv < 0).sum()) * s  # the bound is active on some tokens, not all
    # off (None or 0): PPO's loss, unbounded for negative advantages; the default is c = 3
    plain = token_terms(logp, old, ref, adv, CLIP, BETA, dual_clip=None)
    assert torch.equal(plain["pg"], token_terms(logp, old, ref, adv, CLIP, BETA, dual_clip=0)["pg"])
    assert torch.equal(token_terms(logp, old, ref, adv, CLIP, BETA)["pg"],
                       token_terms(logp, old, ref, adv, CLIP, BETA, dual_clip=3.0)["pg"])
    assert float(plain["pg"].max()) > float((-adv * 3.0).max())  # what the dual clip removes
    assert float(plain["dual_clipped"].sum()) == 0


def test_dual_clip_in_the_megatron_loss_function_and_bad_values():
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 2 - 0.1
    logp = old + 1.5  # ratio e^1.5 = 4.48 > 3 everywhere
    adv = torch.tensor([-1.0, 2.0, -0.5, 0.5], dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.float64)
    step = GRPOStep(CLIP, 0.0)  # default c = 3
    loss_sum, n, _ = step.loss({"old_logprobs": old, "ref_logprobs": old, "advantages": adv, "loss_mask": mask},
                               -logp)
    # negative advantages: -A * 3 (not -A * 4.48); positive: -A * 1.2 (PPO's clip)
    want = 5 * (1.0 * 3 + 0.5 * 3 - 2.0 * 1.2 - 0.5 * 1.2)
    assert abs(float(loss_sum) - want) < 1e-5 and int(n) == 20
    stats = step.take_stats()
    assert (float(stats[3]), float(stats[4])) == (10.0, 10.0)  # PPO clip on A > 0 rows, dual clip on A < 0 rows
    for bad in (1.0, 0.5, -3.0):
        with pytest.raises(ValueError, match=f"dual clip c = {bad} must be > 1"):
            token_terms(logp, old, old, adv, CLIP, 0.0, dual_clip=bad)


def test_advantages_hand_computed_and_against_trl_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4)
    # group 1: mean 0.5, unbiased std sqrt(1/3) = 0.57735
    s = math.sqrt(1 / 3)
    expected_1 = [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.5 / (s + 1e-6)]
    assert torch.allclose(adv[:4], torch.tensor(expected_1, dtype=torch.float64), atol=1e-12)
    assert torch.all(adv[4:8] == 0)  # every reward equal: no signal
    # group 3: [0, 0, 0, 1]: mean 0.25, std 0.5
    assert torch.allclose(adv[8:], torch.tensor([-0.25, -0.25, -0.25, 0.75], dtype=torch.float64) / (0.5 + 1e-6))
    g = rewards.double().view(-1, 4)
    trl_style = ((g - g.mean(1, keepdim=True)) / (nanstd(g, dim=1, keepdim=True) + 1e-6)).reshape(-1)
    assert float((adv - trl_style).abs().max()) < 1e-7  # TRL's Bessel factor count/(count-1) is float32


@pytest.mark.parametrize("rewards,n,message", [
    ([1.0, 0.0], 1, "at least 2 rollouts per prompt"),
    ([1.0, 0.0, 1.0], 2, "3 rewards do not split into groups of 2"),
])
def test_advantages_bad_input(rewards, n, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(torch.tensor(rewards), n)


def test_logprobs_and_entropy_from_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 17, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 17, (2, 5), generator=g)
    logp, entropy = vocab_parallel_logprobs_and_entropy(logits, targets)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(logp.double(), ref.gather(-1, targets[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(entropy.double(), -(ref.exp() * ref).sum(-1), atol=1e-5)

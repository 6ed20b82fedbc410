"""The GRPO objective as Instella-Math ran it (VERL): PPO-clipped policy loss plus a KL loss to the frozen
reference, averaged over every response token of the mini-batch ("token-mean").

Per response token t of a rollout with advantage A (its group-normalised reward), with the policy's
log-probability logp, the rollout policy's old_logp and the reference's ref_logp::

    ratio = exp(logp - old_logp)
    pg    = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))          (eps = 0.2)
    pg    = min(pg, -A * c)   where A < 0                                 (dual clip, c = 3)
    kl    = exp(ref_logp - logp) - (ref_logp - logp) - 1                 (Schulman's "k3", low variance)
    loss  = pg + beta * kl                                               (beta = 0.001; no entropy bonus)

and the mini-batch loss is sum(loss * mask) / sum(mask) over all its sequences. In megatron the loss
function returns (masked sum, token count): megatron's per-token-loss accounting divides the gradients
by the token count summed over micro-batches and data-parallel ranks, which is exactly token-mean over
the mini-batch whatever its split into token-budget micro-batches.

The dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL") bounds the loss
of a token with a negative advantage at -A * c: PPO's clip leaves -A * ratio unbounded when the ratio
grows far above 1 + eps on a token the advantage wants less likely, so a few stale tokens could dominate
the mini-batch. VERL applies it in every PPO/GRPO policy loss (``core_algos.compute_policy_loss``:
``pg_losses3 = -A * clip_ratio_c``, taken with ``min`` where A < 0) with ``actor.clip_ratio_c = 3.0``
by default; the official run's settings (INSTELLA.md) do not change it, so c = 3 is our default too
(``--grpo-dual-clip``; 0 turns it off). The KL log-ratio is clamped to
[-20, 20] and the KL to [-10, 10] as VERL's ``low_var_kl`` does (inactive for ordinary inputs).
"""
from functools import partial
from typing import Dict, Optional

import torch

KL_LOG_RATIO_BOUND = 20.0
KL_BOUND = 10.0
DUAL_CLIP = 3.0  # VERL's actor.clip_ratio_c


def token_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                clip_eps: float, kl_coef: float, dual_clip: Optional[float] = DUAL_CLIP) -> Dict[str, torch.Tensor]:
    """Per-token ``loss``, ``pg`` (policy term), ``kl``, ``clipped`` (PPO's clip decided the term) and
    ``dual_clipped`` (the dual clip bounded it), all [b, s]; ``advantages`` is [b] (one per sequence) or
    [b, s]. ``dual_clip`` None (or 0) leaves PPO's loss unbounded for negative advantages."""
    if dual_clip is not None and dual_clip != 0 and not dual_clip > 1.0:
        raise ValueError(f"dual clip c = {dual_clip} must be > 1 (it bounds -A * ratio where the ratio is above c); "
                         "give 0 to turn it off")
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(pg)
    if dual_clip:
        bound = -advantages * dual_clip
        negative = (advantages < 0).expand_as(pg)
        dual_clipped = (negative & (pg > bound)).to(logp.dtype)
        pg = torch.where(negative, torch.minimum(pg, bound), pg)
    log_ratio = torch.clamp(ref_logp - logp, -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    kl = torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, -KL_BOUND, KL_BOUND)
    return {"loss": pg + kl_coef * kl, "pg": pg, "kl": kl, "ratio": ratio,
            "clipped": (clipped > unclipped).to(logp.dtype), "dual_clipped": dual_clipped}


def token_mean_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, kl_coef: float,
                    dual_clip: Optional[float] = DUAL_CLIP) -> torch.Tensor:
    """The mini-batch loss: the per-token loss averaged over every masked (response) token."""
    terms = token_terms(logp, old_logp, ref_logp, advantages, clip_eps, kl_coef, dual_clip)
    mask = mask.to(logp.dtype)
    return (terms["loss"] * mask).sum() / mask.sum().clamp(min=1.0)


class GRPOStep:
    """megatron ``forward_step_func`` for GRPO updates.

    A micro-batch holds rollouts as ``tokens``, ``labels``, ``position_ids``, ``loss_mask`` (1 on response
    tokens) [b, s] plus ``old_logprobs`` and ``ref_logprobs`` [b, s] (aligned with ``labels``) and
    ``advantages`` [b]. The policy's forward with labels gives per-token negative log-likelihoods (the
    fused output layer + cross-entropy), so logp = -nll keeps the vocabulary sharded. ``stats`` sums
    the figures of the micro-batches it ran (masked sums and token counts) until ``take_stats``.
    """

    def __init__(self, clip_eps: float, kl_coef: float, dual_clip: Optional[float] = DUAL_CLIP):
        self.clip_eps, self.kl_coef = float(clip_eps), float(kl_coef)
        self.dual_clip = float(dual_clip) if dual_clip else None
        self.stats = self._empty()

    @staticmethod
    def _empty():
        return torch.zeros(5, dtype=torch.float64)  # tokens, pg sum, kl sum, clipped count, dual-clipped count

    def take_stats(self) -> torch.Tensor:
        stats, self.stats = self.stats, self._empty()
        return stats

    def __call__(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(self.loss, batch)

    def loss(self, batch, output):
        logp = -output.float()
        terms = token_terms(logp, batch["old_logprobs"].float(), batch["ref_logprobs"].float(),
                            batch["advantages"].float(), self.clip_eps, self.kl_coef, self.dual_clip)
        mask = batch["loss_mask"].float()
        loss_sum = (terms["loss"] * mask).sum()
        tokens = mask.sum()
        with torch.no_grad():
            self.stats += torch.stack([tokens, (terms["pg"] * mask).sum(), (terms["kl"] * mask).sum(),
                                       (terms["clipped"] * mask).sum(),
                                       (terms["dual_clipped"] * mask).sum()]).double().cpu()
        reported = torch.stack([loss_sum.detach().clone(), tokens.detach()])
        return loss_sum, tokens.to(torch.int), {"lm loss": reported}


@torch.no_grad()
def vocab_parallel_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, group=None):
    """(log-probability of ``targets``, entropy) per position from this rank's vocabulary shard.

    logits [..., v_local] hold rows ``[rank * v_local, (rank + 1) * v_local)`` of the vocabulary
    (megatron's vocab-parallel output layer); ``targets`` [...] global ids. Max, normaliser and the
    target's logit are all-reduced over ``group`` (the TP group), so the full logits are never gathered.
    """
    logits = logits.float()
    world = torch.distributed.get_world_size(group) if group is not None else 1
    rank = torch.distributed.get_rank(group) if group is not None else 0
    v_local = logits.shape[-1]

    def reduce(t, op=torch.distributed.ReduceOp.SUM):
        if world > 1:
            torch.distributed.all_reduce(t, op=op, group=group)
        return t

    top = reduce(logits.max(dim=-1).values, torch.distributed.ReduceOp.MAX)
    shifted = logits - top[..., None]
    exp = shifted.exp()
    total = reduce(exp.sum(dim=-1))
    weighted = reduce((exp * shifted).sum(dim=-1))
    local = targets - rank * v_local
    inside = (local >= 0) & (local < v_local)
    picked = shifted.gather(-1, local.clamp(0, v_local - 1)[..., None])[..., 0] * inside
    picked = reduce(picked)
    log_total = total.log()
    return picked - log_total, log_total - weighted / total

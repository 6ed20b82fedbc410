"""The GRPO objective as Instella-Math ran it (VERL): PPO-clipped policy loss plus a KL loss to the frozen
reference, averaged over every response token of the mini-batch ("token-mean").

Per response token t of a rollout with advantage A (its group-normalised reward), with the policy's
log-probability logp, the rollout policy's old_logp and the reference's ref_logp::

    ratio = exp(logp - old_logp)
    pg    = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))          (eps = 0.2)
    kl    = exp(ref_logp - logp) - (ref_logp - logp) - 1                 (Schulman's "k3", low variance)
    loss  = pg + beta * kl                                               (beta = 0.001; no entropy bonus)

and the mini-batch loss is sum(loss * mask) / sum(mask) over all its sequences. In megatron the loss
function returns (masked sum, token count): megatron's per-token-loss accounting divides the gradients
by the token count summed over micro-batches and data-parallel ranks, which is exactly token-mean over
the mini-batch whatever its split into token-budget micro-batches. The KL log-ratio is clamped to
[-20, 20] and the KL to [-10, 10] as VERL's ``low_var_kl`` does (inactive for ordinary inputs).
"""
from functools import partial
from typing import Dict

import torch

KL_LOG_RATIO_BOUND = 20.0
KL_BOUND = 10.0


def token_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                clip_eps: float, kl_coef: float) -> Dict[str, torch.Tensor]:
    """Per-token ``loss``, ``pg`` (policy term), ``kl`` and ``clipped`` (the clip decided the term), all
    [b, s]; ``advantages`` is [b] (one per sequence) or [b, s]."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg = torch.maximum(unclipped, clipped)
    log_ratio = torch.clamp(ref_logp - logp, -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    kl = torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, -KL_BOUND, KL_BOUND)
    return {"loss": pg + kl_coef * kl, "pg": pg, "kl": kl, "ratio": ratio,
            "clipped": (clipped > unclipped).to(logp.dtype)}


def token_mean_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, kl_coef: float) -> torch.Tensor:
    """The mini-batch loss: the per-token loss averaged over every masked (response) token."""
    terms = token_terms(logp, old_logp, ref_logp, advantages, clip_eps, kl_coef)
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

    def __init__(self, clip_eps: float, kl_coef: float):
        self.clip_eps, self.kl_coef = float(clip_eps), float(kl_coef)
        self.stats = self._empty()

    @staticmethod
    def _empty():
        return torch.zeros(4, dtype=torch.float64)  # tokens, pg sum, kl sum, clipped count

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
                            batch["advantages"].float(), self.clip_eps, self.kl_coef)
        mask = batch["loss_mask"].float()
        loss_sum = (terms["loss"] * mask).sum()
        tokens = mask.sum()
        with torch.no_grad():
            self.stats += torch.stack([tokens, (terms["pg"] * mask).sum(), (terms["kl"] * mask).sum(),
                                       (terms["clipped"] * mask).sum()]).double().cpu()
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

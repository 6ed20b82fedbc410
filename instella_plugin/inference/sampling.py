"""Next-token choice from last-position logits: greedy, or temperature, top-k and top-p sampling.

The filters follow transformers' logits processors (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``), applied in that order, so ``top_k`` and ``top_p`` combine (megatron-core's own
sampler takes one or the other). Top-p keeps the smallest set of most likely tokens whose probability
reaches ``top_p`` (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"), never fewer
than one. Sampling draws from a ``torch.Generator`` the caller seeds, so a seed gives the same tokens.
"""
from typing import Optional, Tuple

import torch


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[batch, vocab] logits -> scaled logits with the filtered-out tokens at -inf (a new tensor)."""
    out = logits.float() / temperature if temperature not in (0.0, 1.0) else logits.float().clone()
    if top_k > 0:
        k = min(top_k, out.shape[-1])
        kth = torch.topk(out, k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(out, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1.0 - top_p)
        drop_sorted[..., -1:] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def choose_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: Optional[torch.Generator], vocab: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens [batch], their log-probabilities under the model [batch]) for last-position logits.

    ``temperature == 0`` is greedy (argmax). ``vocab``: only ids below it are chosen (a model's
    embedding is padded past the tokenizer's ids). The log-probabilities are the model's own
    (log-softmax of the unscaled, unfiltered, unmasked logits over every row), what a trainer's
    forward pass computes and a policy-gradient objective compares against.

    A draw inverts the cumulative distribution: one uniform number per row against the row's running
    sum of (unnormalised) weights, in float64 (``torch.multinomial`` draws the same distribution about
    30x slower over a 50K vocabulary on the CPU).
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    choosable = logits[..., :vocab] if vocab is not None and vocab < logits.shape[-1] else logits
    if temperature == 0.0:
        tokens = torch.argmax(choosable, dim=-1)
    else:
        if temperature == 1.0 and top_k == 0 and top_p >= 1.0:
            weights = logprobs[..., :choosable.shape[-1]].exp()
        else:
            weights = filter_logits(choosable, temperature, top_k, top_p).softmax(dim=-1)
        tokens = sample_rows(weights, generator)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sample_rows(weights: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One id per row of non-negative ``weights`` [batch, vocab], id ``i`` with probability
    ``w_i / sum(w)`` (zero weights never): the first id whose running sum exceeds ``u * sum(w)``."""
    cdf = weights.double().cumsum(dim=-1)
    u = torch.rand((weights.shape[0], 1), generator=generator, dtype=torch.float64, device=weights.device)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    return ids.clamp_max_(weights.shape[-1] - 1)

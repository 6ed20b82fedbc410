"""Sampling filters against transformers' logits processors, and the sampler's draws against them.

On fixed logits (random, with ties and a peaked row), ``filter_logits`` must give exactly what
``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper`` give (same kept tokens,
same values); ``choose_tokens`` must draw from the softmax of that (a chi-square-style bound on 20000
draws), be reproducible with a seeded generator, equal argmax at temperature 0 and with top_k=1, and
return the model's own log-probabilities of the chosen tokens; ids past ``vocab`` (padding rows) are
never drawn.
"""
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from instella_plugin.inference.sampling import choose_tokens, filter_logits


def logits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, generator=g) * 2.0
    x[1, :10] = 5.0          # ties at the top
    x[2, 7] = 30.0           # one token holds almost all the mass
    return x


def hf_filter(x, temperature, top_k, top_p):
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs(torch.zeros(x.shape[0], 1, dtype=torch.long), x.clone())


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 20, 1.0), (1.0, 0, 0.9), (0.6, 40, 0.8), (1.5, 5, 0.5), (1.0, 1, 1.0),
    (1.0, 0, 0.05)])
def test_filters_equal_transformers_processors(temperature, top_k, top_p):
    x = logits()
    ours, theirs = filter_logits(x, temperature, top_k, top_p), hf_filter(x, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    assert torch.allclose(ours[kept], theirs[kept], rtol=0, atol=1e-6)
    assert kept.sum(-1).min() >= 1


@pytest.mark.parametrize("temperature,top_k,top_p,vocab", [(0.8, 30, 0.9, None), (1.0, 0, 1.0, 280)])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p, vocab):
    x = logits()[:1] * 0.5
    probs = torch.zeros(x.shape[1])
    v = vocab or x.shape[1]
    probs[:v] = filter_logits(x[:, :v], temperature, top_k, top_p).softmax(-1)[0]
    g = torch.Generator().manual_seed(3)
    n = 20000
    counts = torch.zeros(x.shape[1])
    for _ in range(n // 500):
        tokens, _ = choose_tokens(x.expand(500, -1), temperature, top_k, top_p, g, vocab=vocab)
        counts += torch.bincount(tokens, minlength=x.shape[1]).float()
    assert counts[probs == 0].sum() == 0  # nothing outside the filter
    expected = probs * n
    big = expected > 50
    stat = ((counts[big] - expected[big]) ** 2 / expected[big]).sum().item()
    assert stat < 3 * big.sum().item()  # chi-square with ~k degrees of freedom, far from its tail


def test_seeded_greedy_and_logprobs():
    x = logits()
    a, la = choose_tokens(x, 0.9, 50, 0.95, torch.Generator().manual_seed(11))
    b, lb = choose_tokens(x, 0.9, 50, 0.95, torch.Generator().manual_seed(11))
    assert torch.equal(a, b) and torch.equal(la, lb)
    greedy, lg = choose_tokens(x, 0.0, 0, 1.0, None)
    assert torch.equal(greedy, x.argmax(-1))
    k1, _ = choose_tokens(x, 1.3, 1, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(k1, greedy)
    assert torch.allclose(lg, torch.log_softmax(x, -1).gather(-1, greedy[:, None])[:, 0])


def test_padding_rows_are_never_chosen():
    """A model's embedding is padded past the tokenizer's ids: those rows are masked when choosing, while
    the log-probability stays the model's own (over every row, as the trainer computes it)."""
    x = logits()
    x[:, 290:] = 50.0  # the padding rows would win every draw
    full = torch.log_softmax(x, -1)
    greedy, lp = choose_tokens(x, 0.0, 0, 1.0, None, vocab=290)
    assert torch.equal(greedy, x[:, :290].argmax(-1))
    assert torch.allclose(lp, full.gather(-1, greedy[:, None])[:, 0])
    sampled, _ = choose_tokens(x.repeat(50, 1), 1.0, 0, 0.9, torch.Generator().manual_seed(2), vocab=290)
    assert int(sampled.max()) < 290

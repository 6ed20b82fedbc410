"""Log-likelihood of continuations given contexts, on the Megatron model (multiple-choice evaluation).

For a pair (context ids, continuation ids) the model reads ``(context + continuation)[:-1]`` and the
score is the sum of the log-probabilities it gives the continuation's tokens, plus whether each of
them is the argmax (lm-evaluation-harness's ``loglikelihood`` request and its ``is_greedy``). An empty
context is replaced by EOS, as lm-eval does; a pair longer than the context window keeps its last
``max_length`` input tokens. Pairs are batched by length (right-padded; padding never reaches a
scored position under causal attention) with at most ``max_batch_tokens`` per forward pass, through
megatron's inference wrapper (one prefill step of a fresh ``StaticInferenceContext``, all positions'
logits gathered over TP). Under pipeline parallelism the last stage computes the scores and
broadcasts them, so every rank returns the same list.
"""
from typing import List, Sequence, Tuple

import torch
from megatron.core.inference.communication_utils import (
    broadcast_from_last_pipeline_stage,
    is_pipeline_last_stage,
)
from megatron.core.inference.contexts import StaticInferenceContext


def _inputs(ctx: Sequence[int], cont: Sequence[int], eod: int, max_length: int) -> Tuple[List[int], int]:
    """(model input ids, number of scored positions at its end)."""
    if not cont:
        raise ValueError("a log-likelihood request needs a non-empty continuation")
    whole = (list(ctx) or [eod]) + list(cont)
    inputs = whole[:-1][-max_length:]
    return inputs, len(cont)


@torch.inference_mode()
def loglikelihood(wrapper, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], *, eod: int, max_length: int,
                  max_batch_tokens: int = 8192) -> List[Tuple[float, bool]]:
    """[(sum log p(continuation | context), continuation is greedy)] in the order of ``pairs``."""
    prepared = [_inputs(c, x, eod, max_length) + (list(x),) for c, x in pairs]
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    results: List[Tuple[float, bool]] = [(0.0, False)] * len(prepared)
    wrapper.prep_model_for_inference()
    i = 0
    while i < len(order):
        longest = len(prepared[order[i]][0])
        size = max(1, min(len(order) - i, max_batch_tokens // longest))
        chunk = order[i:i + size]
        for index, value in zip(chunk, _score_batch(wrapper, [prepared[j] for j in chunk], longest, eod)):
            results[index] = value
        i += size
    return results


def _score_batch(wrapper, items, length: int, eod: int) -> List[Tuple[float, bool]]:
    tokens = torch.full((len(items), length), eod, dtype=torch.long)
    for row, (inputs, _, _) in enumerate(items):
        tokens[row, :len(inputs)] = torch.tensor(inputs)
    device = next(wrapper.model.parameters()).device
    tokens = tokens.to(device)
    wrapper.inference_context = StaticInferenceContext(len(items), length)
    wrapper.inference_context.materialize_only_last_token_logits = False
    logits = wrapper.run_one_forward_step(wrapper.prep_inference_input(tokens))
    scores = None
    if is_pipeline_last_stage(wrapper.pp_group):
        scores = torch.zeros(len(items), 2, dtype=torch.float64, device=device)
        for row, (inputs, n, cont) in enumerate(items):
            end = len(inputs)
            logp = torch.log_softmax(logits[row, end - n:end].float(), dim=-1)
            target = torch.tensor(cont, device=device)
            scores[row, 0] = logp.gather(-1, target.unsqueeze(-1)).sum().double()
            scores[row, 1] = float(bool((logp.argmax(-1) == target).all()))
    if not (is_pipeline_last_stage(wrapper.pp_group) and wrapper.pp_group.size() == 1):
        scores = broadcast_from_last_pipeline_stage([len(items), 2], torch.float64, scores, wrapper.pp_group)
    return [(float(s[0]), bool(s[1] > 0.5)) for s in scores.tolist()]

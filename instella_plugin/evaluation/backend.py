"""What the evaluator needs from a model, and how its work is split over data-parallel ranks.

A backend offers ``tokenizer`` (Hugging Face), ``max_length`` (context in tokens), ``batch_size``,
``loglikelihood(pairs) -> [(logprob, is_greedy)]`` for ``(context_ids, continuation_ids)`` pairs
scored in one batch, ``generate(prompts, params) -> [Completion]`` (the ``inference.api`` seam) and
its data-parallel group (``dp_rank``, ``dp_size``, ``gather(obj) -> [obj of each rank]``).

``run_sharded`` makes results independent of the layout: the global list of requests is sorted by
length and cut into batches the same way for every data-parallel size, batch ``b`` runs on rank
``b % dp_size``, and every rank gets all results back in the original order.
"""
from typing import Callable, List, Protocol, Sequence, Tuple

import torch

from instella_plugin.inference.api import Completion, Prompt, SamplingParams


class Backend(Protocol):
    tokenizer: object
    max_length: int
    batch_size: int
    dp_rank: int
    dp_size: int
    description: dict

    def loglikelihood(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        ...

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> List[Completion]:
        ...

    def gather(self, obj) -> list:
        ...


def torch_dp_group():
    """(rank, size, gather) over the default process group, or a single rank when none is initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1, lambda obj: [obj]
    size = torch.distributed.get_world_size()

    def gather(obj):
        out = [None] * size
        torch.distributed.all_gather_object(out, obj)
        return out

    return torch.distributed.get_rank(), size, gather


def score_pairs(logits: torch.Tensor, inputs: List[List[int]], continuations: List[List[int]]) -> List[Tuple[float, bool]]:
    """(sum of log-probabilities, all tokens greedy) of each continuation.

    ``logits[b, t]`` predicts token t + 1 of row b; row b holds ``inputs[b]`` (right-padded) whose
    last ``len(continuations[b])`` predictions are the continuation's tokens.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for b, (inp, cont) in enumerate(zip(inputs, continuations)):
        start = len(inp) - len(cont)
        rows = logprobs[b, start:len(inp)]                               # [cont_len, vocab]
        target = torch.tensor(cont, dtype=torch.long, device=rows.device)
        ll = rows.gather(-1, target[:, None]).squeeze(-1).sum().item()
        greedy = bool((rows.argmax(-1) == target).all().item())
        out.append((ll, greedy))
    return out


def model_inputs(pairs, max_length: int) -> Tuple[List[List[int]], List[List[int]]]:
    """The model input of each pair: context + continuation without its last token (lm-eval's layout)."""
    inputs, conts = [], []
    for ctx, cont in pairs:
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        inputs.append(whole[:-1])
        conts.append(list(cont))
    return inputs, conts


def run_sharded(fn: Callable[[list], list], items: list, lengths: Sequence[int], batch_size: int,
                dp_rank: int, dp_size: int, gather, progress: Callable[[int, int, int], None] = None) -> list:
    """``fn`` over ``items`` in length-sorted batches, batch b on rank b % dp_size; all results, in order."""
    order = sorted(range(len(items)), key=lambda i: (-lengths[i], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine, share = {}, sum(len(batches[b]) for b in range(dp_rank, len(batches), dp_size))
    for b in range(dp_rank, len(batches), dp_size):
        results = fn([items[i] for i in batches[b]])
        if len(results) != len(batches[b]):
            raise RuntimeError(f"backend returned {len(results)} results for {len(batches[b])} requests")
        mine.update(zip(batches[b], results))
        if progress is not None:
            progress(len(mine), share, len(items))
    merged = {}
    for part in gather(mine):
        merged.update(part)
    return [merged[i] for i in range(len(items))]

"""megatron-core's text-generation controller, with what Instella's generator needs on top.

``InstellaTextGenerationController`` is megatron-core's ``TextGenerationController`` and keeps its
static-batch loop (a prefill, then one token per step with the KV cache of a
``StaticInferenceContext``). Megatron's loop prefills only up to the shortest prompt and then forces
the longer prompts' own tokens one step at a time; this controller left-pads a ragged batch to its
longest prompt instead, so every prompt is read in one prefill: the context carries each row's
padding (``patches.CachedRope``, ``context.instella_rope``), RoPE gives every row its own positions
(the padding does not shift them) and the wrapper (``engine.InstellaInferenceWrapper``) hides the
padding from attention, so each row computes what it would alone. It changes three hooks of that
loop:

- ``sample_from_logits``: temperature, top-k and top-p together (``sampling.choose_tokens``, the
  order of transformers' processors) from the controller's seeded ``sampling_rng``, never an id the
  tokenizer does not have (the embedding's padding rows), and the model's log-probability of every
  chosen token (megatron's own ``return_log_probs`` materialises the
  ``[batch, prompt, vocab]`` log-softmax of every prompt, which a rollout does not need);
- ``update_generation_status``: records each row's token and log-probability by position (the
  trace the completions are cut from), ends a row at its ``max_new_tokens`` or at a stop string as
  well as at EOS, and reports new tokens to a streaming callback;
- ``generate_all_output_tokens_static_batch``: left-pads a ragged batch and marks the context (above),
  sets the trace up around megatron's loop and hands
  each request its trace (``request.instella_trace``: tokens and log-probabilities from the first
  generated position, at most ``max_new_tokens``).

Ending rows early only saves work; the generator (``engine.py``) cuts EOS and stop strings from the
trace, so the result does not depend on when the loop stopped.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)

from instella_plugin.inference.api import SamplingParams
from instella_plugin.inference.patches import CachedRope
from instella_plugin.inference.sampling import choose_tokens

OnToken = Callable[[int, int], None]  # (request id, token id)


class InstellaTextGenerationController(TextGenerationController):
    """megatron-core's controller with combined filters, per-token log-probabilities and stop strings."""

    params: SamplingParams = SamplingParams()
    on_token: Optional[OnToken] = None
    _step_logprobs: Optional[torch.Tensor] = None
    sample_vocab: Optional[int] = None  # ids at or above it (the embedding's padding rows) are never chosen

    def start(self, params: SamplingParams, on_token: Optional[OnToken] = None) -> None:
        """Before a ``generate``: the sampling settings, the stream callback, and the seed."""
        self.params, self.on_token = params, on_token
        self.sampling_rng.manual_seed(int(params.seed))

    # ---- the loop's hooks -------------------------------------------------------------------------------
    def sample_from_logits(self, last_token_logits, sampling_params=None, vocab_size=None,
                           generation_started=None, top_n_logprobs_dict=None, logits=None, **kwargs):
        p = self.params
        tokens, self._step_logprobs = choose_tokens(last_token_logits, p.temperature, p.top_k, p.top_p,
                                                    self.sampling_rng, vocab=self.sample_vocab)
        return tokens

    def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                 is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
        was_done = is_generation_done_tensor.clone()
        done, lengths = super().update_generation_status(
            updated_prompts_tokens, generation_started, current_context_end_position, is_generation_done_tensor,
            generated_sequence_lengths, termination_id)
        pos = current_context_end_position
        active = (generation_started & ~was_done).tolist()
        tokens, logprobs = updated_prompts_tokens[:, pos].tolist(), self._step_logprobs.tolist()  # one copy a step
        ended = []
        for r in (r for r, a in enumerate(active) if a):
            if pos - self._prompt_lengths[r] >= self.params.max_new_tokens:
                ended.append(r)
                continue
            self._trace_tokens[r].append(tokens[r])
            self._trace_logprobs[r].append(logprobs[r])
            if self.on_token is not None:
                self.on_token(self._request_ids[r], tokens[r])
            if len(self._trace_tokens[r]) >= self.params.max_new_tokens or self._hits_stop(r):
                ended.append(r)
        if ended:
            done[ended] = True
        return done, lengths

    @torch.inference_mode()
    def generate_all_output_tokens_static_batch(self, active_requests, active_streams=None):
        requests = list(active_requests.values())
        prompts = [r.prompt_tokens for r in requests]
        longest = max(len(p) for p in prompts)
        pads = [longest - len(p) for p in prompts]
        if any(pads):  # left-pad to the longest (the row's first token; hidden by the mask), one prefill
            for r, p, n in zip(requests, prompts, pads):
                r.prompt_tokens = [p[0]] * n + list(p)
        context = self.inference_wrapped_model.inference_context
        context.instella_rope = CachedRope(torch.tensor(pads, dtype=torch.long) if any(pads) else None)
        self._prompt_lengths = [len(r.prompt_tokens) for r in requests]
        self._trace_tokens: List[List[int]] = [[] for _ in requests]
        self._trace_logprobs: List[List[float]] = [[] for _ in requests]
        self._request_ids = [r.request_id for r in requests]
        try:
            result = super().generate_all_output_tokens_static_batch(active_requests, active_streams)
        finally:
            del context.instella_rope
            for r, p in zip(requests, prompts):
                r.prompt_tokens = p
        for r, request in enumerate(requests):
            request.instella_trace = (tuple(self._trace_tokens[r]), tuple(self._trace_logprobs[r]))
        return result

    # ---- stop strings ---------------------------------------------------------------------------------
    def _hits_stop(self, row: int) -> bool:
        stops = self.params.stop
        if not stops:
            return False
        tokens = self._trace_tokens[row]
        window = max(len(s) for s in stops) + 8  # a token holds at least one character, bar split UTF-8
        if not any(s in self._decode(tokens[-window:]) for s in stops):
            return False
        return find_stop(self._decode(tokens), stops) is not None

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.detokenize(list(tokens))


def find_stop(text: str, stops: Sequence[str]) -> Optional[Tuple[int, str]]:
    """(end of the earliest stop string in ``text``, that string), or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best[0]):
            best = (i + len(s), s)
    return best

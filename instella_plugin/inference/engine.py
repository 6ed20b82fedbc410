"""The Megatron generator: megatron-core's inference engine on an Instella model, as a ``TextGenerator``.

``MegatronGenerator(model, tokenizer)`` wraps a model *in place* (no copy): a ``GPTModel`` chunk (or a
one-chunk list, DDP-wrapped or not) that a trainer keeps training between calls, or one that
``loading.load_generator`` built from a checkpoint. Each ``generate`` runs megatron-core's stack:
``GPTInferenceWrapper`` over the model with a fresh ``StaticInferenceContext`` (the KV cache, sized
for this call), the ``InstellaTextGenerationController`` (``controller.py``) and a
``StaticInferenceEngine`` that schedules the requests in batches of ``max_batch_size``. Prompts of
different lengths share a batch (left-padded to the longest and read in one prefill, see
``controller.py``); they are grouped by length so a batch wastes little. The wrapper
(``InstellaInferenceWrapper``) hides each row's padding from attention and runs the forward steps
without the CPU mode's function mode; RoPE is applied once per new position before keys are cached
(``patches.ENGINE``, applied on construction, which also runs megatron's tensor-parallel
layers without their autograd Functions under ``torch.inference_mode``).

Every tensor-parallel and pipeline rank calls ``generate`` with the same prompts and gets the same
completions (logits are gathered over TP and broadcast from the last stage; every rank samples with
the same seed). ``loglikelihood`` scores (context, continuation) pairs with one forward pass each
(``scoring.py``). The model is handed back as it was after each call (train/eval mode, sequence
parallelism, which megatron's static inference runs without), and RoPE tables cached while
generating (megatron caches them by length) are dropped, so a training step after a rollout never
meets a tensor made under ``torch.inference_mode``.
"""
import bisect
import contextlib
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.engines.static_engine import StaticInferenceEngine
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
from megatron.core.inference.sampling_params import SamplingParams as MegatronSamplingParams
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from instella_plugin import cpu_mode
from instella_plugin.inference.api import Completion, Prompt, SamplingParams
from instella_plugin.inference.controller import InstellaTextGenerationController, find_stop
from instella_plugin.inference.megatron_tokenizer import MegatronTokenizerAdapter
from instella_plugin.inference.patches import ENGINE
from instella_plugin.inference.prompts import check_fits, prompt_ids
from instella_plugin.inference.scoring import loglikelihood
from instella_plugin.training.model_setup import unwrap


class InstellaInferenceWrapper(GPTInferenceWrapper):
    """megatron's GPT inference wrapper with two changes for the generator's controller:

    - a left-padded batch (the context carries ``instella_rope`` with each row's padding) gets, at each
      step, an attention mask ``[batch, 1, new positions, cached positions]`` that hides every row's
      padding (and the future, in the prefill); equal lengths keep megatron's mask-free path;
    - the forward step runs without the CPU mode's function mode (``cpu_mode.function_mode_suspended``):
      a forward makes no CUDA device requests, and the mode's hook on each of its ~600 torch calls a
      step was a fifth of a small model's decode step.
    """

    def get_batch_for_context_window(self, inference_input, context_start_position, context_end_position):
        batch = super().get_batch_for_context_window(inference_input, context_start_position, context_end_position)
        rope = getattr(self.inference_context, "instella_rope", None)
        if rope is not None and rope.pads is not None:
            batch["attention_mask"] = rope.mask(context_start_position, context_end_position)
        return batch

    def run_one_forward_step(self, inference_input):
        with cpu_mode.function_mode_suspended():
            return super().run_one_forward_step(inference_input)


class MegatronGenerator:
    """``generate(prompts, params) -> [Completion]`` and ``loglikelihood(pairs)`` on a megatron GPTModel."""

    def __init__(self, model, tokenizer, *, max_sequence_length: Optional[int] = None, max_batch_size: int = 16,
                 chat: bool = False):
        chunks = model if isinstance(model, (list, tuple)) else [model]
        if len(chunks) != 1:
            raise ValueError(f"generation takes one model chunk per rank, got {len(chunks)} (megatron-core's "
                             "inference does not run interleaved pipeline stages); build the model without "
                             "--num-layers-per-virtual-pipeline-stage to generate from it")
        self.model = unwrap(chunks[0])
        self.config = self.model.config
        self.tokenizer = tokenizer
        self.chat = chat
        self.max_batch_size = int(max_batch_size)
        self.max_sequence_length = int(max_sequence_length or self.model.max_sequence_length)
        self.vocab_size = self.model.vocab_size
        self.wrapper_config = InferenceWrapperConfig(
            hidden_size=self.config.hidden_size, params_dtype=self.config.params_dtype,
            inference_batch_times_seqlen_threshold=-1, padded_vocab_size=self.vocab_size,
            inference_max_requests=self.max_batch_size, inference_max_seq_length=self.max_sequence_length)
        ENGINE.apply()  # RoPE once per new position, no autograd Functions in inference mode (patches.py)
        self.wrapper = InstellaInferenceWrapper(self.model, self.wrapper_config, StaticInferenceContext(1, 1))
        self.controller = InstellaTextGenerationController(self.wrapper, MegatronTokenizerAdapter(tokenizer))
        self.controller.sample_vocab = min(len(tokenizer), self.vocab_size)

    # ---- prompts --------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt) -> List[int]:
        """Token ids of a prompt: ids as given; text encoded, through the chat template when ``chat``."""
        ids = prompt_ids(self.tokenizer, prompt, self.chat) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("an empty prompt: give at least one token (the generator continues a prompt)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary of {self.vocab_size}")
        return ids

    def check_fits(self, ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        check_fits(ids, max_new_tokens, self.max_sequence_length)

    # ---- generation ---------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 on_token: Optional[Callable[[int, int], None]] = None) -> List[Completion]:
        """One completion per prompt, in order. ``on_token(prompt index, token id)`` streams tokens."""
        ids = [self.prompt_ids(p) for p in prompts]
        self.check_fits(ids, params.max_new_tokens)
        if not ids:
            return []
        traces = self._run(ids, params, on_token)
        return [self._complete(p, *traces[i], params) for i, p in enumerate(ids)]

    def _run(self, ids: List[List[int]], params: SamplingParams, on_token) -> List[Tuple[tuple, tuple]]:
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # batches of similar lengths
        batch = min(self.max_batch_size, len(ids))
        self.wrapper.inference_context = StaticInferenceContext(
            batch, max(len(p) for p in ids) + params.max_new_tokens)
        megatron_params = MegatronSamplingParams(num_tokens_to_generate=params.max_new_tokens)
        megatron_params.add_attributes({"no_early_termination": not params.stop_at_eos})
        self.controller.start(params, on_token)
        requests = [InferenceRequest(request_id=i, prompt="", sampling_params=megatron_params, prompt_tokens=ids[i])
                    for i in order]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*static engine will be deprecated.*")
            engine = StaticInferenceEngine(self.controller, max_batch_size=batch, legacy=True)
        with self._borrowed_model():
            done = engine.generate(inference_requests=requests)
        by_id = {r.request_id: r.instella_trace for r in done}
        return [by_id[i] for i in range(len(ids))]

    def _complete(self, prompt: List[int], tokens: tuple, logprobs: tuple, params: SamplingParams) -> Completion:
        """Cut a row's trace at EOS (kept in the tokens) or after the first stop string."""
        reason = "length"
        eod = self.controller.tokenizer.eod
        if params.stop_at_eos and eod in tokens:
            n = tokens.index(eod) + 1
            tokens, logprobs, reason = tokens[:n], logprobs[:n], "eos"
        text = self._decode(tokens)
        hit = find_stop(text, params.stop) if params.stop else None
        if hit is not None:
            end = hit[0]  # the fewest tokens whose text reaches the stop string's end (prefix text only grows)
            n = bisect.bisect_left(range(1, len(tokens) + 1), end, key=lambda k: len(self._decode(tokens[:k]))) + 1
            tokens, logprobs, text, reason = tokens[:n], logprobs[:n], text[:end], "stop"
        return Completion(prompt_tokens=tuple(prompt), tokens=tuple(tokens), text=text, finish_reason=reason,
                          logprobs=tuple(logprobs))

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    @contextlib.contextmanager
    def _borrowed_model(self):
        """Run inference on the model, then hand it back as it was: train/eval mode, sequence parallelism
        (megatron's static inference runs without it; a model trained with it gets it back), no KV cache,
        and no RoPE tables cached under ``torch.inference_mode`` (megatron caches them by length)."""
        was_training, sequence_parallel = self.model.training, self.config.sequence_parallel
        if sequence_parallel:
            set_model_to_sequence_parallel(self.model, False)
        try:
            yield
        finally:
            self.wrapper.inference_context = StaticInferenceContext(1, 1)
            RotaryEmbedding.forward.cache_clear()
            if sequence_parallel:
                set_model_to_sequence_parallel(self.model, True)
            self.model.train(was_training)

    # ---- scoring ------------------------------------------------------------------------------------------
    def loglikelihood(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]],
                      max_batch_tokens: int = 8192) -> List[Tuple[float, bool]]:
        """For each (context ids, continuation ids): (sum of the continuation's log-probabilities given
        the context, whether greedy decoding would produce the continuation). See ``scoring.py``."""
        with self._borrowed_model():
            return loglikelihood(self.wrapper, pairs, eod=self.controller.tokenizer.eod,
                                 max_length=self.max_sequence_length, max_batch_tokens=max_batch_tokens)

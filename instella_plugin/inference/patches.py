"""Run-time patches of megatron-core's inference that the generator's callers opt into (the package's
patch registry, ``instella_plugin.patching``: each names its target, the version it was written for
and why; ``QUIET.describe()`` lists them).

``static_engine_progress_bar``: megatron's static engine draws a tqdm bar of finished requests on
stderr for every batch. ``instella generate --prompt`` streams the completion to the terminal, where
the bar would interleave with the text, so it applies this patch; a prompts file keeps the bar (its
progress and ETA).

``ENGINE`` (applied by every ``MegatronGenerator``): ``static_cache_rotated_keys``. megatron-core 0.16.1
keeps keys unrotated in its static KV cache and rotates the whole cache again at every decode step
(``Attention.forward`` after ``_adjust_key_value_for_inference``). For a context the generator's
controller marks (``context.instella_rope``, a ``CachedRope``), the new queries and keys are rotated
once, at their positions (each row's own position when its prompt is left-padded), with cos/sin
computed once per step for all layers and with megatron's own arithmetic (bit for bit the same
values), and the rotated keys are cached; megatron's later rotation is skipped. Any other context
(scoring, other callers, training) takes megatron's path unchanged. And three patches that, under
``torch.inference_mode`` only, run the forward arithmetic of megatron's tensor-parallel autograd
Functions (linear layers, TP copy and reduce) without ``Function.apply`` (see below).
"""
import functools
from typing import Optional

import torch

from instella_plugin.patching import PatchRegistry

QUIET = PatchRegistry("inference", package="megatron-core", version="0.16.1",
                      hint="update instella_plugin/inference/patches.py for the new code")


@QUIET.register("static_engine_progress_bar", "megatron.core.inference.engines.static_engine", "tqdm", wraps=False,
                reason="the per-batch progress bar would interleave with a completion streamed to the terminal; "
                       "created disabled")
def _disabled_progress_bar(original):
    return functools.partial(original, disable=True)


# ---- the generator's own: RoPE on the new positions only, and per-row positions for left padding ------
ENGINE = PatchRegistry("inference-engine", package="megatron-core", version="0.16.1",
                       hint="update instella_plugin/inference/patches.py for the new code")


class CachedRope:
    """What the generator's controller hangs on a ``StaticInferenceContext`` (``context.instella_rope``)
    for one batch: each row's left padding (``pads``, [batch] long, or None for a batch of equal
    lengths) and the cos/sin of the current step (every layer of a step shares them)."""

    def __init__(self, pads: Optional[torch.Tensor] = None):
        self.pads = pads
        self._key = None
        self._tables = None

    def tables(self, freqs: torch.Tensor, start: int, end: int, mscale: float, dtype: torch.dtype):
        """cos and sin ([s, 1 or batch, 1, rot_dim]) of positions ``start:end`` of the cache, each row
        at its own position (slot minus its padding, pads at 0) when the batch is left-padded; the same
        arithmetic as megatron's ``_apply_rotary_pos_emb_bshd``, so the values are bit for bit its own."""
        key = (freqs.data_ptr(), tuple(freqs.shape), start, end, float(mscale), dtype)
        if key != self._key:
            if self.pads is None:
                f = freqs[start:end]
            else:
                slots = torch.arange(start, end, device=freqs.device).unsqueeze(1)
                positions = (slots - self.pads.to(freqs.device).unsqueeze(0)).clamp_min(0)  # [s, b]
                f = freqs[:, 0, 0][positions].unsqueeze(2)
            self._tables = ((torch.cos(f) * mscale).to(dtype), (torch.sin(f) * mscale).to(dtype))
            self._key = key
        return self._tables

    def mask(self, start: int, end: int) -> torch.Tensor:
        """megatron's boolean attention mask (True: hidden) of cache positions ``start:end`` against
        ``0:end``: [batch, 1, end - start, end], each row's padding and every later position hidden."""
        keys = torch.arange(end, device=self.pads.device)
        queries = torch.arange(start, end, device=self.pads.device)
        future = keys.view(1, -1) > queries.view(-1, 1)  # [s, end]
        padding = keys.view(1, -1) < self.pads.view(-1, 1)  # [b, end]
        return (future.unsqueeze(0) | padding.unsqueeze(1)).unsqueeze(1)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as megatron's unfused ``_apply_rotary_pos_emb_bshd`` (not interleaved): the same operations."""
    rot = cos.shape[-1]
    x, rest = (t, None) if rot == t.shape[-1] else (t[..., :rot], t[..., rot:])
    x1, x2 = torch.chunk(x, 2, dim=-1)
    x = (x * cos) + (torch.cat((-x2, x1), dim=-1) * sin)
    return x if rest is None else torch.cat((x, rest), dim=-1)


@ENGINE.register("static_cache_rotated_keys", "megatron.core.transformer.attention",
               "Attention._adjust_key_value_for_inference",
               signature=("self", "inference_context", "query", "key", "value", "rotary_pos_emb", "rotary_pos_cos",
                          "rotary_pos_sin", "rotary_pos_cos_sin", "sequence_len_offset", "inference_params"),
               reason="megatron's static KV cache keeps keys before RoPE and rotates the whole cache again at "
                      "every decode step (O(cached positions) per layer and step); when the generator's "
                      "controller marks the context (context.instella_rope), the new query and keys are "
                      "rotated once, at their positions (each row's own when its prompt is left-padded), "
                      "before the keys are cached. Unmarked contexts (scoring, other callers) are unchanged")
def _rotate_before_caching(original):
    from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config

    def adjust(self, inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos=None,
               rotary_pos_sin=None, rotary_pos_cos_sin=None, sequence_len_offset=None, *, inference_params=None):
        rope = getattr(inference_context, "instella_rope", None)
        if (rope is None or rotary_pos_emb is None or self.training or self.config.flash_decode
                or self.config.rotary_interleaved or self.config.multi_latent_attention
                or self.config.apply_rope_fusion or not inference_context.is_static_batching()):
            return original(self, inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos,
                            rotary_pos_sin, rotary_pos_cos_sin, sequence_len_offset,
                            inference_params=inference_params)
        freqs = rotary_pos_emb[1] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        start = inference_context.sequence_len_offset
        cos, sin = rope.tables(freqs, start, start + key.size(0),
                               _yarn_get_concentration_factor_from_config(self.config), query.dtype)
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        query, key, value, _, mask_type, block_table = original(
            self, inference_context, query, key, value, None, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
            sequence_len_offset, inference_params=inference_params)
        return query, key, value, None, mask_type, block_table
    return adjust


# Under torch.inference_mode no graph is recorded, yet megatron's tensor-parallel layers still go through
# their autograd Functions (Function.apply: a context object, functorch's wrapper checks) for every
# linear layer and every copy/reduce of the tensor-parallel region: about 9 Function calls per layer and
# step, a tenth of a small model's decode step on the CPU. In inference mode these run the Functions'
# forward arithmetic directly (the same operations, so the same values); anything else is unchanged.
_LAYERS = "megatron.core.tensor_parallel.layers"
_WHY_FUNCTION = ("under torch.inference_mode the autograd Function adds only overhead (no graph is recorded); "
                 "its forward's operations run directly, bit for bit the same; outside inference mode unchanged")


@ENGINE.register("inference_linear_without_autograd", _LAYERS, "linear_with_grad_accumulation_and_async_allreduce",
                 signature=("input", "weight", "bias", "gradient_accumulation_fusion", "allreduce_dgrad",
                            "sequence_parallel", "grad_output_buffer", "wgrad_deferral_limit", "async_grad_allreduce",
                            "tp_group"),
                 reason="LinearWithGradAccumulationAndAsyncCommunication: " + _WHY_FUNCTION)
def _linear_in_inference(original):
    def linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
               grad_output_buffer=None, wgrad_deferral_limit=0, async_grad_allreduce=None, tp_group=None):
        if sequence_parallel or not torch.is_inference_mode_enabled():
            return original(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                            grad_output_buffer, wgrad_deferral_limit, async_grad_allreduce, tp_group)
        output = torch.matmul(input, weight.t())
        return output + bias if bias is not None else output
    return linear


@ENGINE.register("inference_tp_copy_without_autograd", _LAYERS, "copy_to_tensor_model_parallel_region",
                 signature=("input_", "group"), reason="_CopyToModelParallelRegion (forward: the input): " + _WHY_FUNCTION)
def _copy_in_inference(original):
    def copy_to(input_, group=None):
        return input_ if torch.is_inference_mode_enabled() else original(input_, group)
    return copy_to


@ENGINE.register("inference_tp_reduce_without_autograd", _LAYERS, "reduce_from_tensor_model_parallel_region",
                 signature=("input_", "group"),
                 reason="_ReduceFromModelParallelRegion (forward: all-reduce over TP): " + _WHY_FUNCTION)
def _reduce_in_inference(original):
    from megatron.core.tensor_parallel.mappings import _reduce
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    def reduce_from(input_, group=None):
        if not torch.is_inference_mode_enabled():
            return original(input_, group)
        return _reduce(input_, get_tensor_model_parallel_group_if_none(group))
    return reduce_from

"""The output layer and the cross-entropy fused over chunks of tokens, vocab-parallel over the TP group.

``fused_linear_cross_entropy(hidden [N, h], weight [V/TP, h], labels [N])`` returns the per-token
loss [N] (fp32) that megatron's ``ColumnParallelLinear`` + ``vocab_parallel_cross_entropy`` return,
without ever holding the [N, V/TP] logits: each chunk of tokens gets its logits against this rank's
vocabulary shard, the row max and the sum of exponentials are all-reduced over the TP group (as in
megatron's vocab-parallel cross-entropy), the chunk's loss and its softmax-minus-one-hot gradient are
formed, the gradients of the hidden states and of the weight are accumulated (fp32 for the weight),
and the chunk's logits are dropped. The idea (compute the gradients in the forward pass, chunk by
chunk) is Liger-Kernel's fused linear cross-entropy, here made tensor-parallel.

The gradient arriving in backward is per token (``g``: the caller's loss mask times a scale, or
anything else, e.g. DPO's per-sequence weights). The forward pass, when gradients are wanted,
precomputes the hidden-state gradient rows (exact for any ``g``: they scale row by row) and the
weight gradient for a uniform ``g = c``; backward adds ``(g_n - c)`` times the contribution of each
row whose gradient differs, recomputed from the stored row max and sum-exp (no communication).
Where that weight gradient goes:

- under megatron's ``DistributedDataParallel`` (the trainer), straight into the weight's ``main_grad``,
  as megatron's gradient-accumulation fusion does (the parameter's ``grad_added_to_main_grad`` flag is
  set and a never-read placeholder is returned, so DDP's hook adds nothing and still marks the
  parameter ready for the bucket's reduction). ``c`` is the gradient the caller expects most tokens
  to get (``expected_grad``: 1 under the trainer's per-token-sum loss, where ``g`` is the loss mask, so
  only masked rows are recomputed); None precomputes nothing and backward recomputes the rows with
  ``g != 0``;
- otherwise into an fp32 [V/TP, h] buffer for ``c = 1``, which backward rescales in place by the most
  frequent value of ``g`` (a mostly masked batch, ``c = 0``, recomputes only the rows that count).

Memory: megatron's loss turns the fp32 logits into their gradient in place, one [N, V/TP] fp32 buffer
from the output layer's forward to its backward (with bf16 weights also the bf16 logits, then their
bf16 gradient, beside it), plus a [V/TP, h] weight gradient in backward. This path holds one chunk
of logits at a time; under DDP nothing vocabulary-sized but the weight and its ``main_grad`` outlives a
chunk (the placeholder, the weight's size as in megatron's own fusion, lives only until DDP's hook drops
it, and on the CPU is never touched, so never resident); outside DDP the fp32 weight-gradient buffer
lives from the end of the forward pass to the output layer's backward. ``precompute=False`` computes
no gradient in the forward pass (one more matmul).

``FusedOutputLossGPTModel`` is megatron's ``GPTModel`` with this path when labels are given: it
returns the same per-token losses [b, s]; with no labels (evaluation, generation), inference,
multi-token prediction or deferred embedding weight-gradients it runs megatron's own post-processing
and returns logits. The output layer module, its weight and the checkpoint layout are unchanged.
"""
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

# Bytes of logits buffers one chunk may hold (the chunk's token count follows from V/TP and the dtype).
# Smaller chunks save memory but make the matmuls less efficient (on two CPU cores: +16% time for the
# logits matmul at 320 tokens a chunk, +7% at 1024, measured at hidden 1024).
DEFAULT_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}


def logit_bytes(dtype: torch.dtype) -> int:
    """Bytes a chunk holds per logit: the accumulation buffer (fp32; fp64 for fp64), plus one in the
    input dtype when that is narrower (``_ChunkBuffers``)."""
    acc = torch.promote_types(dtype, torch.float32)
    return acc.itemsize + (dtype.itemsize if dtype != acc else 0)


def chunk_tokens_for(vocab_local: int, device_type: str, chunk_bytes: Optional[int] = None,
                     dtype: torch.dtype = torch.float32) -> int:
    """Most tokens a chunk may hold: ``chunk_bytes`` of logits buffers for inputs of ``dtype``, a multiple of
    64 tokens (at least 64)."""
    budget = chunk_bytes or DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cuda"])
    return max(64, budget // (logit_bytes(dtype) * vocab_local) // 64 * 64)


def even_chunk(n: int, most: int) -> int:
    """Tokens a chunk so that ``n`` tokens split into equal chunks of at most ``most`` (no short last one)."""
    pieces = -(-n // most)
    return -(-n // pieces)


# The largest temporary (elements) of a mixed-precision weight-gradient product (bf16 in, fp32 accumulator),
# which is formed in blocks of vocabulary rows rather than as a whole [V/TP, h] tensor.
_MIXED_PRODUCT_ELEMS = 4 << 20


def _mm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc += alpha * a @ b (acc [m, n], a [m, k], b [k, n]). In one addmm when the dtypes agree;
    otherwise the product in a/b's dtype, block of rows by block of rows, added to the wider acc."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
        return
    rows = max(1, _MIXED_PRODUCT_ELEMS // max(1, b.shape[1]))
    for r in range(0, a.shape[0], rows):
        acc[r:r + rows].add_(a[r:r + rows] @ b, alpha=alpha)


def owns_main_grad(weight: torch.Tensor) -> bool:
    """Whether megatron's DDP keeps ``weight``'s gradient in ``main_grad`` (with its
    ``grad_added_to_main_grad`` flag): then the weight gradient can be accumulated there directly."""
    return hasattr(weight, "main_grad") and hasattr(weight, "grad_added_to_main_grad")


class _ChunkBuffers:
    """One [chunk, V_local] logits buffer (in the accumulation dtype, plus one in the input dtype when
    that is narrower) for every chunk of a call: a chunk's logits are written into the buffer the
    previous chunk's were dropped from. On the CPU a fresh tensor of this size is a fresh mmap whose
    pages the OS zeroes on first touch (slower than the matmul's own writes); on a GPU it saves the
    caching allocator nothing but costs nothing either."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, acc: torch.dtype, device):
        self.acc = torch.empty(rows, cols, dtype=acc, device=device)
        self.narrow = None if dtype == acc else torch.empty(rows, cols, dtype=dtype, device=device)

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``h @ weight.T`` in the accumulation dtype, in the buffer (a view of its first ``len(h)`` rows)."""
        out = self.acc[:h.shape[0]]
        if self.narrow is None:
            return torch.mm(h, weight.t(), out=out)
        return out.copy_(torch.mm(h, weight.t(), out=self.narrow[:h.shape[0]]))

    def in_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (a view of the accumulation buffer) in the input dtype: itself, or rounded into the narrow buffer."""
        return x if self.narrow is None else self.narrow[:x.shape[0]].copy_(x)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, chunk, precompute, into_main_grad, expected_grad):
        # hidden [N, h], weight [V_local, h], labels [N] (global vocabulary ids)
        n, v_local = hidden.shape[0], weight.shape[0]
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        local = labels - rank * v_local
        in_shard = (local >= 0) & (local < v_local)
        local = torch.where(in_shard, local, torch.zeros_like(local))
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
        loss = torch.empty(n, dtype=acc, device=hidden.device)
        row_max = torch.empty_like(loss)
        sum_exp = torch.empty_like(loss)
        want_w = ctx.needs_input_grad[1]
        into_main = want_w and into_main_grad
        need_h = precompute and ctx.needs_input_grad[0]
        # The weight gradient precomputed here, for a uniform per-token gradient ``pre_scale``: straight
        # into megatron's main_grad for the expected gradient, or into an fp32 buffer for 1 (rescaled in backward).
        pre_scale = 0.0
        grad_weight = None
        if want_w and precompute and into_main and expected_grad:
            grad_weight, pre_scale = weight.main_grad, float(expected_grad)
        elif want_w and precompute and not into_main:
            grad_weight, pre_scale = torch.zeros(weight.shape, dtype=acc, device=weight.device), 1.0
        grad_hidden = torch.empty_like(hidden) if need_h else None
        buffers = _ChunkBuffers(min(chunk, n), v_local, hidden.dtype, acc, hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e]
            logits = buffers.logits(h, weight)  # [c, V_local]
            m = logits.max(dim=-1).values
            if world > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            logits -= m.unsqueeze(-1)
            rows = torch.arange(e - s, device=hidden.device)
            pred = torch.where(in_shard[s:e], logits[rows, local[s:e]], torch.zeros_like(m))
            logits.exp_()
            se = logits.sum(dim=-1)
            if world > 1:
                both = torch.stack([pred, se])
                dist.all_reduce(both, group=group)
                pred, se = both[0], both[1]
            loss[s:e] = torch.log(se) - pred
            row_max[s:e], sum_exp[s:e] = m, se
            if need_h or grad_weight is not None:
                logits.div_(se.unsqueeze(-1))  # softmax
                logits[rows, local[s:e]] -= in_shard[s:e].to(logits.dtype)
                dl = buffers.in_dtype(logits)
                if need_h:
                    torch.mm(dl, weight, out=grad_hidden[s:e])
                if grad_weight is not None:
                    _mm_acc(grad_weight, dl.t(), h, alpha=pre_scale)
        ctx.save_for_backward(hidden, weight, local, in_shard, row_max, sum_exp, grad_hidden,
                              None if into_main else grad_weight)
        ctx.chunk, ctx.need_h, ctx.into_main, ctx.pre_scale = chunk, need_h, into_main, pre_scale
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local, in_shard, row_max, sum_exp, grad_hidden, grad_weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_loss.to(row_max.dtype).reshape(-1)
        dh = dw = None
        if need_h and ctx.need_h:
            dh = (grad_hidden.to(g.dtype) * g.unsqueeze(-1)).to(hidden.dtype)
            grad_hidden = None
        elif need_h:
            dh = torch.zeros_like(hidden)
        # The weight gradient: c * (precomputed, uniform gradient) + the rows whose gradient differs from c,
        # recomputed. Buffer: c is the most frequent gradient; main_grad: the one the forward pass assumed.
        c = ctx.pre_scale
        if need_w and grad_weight is not None:
            values, counts = torch.unique(g, return_counts=True)
            c = float(values[counts.argmax()])
            dw = grad_weight.mul_(c) if c != 0.0 else grad_weight.zero_()  # in place: the buffer becomes the gradient
            grad_weight = None
        elif need_w and ctx.into_main:
            dw = weight.main_grad
        elif need_w:
            dw = torch.zeros(weight.shape, dtype=g.dtype, device=weight.device)
        redo_h = need_h and not ctx.need_h
        differs = (g != c) if need_w else torch.zeros_like(g, dtype=torch.bool)
        redo = torch.nonzero(differs | (g != 0) if redo_h else differs).squeeze(-1)
        if redo.numel():
            _recompute(hidden, weight, local, in_shard, row_max, sum_exp, redo, g - c, g, ctx.chunk,
                       dw if need_w else None, dh if redo_h else None)
        if need_w and ctx.into_main:
            # megatron's gradient-accumulation-fusion protocol: the gradient is in main_grad; DDP's hook
            # sees the flag (adds nothing) and marks the parameter ready. The placeholder keeps that hook on
            # the backward thread; it is never read (never touched, so never resident, on the CPU).
            weight.grad_added_to_main_grad = True
            make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
            dw = make(weight.shape, dtype=weight.dtype, device=weight.device)
        elif dw is not None:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None, None, None


def _recompute(hidden, weight, local, in_shard, row_max, sum_exp, rows, w_weight, w_hidden, chunk, dw, dh):
    """Add the gradient rows ``rows`` again from the saved row max and sum-exp: into ``dw`` with the
    per-row weights ``w_weight``, into ``dh`` with ``w_hidden``."""
    buffers = _ChunkBuffers(min(chunk, rows.numel()), weight.shape[0], hidden.dtype, row_max.dtype, hidden.device)
    for s in range(0, rows.numel(), chunk):
        idx = rows[s:s + chunk]
        h = hidden[idx]
        logits = buffers.logits(h, weight)
        logits -= row_max[idx].unsqueeze(-1)
        logits.exp_()
        logits.div_(sum_exp[idx].unsqueeze(-1))
        r = torch.arange(idx.numel(), device=hidden.device)
        logits[r, local[idx]] -= in_shard[idx].to(logits.dtype)
        if dh is not None:
            dh[idx] = (logits * w_hidden[idx].unsqueeze(-1)).to(hidden.dtype) @ weight
        if dw is not None:
            _mm_acc(dw, (logits * w_weight[idx].unsqueeze(-1)).to(hidden.dtype).t(), h)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               group=None, chunk_tokens: Optional[int] = None,
                               precompute: Optional[bool] = None, main_grad: bool = False,
                               expected_grad: Optional[float] = 1.0) -> torch.Tensor:
    """Per-token cross-entropy [N] (fp32; fp64 for fp64 inputs) of ``hidden [N, h] @ weight.T`` against ``labels [N]``.

    ``weight`` is this rank's vocabulary shard (rows ``rank * V_local`` on, as megatron's
    ``ColumnParallelLinear``); ``group`` the TP group (None: no vocabulary parallelism). ``hidden``
    must already be what the output layer multiplies (gathered along the sequence under sequence
    parallelism); its gradient is this rank's partial sum, to be all-reduced by the caller's mapping.

    ``precompute``: form the gradients in the forward pass (None: whenever one is wanted); False
    recomputes every row's logits in backward instead (one more matmul, no gradient held from the
    forward pass). ``main_grad``: accumulate the weight gradient into ``weight.main_grad`` (megatron's
    DDP buffer, see ``owns_main_grad``; the weight must not be used elsewhere in the graph, e.g. tied to
    the embedding) and return a placeholder, as megatron's gradient-accumulation fusion does; with
    precomputation the forward pass adds the weight gradient for a per-token gradient of
    ``expected_grad`` there (the trainer's per-token-sum loss: 1 where the loss mask counts) and backward
    adds the difference for the rows that got another one (None: nothing added in forward; backward
    adds every row whose gradient is not zero).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be [N, h] and [V/TP, h]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: labels {tuple(labels.shape)} must be [{hidden.shape[0]}]")
    if main_grad and not owns_main_grad(weight):
        raise ValueError("fused_linear_cross_entropy: main_grad=True needs a weight whose gradient megatron's "
                         "DistributedDataParallel keeps (main_grad and grad_added_to_main_grad); wrap the model "
                         "in it or pass main_grad=False")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    chunk = even_chunk(hidden.shape[0], chunk_tokens or chunk_tokens_for(weight.shape[0], hidden.device.type,
                                                                         dtype=hidden.dtype))
    if precompute is None:
        precompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden.contiguous(), weight, labels.contiguous(), group, chunk, precompute,
                                          main_grad, expected_grad)


def output_layer_loss(output_layer, hidden_states: torch.Tensor, labels: torch.Tensor,
                      weight: Optional[torch.Tensor] = None, chunk_tokens: Optional[int] = None,
                      expected_grad: Optional[float] = 1.0) -> torch.Tensor:
    """Megatron's ``output_layer`` + ``compute_language_model_loss`` in one: hidden [s(/TP), b, h],
    labels [b, s] -> per-token loss [b, s]. The sequence-parallel gather (all-gather forward,
    reduce-scatter backward) or the TP copy (all-reduce backward) is the one ``ColumnParallelLinear`` does.

    ``weight``: a weight shared with the embedding (tied), else the layer's own. The layer's own weight,
    when megatron's DDP keeps its gradient, gets it accumulated straight into ``main_grad`` (see
    ``fused_linear_cross_entropy``, with ``expected_grad``); a shared one gets an ordinary gradient."""
    group = output_layer.tp_group
    main_grad = weight is None and owns_main_grad(output_layer.weight)
    weight = output_layer.weight if weight is None else weight
    if output_layer.sequence_parallel:
        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True,
                                                             group=group)
    elif group.size() > 1:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=group)
    s, b, h = hidden_states.shape
    flat_labels = labels.transpose(0, 1).reshape(-1)  # [b, s] -> [s * b], the order of hidden's rows
    loss = fused_linear_cross_entropy(hidden_states.reshape(s * b, h), weight, flat_labels, group, chunk_tokens,
                                      main_grad=main_grad, expected_grad=expected_grad)
    return loss.view(s, b).transpose(0, 1).contiguous()


def set_expected_loss_grad(model_chunks, value: Optional[float]) -> None:
    """Set ``expected_loss_grad`` on every ``FusedOutputLossGPTModel`` among (DDP-wrapped) model chunks."""
    for chunk in model_chunks:
        while not isinstance(chunk, GPTModel) and hasattr(chunk, "module"):
            chunk = chunk.module
        if isinstance(chunk, FusedOutputLossGPTModel):
            chunk.expected_loss_grad = value


class FusedOutputLossGPTModel(GPTModel):
    """megatron's GPTModel whose labelled forward runs the fused output layer + loss (see the module doc)."""

    def __init__(self, *args, output_chunk_tokens: Optional[int] = None, expected_loss_grad: Optional[float] = 1.0,
                 **kwargs):
        """``expected_loss_grad``: the gradient most tokens' losses will receive (``fused_linear_cross_entropy``'s
        ``expected_grad``): 1 under the trainer's per-token-sum loss (megatron's ``calculate_per_token_loss``:
        the gradient of each token's loss is its loss mask); None for objectives whose per-token gradients
        vary (DPO, GRPO). Any value gives the same gradients; a right one saves recomputation."""
        super().__init__(*args, **kwargs)
        self.output_chunk_tokens = output_chunk_tokens
        self.expected_loss_grad = expected_loss_grad

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if not self._fused_applies(labels, kwargs):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        return output_layer_loss(self.output_layer, hidden_states, labels, weight, self.output_chunk_tokens,
                                 self.expected_loss_grad)

    def _fused_applies(self, labels, kwargs) -> bool:
        return (labels is not None and self.post_process and not kwargs.get("mtp_in_postprocess")
                and self.config.mtp_num_layers is None and kwargs.get("inference_context") is None
                and self.embedding_activation_buffer is None and not self.config.cross_entropy_loss_fusion)

    def output_description(self) -> str:
        """For the trainer's ``model:`` line."""
        weight = self.output_layer.weight
        most = self.output_chunk_tokens or chunk_tokens_for(self.output_layer.output_size_per_partition,
                                                            weight.device.type if weight is not None else "cpu",
                                                            dtype=self.config.params_dtype)
        return f"fused linear + cross-entropy (--fused-output-loss, chunks of <= {most} tokens)"

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
weight gradient for a uniform ``g = 1``. Backward takes ``c``, the most frequent value of ``g``,
scales the precomputed weight gradient by ``c`` and adds ``(g_n - c)`` times the contribution of each
other row, recomputed from the stored row max and sum-exp (no communication). A loss mask of ones
costs nothing more; masked rows cost a recomputation proportional to their number; a mostly masked
batch (``c = 0``) recomputes only the rows that count.

Memory: megatron's loss turns the fp32 logits into their gradient in place (one [N, V/TP] buffer),
plus the transient weight gradient in backward. This path holds one chunk of logits and, with
precomputation, an fp32 [V/TP, h] weight-gradient buffer from the end of the forward pass (when every
activation is alive) through the output layer's backward, where it becomes the returned gradient in
place. ``precompute=False`` drops that buffer from the forward pass at the cost of one more matmul.
Saving more would take accumulating straight into megatron's ``main_grad`` (not done).

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

# Bytes of fp32 logits one chunk may hold (the chunk's token count follows from V/TP). Smaller chunks
# save memory but make the matmuls less efficient (on two CPU cores: +16% time for the logits matmul
# at 320 tokens a chunk, +7% at 1024, measured at hidden 1024).
DEFAULT_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}


def chunk_tokens_for(vocab_local: int, device_type: str, chunk_bytes: Optional[int] = None) -> int:
    """Most tokens a chunk may hold: ``chunk_bytes`` of fp32 logits, a multiple of 64 tokens (at least 64)."""
    budget = chunk_bytes or DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cuda"])
    return max(64, budget // (4 * vocab_local) // 64 * 64)


def even_chunk(n: int, most: int) -> int:
    """Tokens a chunk so that ``n`` tokens split into equal chunks of at most ``most`` (no short last one)."""
    pieces = -(-n // most)
    return -(-n // pieces)


def _mm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc (fp32 or fp64) += alpha * a @ b, the product in a/b's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
    else:
        acc.add_(a @ b, alpha=alpha)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, chunk, precompute):
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
        need_h, need_w = precompute and ctx.needs_input_grad[0], precompute and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e]
            logits = (h @ weight.t()).to(acc)  # [c, V_local]
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
            if need_h or need_w:
                logits.div_(se.unsqueeze(-1))  # softmax
                logits[rows, local[s:e]] -= in_shard[s:e].to(logits.dtype)
                dl = logits.to(hidden.dtype)
                del logits
                if need_h:
                    torch.mm(dl, weight, out=grad_hidden[s:e])
                if need_w:
                    _mm_acc(grad_weight, dl.t(), h)
        ctx.save_for_backward(hidden, weight, local, in_shard, row_max, sum_exp, grad_hidden, grad_weight)
        ctx.chunk, ctx.precomputed = chunk, (need_h, need_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local, in_shard, row_max, sum_exp, grad_hidden, grad_weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_loss.to(row_max.dtype).reshape(-1)
        dh = dw = None
        if need_h and ctx.precomputed[0]:
            dh = (grad_hidden.to(g.dtype) * g.unsqueeze(-1)).to(hidden.dtype)
            grad_hidden = None
        elif need_h:
            dh = torch.zeros_like(hidden)
        # The weight gradient: c * (precomputed, uniform g) + rows where g differs from c, recomputed.
        c = 0.0
        if need_w and ctx.precomputed[1]:
            values, counts = torch.unique(g, return_counts=True)
            c = float(values[counts.argmax()])
            dw = grad_weight.mul_(c) if c != 0.0 else grad_weight.zero_()  # in place: the buffer becomes the gradient
            grad_weight = None
        elif need_w:
            dw = torch.zeros(weight.shape, dtype=g.dtype, device=weight.device)
        redo = torch.nonzero(g != c).squeeze(-1)
        redo_h = need_h and not ctx.precomputed[0]
        if redo.numel() and (need_w or redo_h):
            _recompute(hidden, weight, local, in_shard, row_max, sum_exp, redo, g - c, g, ctx.chunk,
                       dw if need_w else None, dh if redo_h else None)
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None


def _recompute(hidden, weight, local, in_shard, row_max, sum_exp, rows, w_weight, w_hidden, chunk, dw, dh):
    """Add the gradient rows ``rows`` again from the saved row max and sum-exp: into ``dw`` with the
    per-row weights ``w_weight``, into ``dh`` with ``w_hidden``."""
    for s in range(0, rows.numel(), chunk):
        idx = rows[s:s + chunk]
        h = hidden[idx]
        logits = (h @ weight.t()).to(row_max.dtype)
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
                               precompute: Optional[bool] = None) -> torch.Tensor:
    """Per-token cross-entropy [N] (fp32; fp64 for fp64 inputs) of ``hidden [N, h] @ weight.T`` against ``labels [N]``.

    ``weight`` is this rank's vocabulary shard (rows ``rank * V_local`` on, as megatron's
    ``ColumnParallelLinear``); ``group`` the TP group (None: no vocabulary parallelism). ``hidden``
    must already be what the output layer multiplies (gathered along the sequence under sequence
    parallelism); its gradient is this rank's partial sum, to be all-reduced by the caller's mapping.
    ``precompute=False`` keeps no gradient from the forward pass (less memory: no fp32 [V/TP, h]
    buffer) and recomputes every row's logits in backward (one more matmul); None: precompute
    whenever a gradient is wanted.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be [N, h] and [V/TP, h]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: labels {tuple(labels.shape)} must be [{hidden.shape[0]}]")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    chunk = even_chunk(hidden.shape[0], chunk_tokens or chunk_tokens_for(weight.shape[0], hidden.device.type))
    if precompute is None:
        precompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden.contiguous(), weight, labels.contiguous(), group, chunk, precompute)


def output_layer_loss(output_layer, hidden_states: torch.Tensor, labels: torch.Tensor,
                      weight: Optional[torch.Tensor] = None, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Megatron's ``output_layer`` + ``compute_language_model_loss`` in one: hidden [s(/TP), b, h],
    labels [b, s] -> per-token loss [b, s]. The sequence-parallel gather (all-gather forward,
    reduce-scatter backward) or the TP copy (all-reduce backward) is the one ``ColumnParallelLinear`` does."""
    group = output_layer.tp_group
    weight = output_layer.weight if weight is None else weight
    if output_layer.sequence_parallel:
        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True,
                                                             group=group)
    elif group.size() > 1:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=group)
    s, b, h = hidden_states.shape
    flat_labels = labels.transpose(0, 1).reshape(-1)  # [b, s] -> [s * b], the order of hidden's rows
    loss = fused_linear_cross_entropy(hidden_states.reshape(s * b, h), weight, flat_labels, group, chunk_tokens)
    return loss.view(s, b).transpose(0, 1).contiguous()


class FusedOutputLossGPTModel(GPTModel):
    """megatron's GPTModel whose labelled forward runs the fused output layer + loss (see the module doc)."""

    def __init__(self, *args, output_chunk_tokens: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_chunk_tokens = output_chunk_tokens

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if not self._fused_applies(labels, kwargs):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        return output_layer_loss(self.output_layer, hidden_states, labels, weight, self.output_chunk_tokens)

    def _fused_applies(self, labels, kwargs) -> bool:
        return (labels is not None and self.post_process and not kwargs.get("mtp_in_postprocess")
                and self.config.mtp_num_layers is None and kwargs.get("inference_context") is None
                and self.embedding_activation_buffer is None and not self.config.cross_entropy_loss_fusion)

    def output_description(self) -> str:
        """For the trainer's ``model:`` line."""
        weight = self.output_layer.weight
        most = self.output_chunk_tokens or chunk_tokens_for(self.output_layer.output_size_per_partition,
                                                            weight.device.type if weight is not None else "cpu")
        return f"fused linear + cross-entropy (--fused-output-loss, chunks of <= {most} tokens)"

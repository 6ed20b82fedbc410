"""Local core attention with packed documents and a2a context parallelism (the ``instella`` spec's).

``InstellaDotProductAttention`` is megatron's ``DotProductAttention`` plus two things the local
backend lacks (megatron's own asserts ``packed_seq_params is None`` and ``context_parallel_size == 1``):

* **Packed documents.** Boundaries come as megatron ``PackedSeqParams`` (cumulative lengths
  ``cu_seqlens_q``); each document attends causally to itself only. Design: the batch keeps the
  ordinary ``[s, b]`` layout (``qkv_format='sbhd'``); ``cu_seqlens`` index the flattened
  ``b * s`` tokens, and every sample boundary is also a document boundary. In this layout megatron's
  attention leaves q/k/v as ``[s, b, heads, d]`` and applies RoPE by position in the sample, so
  positions run on across documents (not reset), as Instella-Long trains; ``max_seqlen_q`` is set
  to ``s`` because GPTModel sizes its RoPE table from it. ``qkv_format='thd'`` (one sample,
  ``[t, heads, d]``, the layout TE's varlen kernels take) is accepted too at CP 1; build it with
  ``max_seqlen_q = t`` so megatron's thd RoPE also keeps positions running on.
  Memory: one ``scaled_dot_product_attention(is_causal=True)`` call per document (torch's
  flash/memory-efficient kernels on CPU and GPU), so no ``[s, s]`` mask or score matrix is built.
* **Context parallelism** (``--cp-comm-type a2a``): see ``context_parallel``; the all-to-all runs
  here, after megatron has applied the QK-norm and RoPE to the local tokens.

Ordinary (unpacked, CP 1) causal batches, and the decode steps of megatron's inference (one query
per row against its KV cache, which megatron marks ``no_mask``), take the same fused
``scaled_dot_product_attention`` path as one document per row, instead of megatron's dense ``[b*n, s, s]`` scores (same function,
less memory, faster on CPU and GPU); anything that path does not cover (explicit masks, attention
bias, dropout, softmax offsets) goes to megatron's ``DotProductAttention.forward``. With Transformer Engine the ``instella-te``
spec uses TE's attention, whose thd and CP paths take the same ``PackedSeqParams`` and flags.
"""
import copy
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from instella_plugin.model.context_parallel import (
    check_cp_layout,
    heads_to_sequence,
    sequence_to_heads,
)


# ---- building packed-sequence parameters ---------------------------------------------------------
def cu_seqlens_from_tokens(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Cumulative document lengths over the flattened [b, s] tokens; a document ends *with* EOD.

    Each row also ends a document (rows never share one). Returns int32 [num_docs + 1].
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    b, s = tokens.shape
    ends = (tokens == eod_id).clone()
    ends[:, -1] = True
    flat_end = torch.nonzero(ends.reshape(-1), as_tuple=False).flatten() + 1
    return torch.cat([torch.zeros(1, dtype=torch.long, device=tokens.device), flat_end]).to(torch.int32)


def packed_seq_params_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int, batch: int = 1,
                                      qkv_format: str = "sbhd") -> PackedSeqParams:
    """PackedSeqParams for documents given by ``cu_seqlens`` over ``batch`` rows of ``seq_len``."""
    cu = cu_seqlens.to(torch.int32)
    check_cu_seqlens(cu, seq_len, batch)
    if qkv_format not in ("sbhd", "thd"):
        raise ValueError(f"qkv_format must be 'sbhd' or 'thd', got {qkv_format!r}")
    if qkv_format == "thd" and batch != 1:
        raise ValueError(f"the 'thd' layout holds one packed row; got batch {batch} (use 'sbhd')")
    # max_seqlen = the row length: GPTModel sizes its RoPE table from it, positions run on.
    return PackedSeqParams(qkv_format=qkv_format, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=seq_len, max_seqlen_kv=seq_len)


def packed_seq_params_from_tokens(tokens: torch.Tensor, eod_id: int = 0,
                                  qkv_format: str = "sbhd") -> PackedSeqParams:
    """PackedSeqParams for a [b, s] token batch whose documents end with ``eod_id`` (Instella: 0).

    Build it from the *full* batch, before ``batch_for_cp_rank`` slices the tokens for CP.
    """
    return packed_seq_params_from_cu_seqlens(cu_seqlens_from_tokens(tokens, eod_id), tokens.shape[1],
                                             tokens.shape[0], qkv_format)


def check_cu_seqlens(cu: torch.Tensor, seq_len: int, batch: int) -> None:
    vals = cu.tolist()
    total = seq_len * batch
    problem = None
    if cu.dim() != 1 or len(vals) < 2 or vals[0] != 0:
        problem = "must be a 1-D tensor starting at 0"
    elif any(b <= a for a, b in zip(vals, vals[1:])):
        problem = "must be strictly increasing (no empty documents)"
    elif vals[-1] != total:
        problem = f"must end at batch x seq = {total}, ends at {vals[-1]}"
    elif not set(range(0, total + 1, seq_len)) <= set(vals):
        problem = f"must contain every row boundary (multiples of {seq_len}): rows never share a document"
    if problem:
        raise ValueError(f"bad cu_seqlens {vals[:8]}{'...' if len(vals) > 8 else ''}: {problem}")


def document_segments(psp: PackedSeqParams, seq_len: int, batch: int) -> List[List[Tuple[int, int]]]:
    """Per row, the (start, end) of each document within the row."""
    if psp.cu_seqlens_q_padded is not None and not torch.equal(psp.cu_seqlens_q_padded, psp.cu_seqlens_q):
        raise ValueError("padded cu_seqlens (cu_seqlens_q_padded) are not supported by the local attention")
    if psp.cu_seqlens_kv is not None and not torch.equal(psp.cu_seqlens_kv, psp.cu_seqlens_q):
        raise ValueError("self-attention needs cu_seqlens_kv equal to cu_seqlens_q")
    cu = psp.cu_seqlens_q
    check_cu_seqlens(cu, seq_len, batch)
    vals = cu.tolist()
    rows: List[List[Tuple[int, int]]] = [[] for _ in range(batch)]
    for a, e in zip(vals, vals[1:]):
        rows[a // seq_len].append((a % seq_len, e - (a // seq_len) * seq_len))
    return rows


# ---- the attention module -------------------------------------------------------------------------
class InstellaDotProductAttention(DotProductAttention):
    """megatron DotProductAttention + packed documents (sbhd/thd) + Ulysses a2a CP in the local backend."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        cp_size = config.context_parallel_size
        base_config = config
        if cp_size > 1:
            if cp_comm_type not in (None, "a2a"):
                raise ValueError(f"the local attention implements --cp-comm-type a2a only, got {cp_comm_type!r}; "
                                 "use a2a, or the instella-te spec (Transformer Engine) for p2p/all_gather")
            base_config = copy.copy(config)  # megatron's class asserts CP 1; CP is handled here
            base_config.context_parallel_size = 1
        super().__init__(base_config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        self.cp_group = getattr(self.pg_collection, "cp", None) if cp_size > 1 else None
        if cp_size > 1 and self.cp_group is None:
            self.cp_group = parallel_state.get_context_parallel_group()
        self.cp_size = cp_size
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if cp_size > 1:
            check_cp_layout(2 * cp_size, cp_size, self.num_attention_heads_per_partition,
                            self.num_query_groups_per_partition)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        problems = self._unsupported(attention_mask, attn_mask_type, attention_bias)
        if self._is_cached_decode(query, key, attention_mask, attn_mask_type, packed_seq_params, problems):
            return self._attend_all(query, key, value)
        if packed_seq_params is None and self.cp_size == 1 and problems:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=None)
        if problems:
            raise ValueError("packed-document / context-parallel attention does not support: " + "; ".join(problems))
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            if self.cp_size > 1:
                raise ValueError("context parallelism in the local attention takes packed documents in the "
                                 "'sbhd' layout, not 'thd' (packed_seq_params_from_tokens(..., qkv_format='sbhd'))")
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # [t, 1, n, d]
        s_local, b = query.shape[0], query.shape[1]
        seq_len = s_local * self.cp_size
        if self.cp_size > 1:
            check_cp_layout(seq_len, self.cp_size)
            query, key, value = (heads_to_sequence(t, self.cp_group, seq_len) for t in (query, key, value))
        if packed_seq_params is not None:
            segments = document_segments(packed_seq_params, seq_len, b)
        else:
            segments = [[(0, seq_len)]] * b
        context = self._attend(query, key, value, segments)  # [s, b, n_local, d]
        if self.cp_size > 1:
            context = sequence_to_heads(context, self.cp_group, seq_len)
        if thd:
            return context.reshape(context.shape[0], -1)  # [t, n * d]
        return context.reshape(s_local, b, -1)  # [s/cp, b, n * d]

    def _unsupported(self, attention_mask, attn_mask_type, attention_bias) -> List[str]:
        """What keeps this call off the SDPA path (megatron's own attention then serves unpacked batches)."""
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        problems = []
        if mask_type != AttnMaskType.causal:
            problems.append(f"mask type {mask_type} (only causal)")
        if attention_mask is not None:
            problems.append("an explicit attention_mask (documents come from packed_seq_params)")
        if attention_bias is not None:
            problems.append("attention_bias")
        if self.dropout_p and self.training:
            problems.append(f"attention dropout {self.dropout_p} (Instella uses none)")
        if getattr(self, "softmax_offset", None) is not None:
            problems.append("softmax offsets")
        return problems

    def _is_cached_decode(self, query, key, attention_mask, attn_mask_type, packed_seq_params, problems) -> bool:
        """A decode step of megatron's inference with a KV cache: one new query per row against every cached
        key, which megatron marks ``no_mask``; the only thing keeping it off the SDPA path is that mask type."""
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return (mask_type == AttnMaskType.no_mask and query.shape[0] == 1 and attention_mask is None
                and packed_seq_params is None and self.cp_size == 1 and len(problems) == 1
                and key.shape[1] == query.shape[1])

    def _attend_all(self, q, k, v):
        """One query per row over all keys (no mask). q: [1, b, n, d]; k, v: [sk, b, g, d] -> [1, b, n * d]."""
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        groups = q.shape[2] // k.shape[2]
        if groups > 1:
            k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.permute(2, 0, 1, 3).reshape(1, out.shape[0], -1)

    def _attend(self, q, k, v, segments):
        """Per-document causal attention. q: [s, b, n, d]; k, v: [s, b, g, d]; returns [s, b, n, d]."""
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        groups = q.shape[2] // k.shape[2]
        if groups > 1:
            k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
        # [s, b, n, d] -> [b, n, s, d]: 4-D inputs select torch's flash kernel on CPU and GPU
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))

        def sdpa(qq, kk, vv):
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)

        if all(len(docs) == 1 for docs in segments):
            out = sdpa(q, k, v)
        else:
            rows = []
            for bi, docs in enumerate(segments):
                r = slice(bi, bi + 1)
                pieces = [sdpa(q[r, :, a:e], k[r, :, a:e], v[r, :, a:e]) for a, e in docs]
                rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
            out = torch.cat(rows, dim=0)
        return out.permute(2, 0, 1, 3)  # [s, b, n, d]

"""Ulysses-style context parallelism (megatron's ``--cp-comm-type a2a``) for the local backend.

Layout. Each CP rank holds ``s / cp`` tokens of every sequence in megatron's load-balanced
("zigzag") order: the sequence is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r``
and ``2 * cp - 1 - r`` (so every rank gets the same share of causal work). This is the order in which
megatron's ``RotaryEmbedding`` slices its table for a CP rank (``get_pos_emb_on_this_cp_rank``), so a
batch sliced by ``batch_for_cp_rank`` gets the RoPE positions of its tokens in the full sequence
without any help from ``position_ids`` (GPTModel does not use them for RoPE).

Attention. Everything outside core attention is per token and runs on the local tokens, including
the QKV projection, the full-width QK-norm (on the TP-local width, before any exchange) and RoPE.
Core attention then swaps sharding with one all-to-all over the CP group: from
``[s/cp, b, heads, d]`` (all local heads, a slice of the sequence) to ``[s, b, heads/cp, d]`` (the
whole sequence, a slice of the heads), attends, and swaps back. Megatron's autograd ``all_to_all``
(an all-to-all whose backward is the reverse all-to-all) does the exchange, so gradients flow.
Heads per TP rank (and KV groups) must be divisible by ``cp``, and ``s`` by ``2 * cp``.

Loss. Each CP rank computes the loss of its own tokens; megatron's ``finalize_model_grads``
all-reduces the token count over the data-parallel x context-parallel group and DDP reduces
gradients over the same group, so the per-token mean is exact. Loss *reports* must be summed over
that group too (``sum_over_dp_cp``). DP and TP compose: CP ranks are a separate mesh axis.
"""
from typing import Dict, Optional

import torch

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


# ---- layout --------------------------------------------------------------------------------------
def check_cp_layout(seq_len: int, cp_size: int, heads: Optional[int] = None,
                    kv_groups: Optional[int] = None) -> None:
    """Raise a ValueError naming the problem and the fix if ``cp_size`` cannot shard this layout.

    ``heads`` / ``kv_groups`` are the counts per TP rank (a2a shards them over CP ranks).
    """
    errors = []
    if cp_size < 1:
        errors.append(f"--context-parallel-size must be >= 1, got {cp_size}")
    elif cp_size > 1:
        if seq_len % (2 * cp_size):
            errors.append(f"sequence length {seq_len} cannot be split into 2 x {cp_size} equal chunks "
                          f"(load-balanced CP layout); use a length divisible by {2 * cp_size}")
        for what, n in (("attention heads per TP rank", heads), ("KV groups per TP rank", kv_groups)):
            if n is not None and n % cp_size:
                errors.append(f"{what} ({n}) are not divisible by --context-parallel-size {cp_size} "
                              "(a2a context parallelism shards heads); pick a CP size that divides them")
    if errors:
        raise ValueError("invalid context-parallel layout:\n  - " + "\n  - ".join(errors))


def cp_token_index(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in the full sequence held by ``cp_rank``, in local order (chunks r, 2cp-1-r)."""
    check_cp_layout(seq_len, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"CP rank {cp_rank} is outside 0..{cp_size - 1}")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk)])


def gathered_order(seq_len: int, cp_size: int) -> torch.Tensor:
    """Full-sequence position of each row after the a2a gather (rank 0's tokens, then rank 1's, ...)."""
    return torch.cat([cp_token_index(seq_len, cp_size, r) for r in range(cp_size)])


def _cp_group_info(cp_rank, cp_size):
    if cp_rank is None or cp_size is None:
        from megatron.core import parallel_state

        cp_rank = parallel_state.get_context_parallel_rank() if cp_rank is None else cp_rank
        cp_size = parallel_state.get_context_parallel_world_size() if cp_size is None else cp_size
    return cp_rank, cp_size


def batch_for_cp_rank(batch: Dict, cp_rank: Optional[int] = None, cp_size: Optional[int] = None) -> Dict:
    """This CP rank's share of a full batch: [b, s] tensors sliced to [b, s/cp] in zigzag order.

    ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (and an ``attention_mask`` whose last two
    dims are [s, s]: rows sliced, columns kept) are sliced; ``packed_seq_params`` stays global (it
    describes document boundaries of the whole sequence, which the attention sees after the
    all-to-all). Other keys pass through. CP size 1 returns the batch unchanged.
    """
    cp_rank, cp_size = _cp_group_info(cp_rank, cp_size)
    if cp_size == 1:
        return batch
    seq_len = batch["tokens"].shape[1]
    check_cp_layout(seq_len, cp_size)
    idx = cp_token_index(seq_len, cp_size, cp_rank)
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        t = batch.get(key)
        if t is not None:
            if t.shape[1] != seq_len:
                raise ValueError(f"batch[{key!r}] has sequence length {t.shape[1]}, tokens have {seq_len}")
            out[key] = t.index_select(1, idx.to(t.device)).contiguous()
    mask = batch.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = mask.index_select(-2, idx.to(mask.device)).contiguous()
    psp = batch.get("packed_seq_params")
    if psp is not None and getattr(psp, "qkv_format", None) == "thd":
        raise ValueError("context parallelism in the local backend takes packed documents in the 'sbhd' "
                         "layout (packed_seq_params_from_tokens(..., qkv_format='sbhd')), not 'thd'")
    return out


# ---- the all-to-all ------------------------------------------------------------------------------
def heads_to_sequence(x: torch.Tensor, group, seq_len: int) -> torch.Tensor:
    """[s/cp, b, n, d] (local tokens, all heads) -> [s, b, n/cp, d] (all tokens in order, our heads)."""
    from megatron.core.tensor_parallel.mappings import all_to_all

    cp = group.size()
    s_local, b, n, d = x.shape
    # [s/cp, b, cp, n/cp, d] -> [cp, s/cp, b, n/cp, d]: block j goes to rank j (head group j)
    send = x.reshape(s_local, b, cp, n // cp, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = all_to_all(group, send.reshape(cp * s_local, b, n // cp, d))  # block i came from rank i
    natural = torch.argsort(gathered_order(seq_len, cp)).to(x.device)
    return recv.index_select(0, natural)


def sequence_to_heads(x: torch.Tensor, group, seq_len: int) -> torch.Tensor:
    """Inverse of ``heads_to_sequence``: [s, b, n/cp, d] -> [s/cp, b, n, d]."""
    from megatron.core.tensor_parallel.mappings import all_to_all

    cp = group.size()
    s, b, n_local, d = x.shape
    send = x.index_select(0, gathered_order(seq_len, cp).to(x.device))  # block j = rank j's tokens
    recv = all_to_all(group, send.contiguous())  # block i = head group i of our tokens
    return recv.reshape(cp, s // cp, b, n_local, d).permute(1, 2, 0, 3, 4).reshape(s // cp, b, cp * n_local, d)


def sum_over_dp_cp(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) a loss report over data-parallel x context-parallel ranks, in place."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if group.size() > 1:
        torch.distributed.all_reduce(t, group=group)
    return t

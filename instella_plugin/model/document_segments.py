"""Document boundaries from per-token segment ids (packed chats), for the packed-document attention.

A packed SFT window (``data.sft.SFTDataset(pack=True)``) marks each token with the 1-based index
of the example it belongs to (0 on the padding after the last one). Those ids, not EOS tokens, are
the document boundaries of long SFT: a chat holds an EOS after every assistant turn, so cutting at
EOS would split one conversation into pieces that cannot see their own earlier turns. Every change
of id within a row starts a new document (the padding run is a document of its own, whose loss
mask is 0), and every row starts one. The result is megatron's ``PackedSeqParams``, which
``model.packed_attention`` turns into one causal attention per document; positions run on across
documents, as Instella-Long trains.
"""
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from instella_plugin.model.packed_attention import packed_seq_params_from_cu_seqlens


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 cumulative document lengths over the flattened [b, s] tokens: a document ends where the
    segment id changes and at the end of every row."""
    if segment_ids.dim() != 2 or segment_ids.shape[1] == 0:
        raise ValueError(f"segment_ids must be [batch, seq] with seq > 0, got shape {tuple(segment_ids.shape)}")
    if segment_ids.dtype.is_floating_point:
        raise ValueError(f"segment_ids must hold integer ids, got {segment_ids.dtype}")
    b, s = segment_ids.shape
    ends = torch.zeros(b, s, dtype=torch.bool, device=segment_ids.device)
    ends[:, :-1] = segment_ids[:, 1:] != segment_ids[:, :-1]
    ends[:, -1] = True
    flat_end = torch.nonzero(ends.reshape(-1), as_tuple=False).flatten() + 1
    zero = torch.zeros(1, dtype=torch.long, device=segment_ids.device)
    return torch.cat([zero, flat_end]).to(torch.int32)


def packed_seq_params_from_segments(segment_ids: torch.Tensor, qkv_format: str = "sbhd") -> PackedSeqParams:
    """PackedSeqParams for a [b, s] batch of packed examples told apart by ``segment_ids``.

    Build it from the *full* batch, before ``batch_for_cp_rank`` slices the tokens for CP."""
    b, s = segment_ids.shape if segment_ids.dim() == 2 else (0, 0)
    return packed_seq_params_from_cu_seqlens(cu_seqlens_from_segments(segment_ids), s, b, qkv_format)

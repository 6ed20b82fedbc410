"""Packed documents in the local attention: per-document causal masking, RoPE positions not reset.

Reference: transformers' one-expert OlmoeForCausalLM (see test_model_parity) run on each document
*alone*, with ``position_ids`` starting at the document's offset in the packed row. The packed
megatron run must give the same logits (and, through the CP tests, the same gradients). One 1-rank
launch checks the 'sbhd' layout (two rows, several documents), the 'thd' layout, that the same
rows without packing see across documents, and the RoPE angles layer 0 used (positions 0..s-1 of the
row: RoPE is relative, so inside a masked document an offset changes logits only by rounding, and
the positions are checked where they are applied).
"""
import pytest
import torch

from instella_plugin.model.config import get_preset
from instella_plugin.model.packed_attention import (
    cu_seqlens_from_tokens,
    packed_seq_params_from_cu_seqlens,
    packed_seq_params_from_tokens,
)
from instella_plugin.testing.olmoe_reference import build_olmoe, olmoe_grads, random_hf_weights

CFG = get_preset("instella-test")
EOD = 0


def row_segments(tokens, packed):
    """Per row: (start, end) of each document (the whole row when not packed)."""
    b, s = tokens.shape
    if not packed:
        return [[(0, s)]] * b
    cu = cu_seqlens_from_tokens(tokens, EOD).tolist()
    rows = [[] for _ in range(b)]
    for a, e in zip(cu, cu[1:]):
        rows[a // s].append((a % s, e - (a // s) * s))
    return rows


def segment_reference(cfg, hf, batches, packed, with_grads=True):
    """Logits of every row (each document run alone at its offset), per-token mean loss, gradients."""
    model = build_olmoe(cfg, hf)
    logits, loss_sum, count = [], 0.0, 0.0
    for b in batches:
        rows = []
        for r, docs in enumerate(row_segments(b["tokens"], packed)):
            pieces = []
            for a, e in docs:
                pos = torch.arange(a, e)[None]
                pieces.append(model(input_ids=b["tokens"][r:r + 1, a:e], position_ids=pos).logits)
            rows.append(torch.cat(pieces, dim=1))
        out = torch.cat(rows, dim=0)
        logits.append(out.detach())
        ce = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), b["labels"].reshape(-1),
                                               reduction="none")
        loss_sum = loss_sum + (ce * b["loss_mask"].reshape(-1)).sum()
        count += b["loss_mask"].sum()
    loss = loss_sum / count
    if not with_grads:
        return logits, loss.item(), None
    loss.backward()
    return logits, loss.item(), olmoe_grads(model, cfg)


def make_packed_batches(num, mbs, seq, eod_positions, seed=3):
    """Batches whose rows hold documents ending in EOD at the given (row, column) places."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(num):
        seq_tokens = torch.randint(2, CFG.vocab_size, (mbs, seq + 1), generator=g)
        for r, c in eod_positions[i]:
            seq_tokens[r, c] = EOD
        mask = torch.ones(mbs, seq)
        mask[0, 2:4] = 0
        batches.append(dict(tokens=seq_tokens[:, :-1], labels=seq_tokens[:, 1:], loss_mask=mask,
                            position_ids=torch.arange(seq).expand(mbs, seq).clone()))
    return batches


# ---- unit tests ----------------------------------------------------------------------------------
def test_cu_seqlens_from_tokens_ends_documents_with_eod_and_rows():
    tokens = torch.tensor([[5, 6, 0, 7, 8, 9], [0, 4, 4, 4, 0, 3]])
    assert cu_seqlens_from_tokens(tokens, 0).tolist() == [0, 3, 6, 7, 11, 12]
    psp = packed_seq_params_from_tokens(tokens, 0)
    assert psp.qkv_format == "sbhd" and psp.max_seqlen_q == 6 and psp.cu_seqlens_q.dtype == torch.int32
    # a row ending in EOD does not produce an empty document
    assert cu_seqlens_from_tokens(torch.tensor([[1, 0, 2, 0]]), 0).tolist() == [0, 2, 4]


@pytest.mark.parametrize("cu,problem", [
    ([0, 5, 3, 12], "strictly increasing"),
    ([0, 4, 10], "end at batch x seq = 12"),
    ([0, 4, 8, 12], "row boundary"),
    ([1, 6, 12], "starting at 0"),
])
def test_bad_cu_seqlens_are_refused(cu, problem):
    with pytest.raises(ValueError, match=problem):
        packed_seq_params_from_cu_seqlens(torch.tensor(cu), seq_len=6, batch=2)


def test_thd_layout_holds_one_row():
    with pytest.raises(ValueError, match="one packed row"):
        packed_seq_params_from_tokens(torch.ones(2, 8, dtype=torch.long), 0, qkv_format="thd")


# ---- megatron, one rank ----------------------------------------------------------------------------
def _packed_worker(cfg, hf, batches, thd_batch):
    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.weight_map import load_hf_into_model

    tcfg = cfg.transformer_config()
    model = build_gpt_chunks(cfg, tcfg, init_seed=None)[0]
    load_hf_into_model(model, hf.__getitem__, cfg)
    model.eval()
    seen = []
    model.decoder.layers[0].self_attention.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["rotary_pos_emb"].detach().clone()), with_kwargs=True)
    out = {}
    with torch.no_grad():
        out["sbhd"] = [model(b["tokens"], b["position_ids"], None,
                             packed_seq_params=packed_seq_params_from_tokens(b["tokens"], EOD)) for b in batches]
        out["rope_sbhd"] = seen[-1]
        out["unpacked"] = [model(b["tokens"], b["position_ids"], None) for b in batches]
        out["thd"] = model(thd_batch["tokens"], thd_batch["position_ids"], None,
                           packed_seq_params=packed_seq_params_from_tokens(thd_batch["tokens"], EOD, "thd"))
        out["rope_thd"] = seen[-1]
    return out


def packed_inputs():
    """Weights and batches of the one-rank packed check (deterministic, rebuilt where needed)."""
    hf = random_hf_weights(CFG)
    # row 0: A (12 tokens, ends in EOD) | B (20); row 1: three documents of 5, 9 and 18 tokens
    batches = make_packed_batches(1, 2, 32, [[(0, 11), (1, 4), (1, 13)]])
    thd = make_packed_batches(1, 1, 24, [[(0, 6)]], seed=4)[0]
    return hf, batches, thd


@pytest.mark.dist
def test_packed_documents_match_each_document_alone_at_its_offset():
    from test_rope_apply import one_rank_launch  # one 1-rank launch serves both files

    hf, batches, thd = packed_inputs()
    out = one_rank_launch()["packed"]

    ref, _, _ = segment_reference(CFG, hf, batches, packed=True, with_grads=False)
    got = out["sbhd"][0]
    assert got.shape == ref[0].shape
    assert (got - ref[0]).abs().max().item() <= 2e-5
    # A alone from position 0; B alone from position len(A) = 12
    assert (got[0, :12] - ref[0][0, :12]).abs().max().item() <= 2e-5
    assert (got[0, 12:] - ref[0][0, 12:]).abs().max().item() <= 2e-5

    # positions run on: layer 0 rotated the packed row with the angles of positions 0..31
    # (RoPE is relative, so inside a masked document a constant offset changes logits only by rounding)
    angles = torch.arange(32, dtype=torch.float64)[:, None] * CFG.rotary_base ** (
        -torch.arange(0, CFG.head_dim, 2, dtype=torch.float64) / CFG.head_dim)
    for name in ("sbhd", "thd"):
        emb = out["rope_" + name].reshape(-1, CFG.head_dim).double()
        n = emb.shape[0]
        assert (emb - torch.cat([angles[:n], angles[:n]], -1)).abs().max().item() <= 1e-5 * n, name
    # masking must be real: without packing the second document sees the first
    assert (out["unpacked"][0][0, 12:] - got[0, 12:]).abs().max().item() > 1e-2
    unpacked_ref, _, _ = segment_reference(CFG, hf, batches, packed=False, with_grads=False)
    assert (out["unpacked"][0] - unpacked_ref[0]).abs().max().item() <= 2e-5

    thd_ref, _, _ = segment_reference(CFG, hf, [thd], packed=True, with_grads=False)
    assert (out["thd"] - thd_ref[0]).abs().max().item() <= 2e-5


def test_per_document_attention_kernel_matches_fp64_masked_softmax():
    """The attention core alone (GQA, two rows, uneven documents) against a dense fp64 reference,
    with torch restricted to its flash kernel: the memory-efficient path is really the one taken."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from instella_plugin.model.packed_attention import InstellaDotProductAttention

    s, b, n, g, d = 24, 2, 4, 2, 16
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(s, b, heads, d, generator=gen) for heads in (n, g, g))
    segments = [[(0, 7), (7, 24)], [(0, 3), (3, 4), (4, 24)]]
    fake = SimpleNamespace(softmax_scale=0.3, layer_number=1,
                           config=SimpleNamespace(apply_query_key_layer_scaling=False))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = InstellaDotProductAttention._attend(fake, q, k, v, segments)
    doc = torch.zeros(b, s, dtype=torch.long)
    for r, docs in enumerate(segments):
        for i, (a, e) in enumerate(docs):
            doc[r, a:e] = i
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    kk, vv = (t.double().repeat_interleave(n // g, dim=2) for t in (k, v))
    scores = torch.einsum("qbnd,kbnd->bnqk", q.double(), kk) * 0.3
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    want = torch.einsum("bnqk,kbnd->qbnd", probs, vv)
    assert got.shape == (s, b, n, d)
    assert (got.double() - want).abs().max().item() <= 1e-5

"""Ulysses a2a context parallelism in the local backend: CP 2 and 4 equal the unsharded model.

Reference: the one-expert OlmoeForCausalLM (an independent implementation) on the full sequences,
per document when packed (see test_packed_attention). Each launch builds the megatron model once,
wraps it in DDP and runs, for plain and packed batches: logits (reassembled from the CP ranks'
zigzag slices), then megatron's forward-backward schedule with the per-token loss (gradients
reduced over DP x CP by megatron) over two micro-batches. CP 2 and 4 at TP 1 run in `make test`;
TP 2 x CP 2 and DP 2 x CP 2 run in `slow`. Bad layouts fail with messages before any work.
"""
import pytest
import torch

from instella_plugin.model.config import get_preset
from instella_plugin.model.context_parallel import batch_for_cp_rank, check_cp_layout, cp_token_index
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import check_grads, gather_hf, random_hf_weights
from test_packed_attention import make_packed_batches, segment_reference

CFG = get_preset("instella-test", num_layers=2)
SEQ, MBS, NUM_MB = 32, 2, 2
# documents end in EOD at these (row, column) places; boundaries straddle the CP chunks
EODS = [[(0, 11), (1, 4), (1, 13)], [(0, 20), (1, 6), (1, 7), (1, 25)]]


def _cp_worker(cfg, hf, batches_per_dp_rank, variants):
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.context_parallel import sum_over_dp_cp
    from instella_plugin.model.packed_attention import packed_seq_params_from_tokens
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.training.forward_step import collect_logits, run_forward_backward
    from instella_plugin.training.model_setup import wrap_ddp

    tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
    tcfg = cfg.transformer_config(tensor_parallel=tp, context_parallel=cp, cp_comm_type="a2a")
    chunks = build_gpt_chunks(cfg, tcfg, init_seed=7)
    for c in chunks:
        load_hf_into_model(c, hf.__getitem__, cfg)
    tcfg.calculate_per_token_loss = True  # before DDP is built (it picks its gradient scaling from it)
    model = wrap_ddp(chunks)
    full_batches = batches_per_dp_rank[ps.get_data_parallel_rank()]
    results = {}
    for packed in variants:
        local = []
        for b in full_batches:
            b = dict(b, packed_seq_params=packed_seq_params_from_tokens(b["tokens"], 0)) if packed else b
            local.append(batch_for_cp_rank(b))
        logits = collect_logits(model, local, seq_length=SEQ, micro_batch_size=MBS)
        for m in model:
            m.zero_grad_buffer()
        reports = run_forward_backward(model, local, seq_length=SEQ, micro_batch_size=MBS,
                                       num_microbatches=NUM_MB)
        total = sum_over_dp_cp(torch.stack([r["lm loss"] for r in reports]).sum(0))
        results[packed] = dict(logits=logits, loss=(total[0] / total[1]).item(),
                               grads=gather_hf(model, cfg, "main_grad"),
                               dp_rank=ps.get_data_parallel_rank(), cp_rank=ps.get_context_parallel_rank())
    if cp > 1:  # the local backend implements a2a only: other comm types are refused by name
        try:
            build_gpt_chunks(cfg, cfg.transformer_config(context_parallel=cp, cp_comm_type="p2p",
                                                         tensor_parallel=tp))
        except ValueError as e:
            results["p2p_error"] = str(e)
    return results


def _reassemble(rank_results, packed, cp, dp_rank=0):
    """Full [b, s, V] logits per micro-batch from the CP ranks' zigzag slices."""
    parts = [r[packed] for r in rank_results if r[packed]["dp_rank"] == dp_rank]
    out = []
    for mb in range(NUM_MB):
        full = torch.zeros(MBS, SEQ, CFG.padded_vocab_size)
        for part in parts:
            if part["logits"]:
                full[:, cp_token_index(SEQ, cp, part["cp_rank"])] = part["logits"][mb]
        out.append(full)
    return out


@pytest.fixture(scope="module")
def references():
    hf = random_hf_weights(CFG)
    batches = make_packed_batches(NUM_MB, MBS, SEQ, EODS)
    return hf, batches, {packed: segment_reference(CFG, hf, batches, packed) for packed in (False, True)}


def _run_and_check(references, world, tp, cp, dp=1):
    hf, batches, refs = references
    if dp == 1:
        per_dp, ref_for = [batches], refs
    else:  # each DP rank takes its own micro-batches; the reference sees them all
        more = make_packed_batches(NUM_MB, MBS, SEQ, EODS[::-1], seed=9)
        per_dp = [batches, more]
        ref_for = {p: segment_reference(CFG, hf, batches + more, p) for p in (False, True)}
    res = run_distributed(_cp_worker, world, CFG, hf, per_dp, [False, True], tp=tp, cp=cp)
    for packed in (False, True):
        ref_logits, ref_loss, ref_grads = ref_for[packed]
        for d in range(dp):
            got = _reassemble(res, packed, cp, dp_rank=d)
            for g, want in zip(got, ref_logits[d * NUM_MB:(d + 1) * NUM_MB]):
                assert (g - want).abs().max().item() <= 2e-5, (packed, d)
        grads = {}
        for r in res:
            grads.update(r[packed]["grads"])
        losses = {round(r[packed]["loss"], 12) for r in res}
        assert len(losses) == 1
        check_grads(grads, ref_grads, losses.pop(), ref_loss)
    return res


@pytest.mark.dist
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_matches_unsharded_reference_with_and_without_packing(references, cp):
    res = _run_and_check(references, cp, tp=1, cp=cp)
    assert "--cp-comm-type a2a" in res[0]["p2p_error"] and "p2p" in res[0]["p2p_error"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("tp,cp,dp", [(2, 2, 1), (1, 2, 2)])
def test_cp_composes_with_tp_and_dp(references, tp, cp, dp):
    _run_and_check(references, tp * cp * dp, tp=tp, cp=cp, dp=dp)


# ---- bad input, before any work -----------------------------------------------------------------
def test_heads_not_divisible_by_cp_are_refused():
    with pytest.raises(ValueError, match="not divisible by --context-parallel-size 3"):
        check_cp_layout(24, 3, heads=4, kv_groups=4)
    with pytest.raises(ValueError, match="not divisible by --context-parallel-size 8"):
        CFG.validate(tensor_parallel=1, context_parallel=8)


def test_sequence_the_cp_layout_cannot_split_is_refused():
    batch = dict(tokens=torch.zeros(1, 30, dtype=torch.long), labels=torch.zeros(1, 30, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot be split into 2 x 4 equal chunks"):
        batch_for_cp_rank(batch, cp_rank=0, cp_size=4)


def test_zigzag_slices_cover_the_sequence_in_load_balanced_order():
    # (that they match megatron's RoPE slicing is what the CP model tests check end to end)
    seq, cp = 24, 3
    assert cp_token_index(seq, cp, 0).tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    assert cp_token_index(seq, cp, 2).tolist() == [8, 9, 10, 11, 12, 13, 14, 15]
    held = torch.cat([cp_token_index(seq, cp, r) for r in range(cp)])
    assert sorted(held.tolist()) == list(range(seq))
    batch = dict(tokens=torch.arange(seq)[None] + 100, position_ids=torch.arange(seq)[None], note="kept")
    local = batch_for_cp_rank(batch, cp_rank=1, cp_size=cp)
    assert local["tokens"].tolist() == [[104, 105, 106, 107, 116, 117, 118, 119]]
    assert local["position_ids"].tolist() == [[4, 5, 6, 7, 16, 17, 18, 19]] and local["note"] == "kept"

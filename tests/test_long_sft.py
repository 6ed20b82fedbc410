"""Long SFT: packed multi-turn chats whose document boundaries travel from the data to attention.

References: a dense fp64 masked softmax built straight from the segment ids (the attention core),
and the one-expert OlmoeForCausalLM run on each chat alone at the positions Instella runs it
(positions continue across the chats of a window). The packed batch goes through the real path:
``SFTDataset(pack=True)`` -> ``to_torch_batch`` -> the plugin's batch hook (segment ids ->
``PackedSeqParams``, then the CP slice) -> megatron at TP 2 x CP 2 (a2a). Also: the recipe and blend
numbers of INSTELLA.md, and bad input.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instella_plugin.data.blends import BlendError, load_blend, resolve_blend
from instella_plugin.data.sft import SFTDataset, write_sft
from instella_plugin.data.tokenizer import load_tokenizer
from instella_plugin.model.config import get_preset
from instella_plugin.model.context_parallel import cp_token_index
from instella_plugin.model.document_segments import cu_seqlens_from_segments, packed_seq_params_from_segments
from instella_plugin.model.packed_attention import cu_seqlens_from_tokens, document_segments
from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.olmoe_reference import build_olmoe, random_hf_weights
from instella_plugin.training.datasets import to_torch_batch
from instella_plugin.training.recipes import load_recipe

SEQ, MBS = 96, 2
CFG = get_preset("instella-test", num_layers=2, vocab_size=50280, padded_vocab_size=50304, seq_length=SEQ)
BLEND = {"books": 0.44, "dclm": 0.10, "arxiv": 0.06, "ultrachat-200k": 0.25, "openmathinstruct2": 0.10,
         "mmlu-auxiliary-train": 0.03, "tulu3-personas": 0.02}


# ---- recipe and blend numbers ----------------------------------------------------------------------
def test_long_sft_recipe_numbers(monkeypatch):
    from instella_plugin.training.arguments import parse_args

    r = load_recipe("long-sft")
    assert (r["rotary_base"], r["seq_length"], r["train_iters"], r["lr"], r["lr_warmup_iters"], r["min_lr"]) == \
        (3691950, 262144, 250, 4e-5, 13, 4e-8)
    assert r["min_lr"] == pytest.approx(0.001 * r["lr"], rel=1e-12) and r["seed"] == 6198
    assert r["global_batch_size"] * r["context_parallel_size"] == 64  # the official "64 instances"
    assert r["train_iters"] * r["global_batch_size"] * r["seq_length"] == 1_048_576_000  # ~1B tokens
    assert r["sft_pack"] and r["packed_documents"] and r["dataset_type"] == "sft" and r["reset_iteration"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    run, _ = parse_args(["--plugin", "instella", "--instella-recipe", "long-sft", "--data-root", "/nonexistent"])
    assert run.layout.cp == 4 and run.layout.dp == 2 and run.model.rotary_base == 3691950
    assert run.layout.num_microbatches * run.layout.micro_batch_size * run.layout.dp == 16
    assert run.plugin_values["rope"].theta_at(249) == 3691950


def test_long_sft_blend_weights_and_missing_sources(tmp_path):
    blend = load_blend("long-sft")
    assert blend["kind"] == "sft" and blend["mode"] == "weight"
    assert {s["name"]: s["weight"] for s in blend["train"]} == BLEND
    assert sum(BLEND.values()) == pytest.approx(1.0, abs=1e-12)
    tok = load_tokenizer()
    for name in list(BLEND)[:5]:  # two sources left unprepared
        write_sft([[{"role": "user", "content": f"hi {name}"}, {"role": "assistant", "content": "yes"}]] * 3,
                  str(tmp_path / "long-sft" / name / "part0"), tok)
    with pytest.raises(BlendError, match=r"(?s)2 source\(s\) have no data.*mmlu-auxiliary-train.*tulu3-personas"):
        resolve_blend("long-sft", str(tmp_path))
    for name in list(BLEND)[5:]:
        write_sft([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]],
                  str(tmp_path / "long-sft" / name / "part0"), tok)
    resolved = resolve_blend("long-sft", str(tmp_path))
    assert {r.name: round(r.weight, 12) for r in resolved.split_rows("train")} == BLEND


# ---- segment ids -> document boundaries ---------------------------------------------------------------
def test_cu_seqlens_from_segments_by_hand():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 4, 4]])
    assert cu_seqlens_from_segments(seg).tolist() == [0, 3, 5, 6, 10, 12]
    psp = packed_seq_params_from_segments(seg)
    assert document_segments(psp, 6, 2) == [[(0, 3), (3, 5), (5, 6)], [(0, 4), (4, 6)]]
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        cu_seqlens_from_segments(torch.tensor([1, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        cu_seqlens_from_segments(torch.ones(2, 3))


def test_document_attention_matches_dense_masked_reference():
    """The attention core on boundaries from segment ids equals an fp64 softmax whose mask is
    (same segment id) & causal, built from the ids directly."""
    from instella_plugin.model.packed_attention import InstellaDotProductAttention

    s, b, n, d = 20, 2, 4, 16
    seg = torch.tensor([[1] * 7 + [2] * 9 + [0] * 4, [5] * 3 + [6] + [7] * 16])
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(s, b, n, d, generator=gen) for _ in range(3))
    fake = SimpleNamespace(softmax_scale=0.25, layer_number=1,
                           config=SimpleNamespace(apply_query_key_layer_scaling=False))
    got = InstellaDotProductAttention._attend(fake, q, k, v,
                                              document_segments(packed_seq_params_from_segments(seg), s, b))
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    scores = torch.einsum("qbnd,kbnd->bnqk", q.double(), k.double()) * 0.25
    want = torch.einsum("bnqk,kbnd->qbnd", scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1),
                        v.double())
    assert (got.double() - want).abs().max().item() <= 1e-5
    plain = InstellaDotProductAttention._attend(fake, q, k, v, [[(0, s)]] * b)
    assert (plain - got).abs().max().item() > 1e-2  # the boundaries matter


# ---- packed chats at TP 2 x CP 2 equal each chat alone ---------------------------------------------------
def _chat(i, turns):
    msgs = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"Question {i}.{t}: what is {i * 7 + t} plus {t + 2}?"},
                 {"role": "assistant", "content": f"It is {i * 7 + 2 * t + 2}."}]
    return msgs


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tok = load_tokenizer()
    prefix = str(tmp_path_factory.mktemp("sft") / "chats")
    write_sft([_chat(i, 1 + i % 3) for i in range(12)], prefix, tok)
    ds = SFTDataset(prefix, SEQ, pad_id=1, pack=True)
    batch = to_torch_batch([ds[0], ds[1]])
    assert batch["segment_ids"].shape == (MBS, SEQ)
    return batch


def _docs(seg_row):
    """(start, end) runs of equal segment id: an independent reading of the boundaries."""
    out, start = [], 0
    for i in range(1, len(seg_row) + 1):
        if i == len(seg_row) or seg_row[i] != seg_row[start]:
            out.append((start, i))
            start = i
    return out


def _reference(hf, batch):
    model = build_olmoe(CFG, hf)
    rows = []
    with torch.no_grad():
        for r in range(MBS):
            pieces = [model(input_ids=batch["tokens"][r:r + 1, a:e], position_ids=torch.arange(a, e)[None]).logits
                      for a, e in _docs(batch["segment_ids"][r].tolist())]
            rows.append(torch.cat(pieces, dim=1))
    logits = torch.cat(rows)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                           reduction="none")
    return logits, ((ce * batch["loss_mask"].reshape(-1)).sum() / batch["loss_mask"].sum()).item()


def _packed_worker(cfg, hf, batches):
    from megatron.core import parallel_state as ps

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.context_parallel import sum_over_dp_cp
    from instella_plugin.model.weight_map import load_hf_into_model
    from instella_plugin.plugin import InstellaPlugin
    from instella_plugin.training.forward_step import collect_logits, run_forward_backward
    from instella_plugin.training.model_setup import wrap_ddp

    tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
    tcfg = cfg.transformer_config(tensor_parallel=tp, context_parallel=cp, cp_comm_type="a2a")
    chunks = build_gpt_chunks(cfg, tcfg, init_seed=7)
    for c in chunks:
        load_hf_into_model(c, hf.__getitem__, cfg)
    tcfg.calculate_per_token_loss = True
    model = wrap_ddp(chunks)
    run = SimpleNamespace(flags=SimpleNamespace(packed_documents=True), layout=SimpleNamespace(cp=cp))
    local = [InstellaPlugin().batch_hook(run, dict(b)) for b in batches]
    assert all("segment_ids" not in b and b["packed_seq_params"] is not None for b in local)
    logits = collect_logits(model, local, seq_length=SEQ, micro_batch_size=MBS)
    reports = run_forward_backward(model, local[:1], seq_length=SEQ, micro_batch_size=MBS, num_microbatches=1)
    total = sum_over_dp_cp(torch.stack([r["lm loss"] for r in reports]).sum(0))
    return dict(logits=logits, loss=(total[0] / total[1]).item(), cp_rank=ps.get_context_parallel_rank(),
                tp_rank=ps.get_tensor_model_parallel_rank())


@pytest.mark.dist
def test_packed_chats_equal_each_chat_alone_at_tp2_cp2(packed):
    hf = random_hf_weights(CFG, seed=4)
    batch = {k: v.clone() for k, v in packed.items()}
    # the same batch with one chat (row 0, its second segment) replaced by other tokens of the same length
    docs0 = _docs(batch["segment_ids"][0].tolist())
    a, e = docs0[1]
    perturbed = {k: v.clone() for k, v in batch.items()}
    perturbed["tokens"][0, a:e] = (perturbed["tokens"][0, a:e] * 7 + 13) % 50000 + 2
    # EOS would cut the chats at every assistant turn: the segment ids must not
    assert len(cu_seqlens_from_tokens(batch["tokens"], 0)) > len(cu_seqlens_from_segments(batch["segment_ids"]))

    res = run_distributed(_packed_worker, 4, CFG, hf, [batch, perturbed], tp=2, cp=2)
    full = [torch.zeros(MBS, SEQ, CFG.padded_vocab_size) for _ in range(2)]
    for r in res:
        for i in range(2):
            full[i][:, cp_token_index(SEQ, 2, r["cp_rank"])] = r["logits"][i]
    ref_logits, ref_loss = _reference(hf, batch)
    err = (full[0] - ref_logits).abs().max().item()
    print(f"packed chats TP2 x CP2: max |logit - per-chat reference| = {err:.2e}, "
          f"loss {res[0]['loss']:.6f} vs {ref_loss:.6f}")
    assert err <= 1e-5
    assert {round(r["loss"], 10) for r in res} == {round(res[0]["loss"], 10)}
    assert res[0]["loss"] == pytest.approx(ref_loss, abs=1e-5)
    # no attention across chat boundaries: every other chat's logits are bitwise unchanged
    outside = torch.ones(MBS, SEQ, dtype=torch.bool)
    outside[0, a:e] = False
    assert torch.equal(full[1][outside], full[0][outside])
    assert (full[1][0, a:e] - full[0][0, a:e]).abs().max().item() > 1e-3

"""SFT formatting: exact tokens and loss mask of a hand-built chat, the Jinja chat template giving the
same ids, the SFT/preference storage round trip, the fixed-length samples, and the demo corpus."""
import json
import os

import numpy as np
import pytest

from instella_plugin.data.sft import (CHAT_TEMPLATE, ChatFormatter, PreferenceDataset, SFTDataset,
                                      write_preference, write_sft)
from instella_plugin.data.tokenizer import load_tokenizer

CHAT = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.\n"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."}]
SYS, USER, ASST, NL = [29, 93, 10394, 49651, 187], [29, 93, 4537, 49651, 187], [29, 93, 515, 5567, 49651, 187], [187]
# (ids, mask) piece by piece, ids read off the tokenizer vocabulary by hand ("<", "|", "user", "|>", "\n", ...)
PIECES = [([0], 0), (SYS, 0), ([4678, 4864, 15], 0), (NL, 0), (USER, 0), ([1276, 310, 374, 12, 19, 32], 0), (NL, 0),
          (ASST, 0), ([21, 15], 1), ([0], 1), (NL, 0), (USER, 0), ([1898, 495, 12, 20, 32], 0), (NL, 0),
          (ASST, 0), ([23, 15], 1), ([0], 1), (NL, 0)]
TEXT = ("<|endoftext|><|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n4.<|endoftext|>\n"
        "<|user|>\nAnd 3+3?\n<|assistant|>\n6.<|endoftext|>\n")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_two_turn_chat_exact_tokens_and_mask(tok):
    ids, mask = ChatFormatter(tok)(CHAT)
    assert ids.tolist() == [t for piece, _ in PIECES for t in piece]
    assert mask.tolist() == [m for piece, m in PIECES for _ in piece]
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids[mask == 1]) == "4.<|endoftext|>6.<|endoftext|>"
    with pytest.raises(ValueError, match="message 1: expected"):
        ChatFormatter(tok)([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])


def test_chat_template_gives_formatter_ids(tok):
    fmt = ChatFormatter(tok)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(CHAT, tokenize=False) == TEXT
    chats = [CHAT, [{"role": "user", "content": "  Tabs\tand\n\nnewlines  \n"}, {"role": "assistant", "content": "\n```py\nx = 1\n```\n"}],
             [{"role": "user", "content": "Ünïcødé — 日本語 🙂?"}, {"role": "assistant", "content": "Yes!!"},
              {"role": "user", "content": "1,000.5"}, {"role": "assistant", "content": "  ok  "}]]
    for chat in chats:
        ids = tok.apply_chat_template(chat, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == fmt(chat)[0].tolist()
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("What is 2+2?\n<|assistant|>\n")


def test_sft_store_and_fixed_length_samples(tmp_path, tok):
    chats = [CHAT, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]] * 3
    assert write_sft(chats, str(tmp_path / "sft"), tok) == 6
    ds = SFTDataset(str(tmp_path / "sft"), seq_length=64)
    assert len(ds) == 6
    ids, mask = ChatFormatter(tok)(CHAT)
    item = ds[0]
    n = len(ids)
    assert all(v.shape == (64,) for v in item.values())
    assert item["tokens"][:n].tolist() == ids.tolist() and (item["tokens"][n:] == 1).all()
    assert item["labels"][:n - 1].tolist() == ids[1:].tolist() and (item["labels"][n - 1:] == 1).all()
    assert item["loss_mask"][:n - 1].tolist() == mask[1:].tolist() and (item["loss_mask"][n - 1:] == 0).all()
    assert item["position_ids"].tolist() == list(range(64))
    short = SFTDataset(str(tmp_path / "sft"), seq_length=20)[0]  # truncated to seq_length + 1 tokens
    assert short["tokens"].tolist() == ids[:20].tolist() and short["labels"].tolist() == ids[1:21].tolist()
    packed = SFTDataset(str(tmp_path / "sft"), seq_length=128, pack=True)
    assert len(packed) < 6
    p = packed[0]
    first, second = ChatFormatter(tok)(chats[0]), ChatFormatter(tok)(chats[1])
    both = np.concatenate([first[0], second[0]])
    assert p["tokens"][:len(both)].tolist() == both.tolist()
    assert p["loss_mask"][:len(both) - 1].tolist() == np.concatenate([first[1], second[1]])[1:].tolist()
    assert set(p["segment_ids"][:len(both)].tolist()) == {1, 2}
    with pytest.raises(ValueError, match="PreferenceDataset"):
        write_preference([(CHAT, CHAT)], str(tmp_path / "pref0"), tok)
        SFTDataset(str(tmp_path / "pref0"), 64)


def test_preference_pairs_round_trip(tmp_path, tok):
    from instella_plugin.data.cli import main

    bad = [dict(m) for m in CHAT]
    bad[-1]["content"] = "7."
    rows = [{"chosen": CHAT, "rejected": bad}, {"chosen": CHAT[1:3], "rejected": CHAT[1:2] + [{"role": "assistant", "content": "5"}]}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["sft", str(tmp_path / "pairs.jsonl"), "--output-prefix", str(tmp_path / "dpo"), "--preference"]) == 0
    ds = PreferenceDataset(str(tmp_path / "dpo"), seq_length=96)
    fmt = ChatFormatter(tok)
    assert len(ds) == 2
    for k, row in enumerate(rows):
        item = ds[k]
        for side in ("chosen", "rejected"):
            ids, mask = fmt(row[side])
            assert item[f"{side}_tokens"][:len(ids)].tolist() == ids.tolist()
            assert item[f"{side}_loss_mask"][:len(ids) - 1].tolist() == mask[1:].tolist()
    with pytest.raises(ValueError, match="does not hold preference pairs"):
        write_sft([CHAT], str(tmp_path / "plain"), tok)
        PreferenceDataset(str(tmp_path / "plain"), 64)
    os.remove(tmp_path / "dpo_mask.idx")  # an interrupted write: the store is refused
    with pytest.raises(ValueError, match="dpo_mask.idx"):
        PreferenceDataset(str(tmp_path / "dpo"), 64)


def test_demo_corpus_is_deterministic_and_resolves(tmp_path, tok):
    import re

    from instella_plugin.data.blends import resolve_blend
    from instella_plugin.data.demo_corpus import SFT_PREFIX, build_demo_corpus
    from instella_plugin.data.indexed import read_documents

    roots = [build_demo_corpus(str(tmp_path / f"r{k}"), num_docs=200, num_chats=16, tokenizer=tok) for k in (0, 1)]
    for rel in ("tiny/english_text_document.bin", "tiny/arithmetic_text_document.idx", SFT_PREFIX + "_tokens.bin"):
        assert open(os.path.join(roots[0], rel), "rb").read() == open(os.path.join(roots[1], rel), "rb").read()
    blend = resolve_blend("tiny", roots[0])
    assert {r.split for r in blend.rows} == {"train", "valid", "test"}
    assert [r.documents for r in blend.split_rows("train")] == [140, 60]
    facts = 0
    for doc in read_documents(os.path.join(roots[0], "tiny/arithmetic_text_document")):
        for a, op, b, c in re.findall(r"(\d+) (\+|-|times) (\d+) (?:=|is) (\d+)", tok.decode(doc)):
            facts += 1
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "times": int(a) * int(b)}[op]
    assert facts > 200
    assert len(SFTDataset(os.path.join(roots[0], SFT_PREFIX), 64)) == 16

"""A small offline corpus for the demo and tests, prepared at the prefixes the ``tiny`` blend names.

``build_demo_corpus`` generates, deterministically from ``seed`` and without any download, English-ish
documents with structure a tiny model learns quickly: templated sentences over a small vocabulary,
counting and alphabet patterns, paragraphs of a bundled short story (``fixtures/tiny_story.txt``), and
arithmetic facts. It writes JSONL, tokenises it with the real Instella tokenizer through ``prepare``,
and writes SFT chats and preference pairs through ``sft``. Layout under the returned data root::

    jsonl/*.jsonl                                   the raw text
    tiny/english_text_document.{bin,idx}            train, source 1 of the tiny blend
    tiny/arithmetic_text_document.{bin,idx}         train, source 2
    tiny/{english,arithmetic}_valid_text_document   held-out documents (valid and test splits)
    tiny/sft_chat_{tokens,mask}.{bin,idx}           SFT chats (see sft.py for the storage)
    tiny/dpo_pairs_{tokens,mask}.{bin,idx}          preference pairs
"""
from __future__ import annotations

import json
import os
import random
from typing import Iterator, List

from instella_plugin.data.prepare import prepare
from instella_plugin.data.sft import write_preference, write_sft
from instella_plugin.data.tokenizer import load_tokenizer

SFT_PREFIX = "tiny/sft_chat"
DPO_PREFIX = "tiny/dpo_pairs"
_STORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny_story.txt")
_NAMES = ["Anna", "Ben", "Clara", "David", "Ella", "Finn", "Grace", "Hugo"]
_ANIMALS = ["cat", "dog", "horse", "bird", "fox", "rabbit", "goat", "duck"]
_COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey"]
_PLACES = ["garden", "river", "market", "school", "forest", "kitchen", "field", "bridge"]
_VERBS = ["sees", "follows", "feeds", "paints", "finds", "watches", "calls", "helps"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _english_doc(rng: random.Random, story: List[str]) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return story[rng.randrange(len(story))]
    if kind == 1:
        start = rng.randrange(0, 20)
        count = " ".join(str(i) for i in range(start, start + rng.randrange(8, 16)))
        letters = "abcdefghijklmnopqrstuvwxyz"
        a = rng.randrange(0, 10)
        return f"Counting: {count}. Letters: {' '.join(letters[a:a + rng.randrange(6, 14)])}."
    sentences = []
    for _ in range(rng.randrange(3, 7)):
        name, animal, colour = rng.choice(_NAMES), rng.choice(_ANIMALS), rng.choice(_COLOURS)
        n = rng.randrange(2, 11)
        sentences.append(rng.choice([
            f"{name} {rng.choice(_VERBS)} the {colour} {animal} near the {rng.choice(_PLACES)}.",
            f"The {colour} {animal} is in the {rng.choice(_PLACES)} with {name}.",
            f"{name} has {_NUMBERS[n]} {animal}{'es' if animal.endswith('x') else 's'}, and {_NUMBERS[n - 1]} of them are {colour}.",
            f"Every day {name} walks to the {rng.choice(_PLACES)} and back.",
        ]))
    return " ".join(sentences)


def _arithmetic_doc(rng: random.Random) -> str:
    facts = []
    for _ in range(rng.randrange(4, 9)):
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        op = rng.randrange(3)
        if op == 0:
            facts.append(f"{a} + {b} = {a + b}.")
        elif op == 1:
            a, b = max(a, b), min(a, b)
            facts.append(f"{a} - {b} = {a - b}.")
        else:
            a, b = a % 13, b % 13
            facts.append(f"{a} times {b} is {a * b}.")
    return " ".join(facts)


def _chat(rng: random.Random) -> list:
    a, b = rng.randrange(0, 50), rng.randrange(0, 50)
    chat = [{"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
    if rng.random() < 0.3:
        chat.insert(0, {"role": "system", "content": "You are a careful arithmetic tutor."})
    return chat


def _write_jsonl(path: str, docs: Iterator[str]) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)
    return path


def build_demo_corpus(out_dir: str, num_docs: int = 2000, seed: int = 1234, num_chats: int = 256,
                      tokenizer=None) -> str:
    """Generate, tokenise and store the demo corpus under ``out_dir``; return the data root.

    ``num_docs`` training documents are split 70/30 between the English and arithmetic sources;
    valid/test sources get a further 5% each (at least 8 documents). Same arguments, same bytes, so a
    second call rebuilds the corpus in place (it owns ``out_dir``).
    """
    if num_docs < 10:
        raise ValueError(f"num_docs must be at least 10, got {num_docs}")
    tok = load_tokenizer(tokenizer)
    rng = random.Random(seed)
    with open(_STORY, encoding="utf-8") as f:
        story = [p.strip() for p in f if p.strip()]
    os.makedirs(os.path.join(out_dir, "jsonl"), exist_ok=True)
    n_eng, n_valid = int(num_docs * 0.7), max(8, num_docs // 20)
    n_math = num_docs - n_eng
    sources = {
        "english_text_document": [_english_doc(rng, story) for _ in range(n_eng)],
        "arithmetic_text_document": [_arithmetic_doc(rng) for _ in range(n_math)],
        "english_valid_text_document": [_english_doc(rng, story) for _ in range(n_valid)],
        "arithmetic_valid_text_document": [_arithmetic_doc(rng) for _ in range(n_valid)],
    }
    for name, docs in sources.items():
        path = _write_jsonl(os.path.join(out_dir, "jsonl", f"{name}.jsonl"), iter(docs))
        prepare(path, os.path.join(out_dir, "tiny", name), tok, workers=1, progress=False, overwrite=True)
    chats = [_chat(rng) for _ in range(num_chats)]
    write_sft(chats, os.path.join(out_dir, SFT_PREFIX), tok, overwrite=True)
    pairs = []
    for chat in chats[: max(8, num_chats // 4)]:
        wrong = [dict(m) for m in chat]
        wrong[-1]["content"] = wrong[-1]["content"].rsplit("=", 1)[0] + f"= {rng.randrange(100, 200)}."
        pairs.append((chat, wrong))
    write_preference(pairs, os.path.join(out_dir, DPO_PREFIX), tok, overwrite=True)
    return out_dir

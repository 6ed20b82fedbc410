"""``instella data convert``: each source family on small files written in the public data sets' field
layouts (JSONL and Parquet, local files and a local Hugging Face cache), output equal to the expected
JSONL; formatting through the chat template and loss masks as ``instella data sft`` does; the MMLU
rewrite keeps the answer under its new letter for every seed; the English filter's precision; the
stage-2 text path through ``prepare``; bad input named by file, row and field."""
import json
import os
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from instella_plugin.data.blends import load_blend
from instella_plugin.data.convert import Filtered, RowConverter, convert, flatten_chat, mmlu_rewrite
from instella_plugin.data.english import is_english
from instella_plugin.data.sft import ChatFormatter, read_chat_jsonl, write_preference
from instella_plugin.data.sources import SourceError, get_source, known_sources, mmlu_templates
from instella_plugin.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


SMOLTALK = [
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": " Hello. "}], "source": "smol-magpie"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}], "source": "x"},
    {"messages": [{"role": "user", "content": "only a question"}], "source": "x"},          # no assistant turn
    {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "{}"},
                  {"role": "assistant", "content": "a"}], "source": "x"},                   # a role Instella has not
]


def test_chat_source_exact_output_counts_and_sft_formatting(tmp_path, tok):
    out = tmp_path / "smoltalk.jsonl"
    counts = convert("smoltalk", str(out), [_jsonl(tmp_path / "in.jsonl", SMOLTALK)])
    assert (counts.rows, counts.kept, dict(counts.filtered)) == (4, 2, {"no assistant turn": 1, "role 'tool'": 1})
    assert _read(out) == [{"id": "smoltalk-0", "source": "smoltalk", "messages": SMOLTALK[0]["messages"]},
                          {"id": "smoltalk-1", "source": "smoltalk", "messages": SMOLTALK[1]["messages"]}]
    assert json.load(open(str(out) + ".counts.json"))["filtered"] == {"no assistant turn": 1, "role 'tool'": 1}
    # what `instella data sft` reads and how it tokenises: ids equal the chat template's, loss on the
    # assistant content and its EOS only
    fmt = ChatFormatter(tok)
    for chat in read_chat_jsonl(str(out)):
        ids, mask = fmt(chat)
        templ = tok.apply_chat_template(chat, tokenize=True)
        templ = templ["input_ids"] if hasattr(templ, "keys") else templ
        assert ids.tolist() == list(templ)
        answers = [m["content"].strip() for m in chat if m["role"] == "assistant"]
        assert tok.decode(ids[mask == 1]) == "".join(a + "<|endoftext|>" for a in answers)
        assert ids[0] == 0 and mask[0] == 0


def test_two_field_sources_parquet_cut_and_role_map(tmp_path):
    omi = tmp_path / "omi.parquet"
    pq.write_table(pa.table({"problem": ["What is 1+1?", "Solve x=2."], "generated_solution": ["\\boxed{2}", "x=2"],
                             "expected_answer": ["2", "2"], "problem_source": ["a", "b"]}), omi)
    convert("openmathinstruct-2-1m", str(tmp_path / "omi.jsonl"), [str(omi)])
    assert [r["messages"] for r in _read(tmp_path / "omi.jsonl")] == [
        [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "\\boxed{2}"}],
        [{"role": "user", "content": "Solve x=2."}, {"role": "assistant", "content": "x=2"}]]
    o1 = _jsonl(tmp_path / "o1.jsonl", [{"question": "Why?", "longCOT": "Step 1.\nStep 2.\n####\n7", "answer": "7"}])
    convert("o1-journey", str(tmp_path / "o1-out.jsonl"), [o1])
    assert _read(tmp_path / "o1-out.jsonl")[0]["messages"][1] == {"role": "assistant", "content": "Step 1.\nStep 2."}
    hermes = _jsonl(tmp_path / "oh.jsonl", [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
                                                               {"from": "gpt", "value": "A", "weight": None}]}])
    convert("openhermes-2.5", str(tmp_path / "oh-out.jsonl"), [hermes])
    assert _read(tmp_path / "oh-out.jsonl")[0]["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]


def test_as_text_is_the_official_flattening_and_prepares(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "  Question one?\n"}, {"role": "assistant", "content": "Answer.  "}]},
            {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"},
                          {"role": "assistant", "content": "a2"}]}]
    out = tmp_path / "tulu.jsonl"
    convert("tulu-3-sft", str(out), [_jsonl(tmp_path / "t.jsonl", rows)], as_text=True)
    texts = [r["text"] for r in _read(out)]
    assert texts == ["Question one?\nAnswer.\n", "sys\nu\na\nu2\na2\n"]
    assert texts[1] == flatten_chat(rows[1]["messages"])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from instella_plugin.data.prepare import prepare

    stats = prepare([str(out)], str(tmp_path / "tulu_text"), tok, progress=False)
    ds = IndexedDataset(str(tmp_path / "tulu_text"))
    expected = [tok.encode(t, add_special_tokens=False) + [0] for t in texts]
    assert stats.documents == 2 and [ds[i].tolist() for i in range(2)] == expected


def _nested_mmlu(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        choices = [f"option {i}-{k}" for k in range(4)]
        if i % 5 == 0:
            choices[1] = choices[3] = "same text"  # duplicate option texts must not move the answer
        rows.append({"train": {"question": f"Question {i}?", "subject": "", "choices": choices, "answer": rng.randrange(4)}})
    return rows


def _answer_of(chat):
    """The option text the assistant's letter points at, read back from the user text."""
    label = re.search(r"\b([A-D])\b", chat[1]["content"]).group(1)
    return re.search(rf"^{label}\. (.*)$", chat[0]["content"], re.M).group(1)


def test_mmlu_rewrite_keeps_the_answer_under_its_new_label_for_every_seed(tmp_path):
    rows = _nested_mmlu(40)
    path = tmp_path / "mmlu.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    templates = mmlu_templates()
    seen_templates, seen_labels = set(), set()
    for seed in range(12):
        out = tmp_path / f"mmlu-{seed}.jsonl"
        convert("mmlu-auxiliary-train", str(out), [str(path)], seed=seed)
        for row, rec in zip(rows, _read(out)):
            t = row["train"]
            chat = rec["messages"]
            assert _answer_of(chat) == t["choices"][t["answer"]]
            options = re.findall(r"^[A-D]\. (.*)$", chat[0]["content"], re.M)
            assert sorted(options) == sorted(t["choices"])                        # a permutation of the options
            assert t["question"] in chat[0]["content"]
            k = [i for i, tp in enumerate(templates) if chat[1]["content"] == tp["answer"].format(label=_answer_of_label(chat))]
            seen_templates.update(k)
            seen_labels.add(_answer_of_label(chat))
    assert seen_labels == set("ABCD") and len(seen_templates) == len(templates)
    # deterministic for a seed, different across seeds
    a, b = _read(tmp_path / "mmlu-3.jsonl"), _read(tmp_path / "mmlu-4.jsonl")
    convert("mmlu-auxiliary-train", str(tmp_path / "again.jsonl"), [str(path)], seed=3)
    assert _read(tmp_path / "again.jsonl") == a and a != b
    # the duplicate-text rows: the label points at the correct index even when two options read the same
    chat = mmlu_rewrite("q", ["x", "same", "y", "same"], 3, random.Random(0), templates)
    assert _answer_of(chat) == "same"


def _answer_of_label(chat):
    return re.search(r"\b([A-D])\b", chat[1]["content"]).group(1)


# A small labelled sample: (text, is English). Reasoning-trace style, as in AM-DeepSeek-R1-Distilled.
LABELLED = [
    ("Find the value of x such that 2x + 3 = 11. Subtract 3 from both sides to get 2x = 8, so x = 4.", True),
    ("<think>Let me compute the integral of x^2 from 0 to 1. It is 1/3.</think> The answer is \\boxed{1/3}.", True),
    ("Write a Python function that returns the sum of a list.\n```python\ndef f(xs):\n    return sum(xs)\n```", True),
    ("If the angle θ satisfies sin θ = 1/2 and θ is acute, then θ = π/6, which is the answer.", True),
    ("What is 17 * 23?", True),
    ("A train travels 60 km in 45 minutes. What is its average speed in km per hour? The speed is 80 km/h.", True),
    ("Given that the sequence a_n is arithmetic with a_1 = 2 and d = 3, find the sum of the first 10 terms of it.", True),
    ("Explain why the sky is blue in a few sentences for a child, and keep it short.", True),
    ("求解方程 2x + 3 = 11，得到 x = 4。", False),
    ("<think>我们先计算积分，结果是 1/3。</think> 答案是 \\boxed{1/3}。", False),
    ("已知数列 a_n 是等差数列，a_1 = 2，d = 3，求前 10 项和。答案为 155。", False),
    ("Найдите значение x, если 2x + 3 = 11. Ответ: x = 4.", False),
    ("Trouvez la valeur de x telle que 2x + 3 = 11. On soustrait 3 des deux côtés, donc x vaut 4 dans ce cas.", False),
    ("Calcula el valor de x para que 2x + 3 = 11. Restamos 3 de ambos lados y obtenemos que x vale 4 al final.", False),
    ("Berechne den Wert von x, so dass 2x + 3 = 11 gilt. Wir ziehen 3 auf beiden Seiten ab und erhalten x gleich 4.", False),
    ("次の方程式を解きなさい：2x + 3 = 11。答えは x = 4 です。", False),
    ("Βρείτε την τιμή του x ώστε 2x + 3 = 11. Η απάντηση είναι x = 4.", False),
]


def test_english_filter_precision_on_a_labelled_sample(tmp_path):
    predicted = [(is_english(text), label) for text, label in LABELLED]
    tp = sum(p and y for p, y in predicted)
    fp = sum(p and not y for p, y in predicted)
    fn = sum(y and not p for p, y in predicted)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    print(f"english filter: precision {precision:.3f}, recall {recall:.3f} on {len(LABELLED)} labelled texts")
    assert precision == 1.0 and recall == 1.0
    rows = [{"messages": [{"role": "user", "content": t, "info": {"source": "s"}},
                          {"role": "assistant", "content": "ok " + t, "info": {"source": "s"}}]} for t, _ in LABELLED]
    counts = convert("am-deepseek-r1-distilled", str(tmp_path / "am.jsonl"), [_jsonl(tmp_path / "am_in.jsonl", rows)])
    assert counts.kept == sum(p for p, _ in predicted) and counts.filtered["not English"] == len(rows) - counts.kept


def test_preference_pairs_and_bos_on_every_sequence(tmp_path, tok):
    prompt = [{"role": "user", "content": "Name a colour."}]
    rows = [{"id": "p0", "source": "s", "prompt": "Name a colour.",
             "chosen": prompt + [{"role": "assistant", "content": "Blue."}],
             "rejected": prompt + [{"role": "assistant", "content": "No."}], "chosen_rating": 5.0, "rejected_rating": 1.0},
            {"id": "p1", "source": "s", "prompt": "x", "chosen": [{"role": "user", "content": "x"}],
             "rejected": prompt + [{"role": "assistant", "content": "No."}]}]
    out = tmp_path / "pref.jsonl"
    counts = convert("olmo-2-preference-mix", str(out), [_jsonl(tmp_path / "p.jsonl", rows)])
    assert (counts.kept, dict(counts.filtered)) == (1, {"no assistant turn": 1})
    assert _read(out) == [{"id": "olmo-2-preference-mix-0", "source": "olmo-2-preference-mix",
                           "chosen": rows[0]["chosen"], "rejected": rows[0]["rejected"]}]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    write_preference(read_chat_jsonl(str(out), preference=True), str(tmp_path / "dpo"), tok)
    seqs = IndexedDataset(str(tmp_path / "dpo_tokens"))
    fmt = ChatFormatter(tok)
    assert [seqs[i].tolist() for i in range(2)] == [fmt(rows[0]["chosen"])[0].tolist(), fmt(rows[0]["rejected"])[0].tolist()]
    assert seqs[0][0] == seqs[1][0] == tok.bos_token_id == 0  # add_bos of the official DPO run


def test_prompt_sets_and_the_local_hugging_face_cache(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "datasets--openai--gsm8k"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("c0ffee")
    data = snap / "snapshots" / "c0ffee"
    (data / "main").mkdir(parents=True)
    pq.write_table(pa.table({"question": ["Tom has 3 apples and buys 2. How many?", "Q2"],
                             "answer": ["3 + 2 = <<3+2=5>>5\n#### 5", "x\n#### 1,200"]}), data / "main" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"question": ["T"], "answer": ["#### 0"]}), data / "main" / "test-00000-of-00001.parquet")
    (data / "README.md").write_text(yaml.safe_dump({"configs": [{"config_name": "main", "data_files": [
        {"split": "train", "path": "main/train-*"}, {"split": "test", "path": "main/test-*"}]}]}).join(["---\n", "---\n"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    counts = convert("gsm8k", str(tmp_path / "g.jsonl"))
    assert counts.kept == 2
    assert _read(tmp_path / "g.jsonl") == [
        {"id": "gsm8k-0", "source": "gsm8k", "prompt": "Tom has 3 apples and buys 2. How many?", "answer": "5"},
        {"id": "gsm8k-1", "source": "gsm8k", "prompt": "Q2", "answer": "1,200"}]
    assert convert("gsm8k", str(tmp_path / "t.jsonl"), split="test").kept == 1
    with pytest.raises(SourceError, match=r"has no split 'validation'; it has \['test', 'train'\]"):
        convert("gsm8k", str(tmp_path / "v.jsonl"), split="validation")
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*huggingface-cli download "
                                                "--repo-type dataset SynthLabsAI/Big-Math-RL-Verified"):
        convert("big-math", str(tmp_path / "b.jsonl"))
    big = _jsonl(tmp_path / "big.jsonl", [{"problem": "1+1", "answer": "2", "source": "s", "domain": ["x"], "llama8b_solve_rate": 0.5}])
    convert("big-math", str(tmp_path / "b.jsonl"), [big])
    assert _read(tmp_path / "b.jsonl")[0] == {"id": "big-math-0", "source": "big-math", "answer": "2",
                                              "prompt": "1+1 Let's think step by step and output the final answer within \\boxed{}."}


def test_bad_input_is_named(tmp_path):
    with pytest.raises(SourceError, match="unknown source 'smoltalks'; known sources: .*smoltalk"):
        convert("smoltalks", str(tmp_path / "x.jsonl"), [str(tmp_path / "x")])
    bad = _jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "generated_solution": "s"}, {"problem": "p2"}])
    with pytest.raises(SourceError, match=r"bad.jsonl#2: field 'generated_solution' holds NoneType"):
        convert("openmathinstruct-2-1m", str(tmp_path / "o.jsonl"), [bad])
    assert not os.path.exists(tmp_path / "o.jsonl") and not os.path.exists(str(tmp_path / "o.jsonl") + ".partial")
    other = _jsonl(tmp_path / "other.jsonl", [{"text": "a document"}])
    with pytest.raises(SourceError, match=r"other.jsonl#1: no field 'messages' \(the row has \['text'\]\)"):
        convert("smoltalk", str(tmp_path / "s.jsonl"), [other])
    msgs = _jsonl(tmp_path / "msgs.jsonl", [{"messages": [{"speaker": "user", "text": "x"}]}])
    with pytest.raises(SourceError, match=r"msgs.jsonl#1: message 0 of 'messages' lacks 'role'/'content'"):
        convert("smoltalk", str(tmp_path / "s.jsonl"), [msgs])
    mm = tmp_path / "mm.parquet"
    pq.write_table(pa.Table.from_pylist([{"train": {"question": "q", "choices": ["a", "b"], "answer": 5}}]), mm)
    with pytest.raises(SourceError, match=r"mm.parquet#1: field 'train.answer' must be an option index 0..1, got 5"):
        convert("mmlu-auxiliary-train", str(tmp_path / "m.jsonl"), [str(mm)])
    with pytest.raises(SourceError, match="--as-text flattens chats; source 'olmo-2-preference-mix' holds preference"):
        convert("olmo-2-preference-mix", str(tmp_path / "p.jsonl"), [bad], as_text=True)
    good = _jsonl(tmp_path / "good.jsonl", SMOLTALK[:1])
    convert("smoltalk", str(tmp_path / "done.jsonl"), [good])
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        convert("smoltalk", str(tmp_path / "done.jsonl"), [good])
    with pytest.raises(ValueError, match="is also an input"):
        convert("smoltalk", good, [good], overwrite=True)
    with pytest.raises(SourceError, match="nothing to write.*filtered: {'no assistant turn': 1}"):
        convert("smoltalk", str(tmp_path / "e.jsonl"), [_jsonl(tmp_path / "q.jsonl", SMOLTALK[2:3])])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{"messages": [oops\n')
    with pytest.raises(SourceError, match=r"broken.jsonl: cannot read it as json .*JSON parse error"):
        convert("smoltalk", str(tmp_path / "br.jsonl"), [str(broken)])
    with pytest.raises(ValueError, match="unsupported input format"):
        (tmp_path / "d.csv").write_text("a,b\n")
        convert("smoltalk", str(tmp_path / "e.jsonl"), [str(tmp_path / "d.csv")])


def test_registry_covers_every_post_training_source_of_the_blends():
    by_prefix = {}
    for name in known_sources():
        src = get_source(name)
        by_prefix[(src.used_by.get("blend"), src.used_by.get("prefix"))] = src
    for row in load_blend("sft")["train"]:
        src = by_prefix[("sft", row["prefix"])]
        assert src.kind == "chat" and src.name == row["name"]
    text_rows = [r for r in load_blend("stage2")["train"] if r["prefix"].startswith(("sft-as-text/", "instella/"))]
    assert len(text_rows) == 6
    for row in text_rows:
        src = by_prefix[("stage2", row["prefix"].split("/**")[0])]
        assert src.used_by["as_text"] and src.kind == "chat"
    assert next(r for r in load_blend("sft")["train"] if r["name"] == "o1-journey")["fraction"] == 10.0
    kinds = {n: get_source(n).kind for n in known_sources()}
    assert kinds["olmo-2-preference-mix"] == "preference"
    assert {kinds[n] for n in ("big-math", "deepmath-103k", "deepscaler")} == {"prompt"}
    assert get_source("am-deepseek-r1-distilled").english_only
    with pytest.raises(Filtered):
        RowConverter(get_source("smoltalk"))({"messages": [{"role": "user", "content": "x"}]}, "f#1", 0)


U, A = {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}
BOXED = "Q? Let's think step by step and output the final answer within \\boxed{}."  # the official GRPO prompt
# One row per source in its public data set's field layout, and the record it must become.
PUBLIC_ROWS = {
    "smoltalk": ({"messages": [U, A], "source": "smol-rewrite"}, {"messages": [U, A]}),
    "openmathinstruct-2-1m": ({"problem": "Q?", "generated_solution": "A.", "expected_answer": "1", "problem_source": "math"},
                              {"messages": [U, A]}),
    "openmathinstruct-2": ({"problem": "Q?", "generated_solution": "A.", "expected_answer": "1", "problem_source": "gsm8k"},
                           {"messages": [U, A]}),
    "tulu-3-instruction-following": ({"id": "x", "prompt": "Q?", "messages": [U, A], "constraints": ["c"]}, {"messages": [U, A]}),
    "o1-journey": ({"question": "Q?", "longCOT": "A.\n####\n1", "answer": "1"}, {"messages": [U, A]}),
    "tulu-3-sft": ({"id": "x", "messages": [U, A], "source": "s"}, {"text": "Q?\nA.\n"}),
    "openhermes-2.5": ({"conversations": [{"from": "human", "value": "Q?", "weight": None},
                                          {"from": "gpt", "value": "A.", "weight": None}], "source": "s"}, {"text": "Q?\nA.\n"}),
    "webinstructsub": ({"question": "Q?", "answer": "A.", "source": "s", "index": 3}, {"text": "Q?\nA.\n"}),
    "code-feedback": ({"id": 1, "messages": [U, A]}, {"text": "Q?\nA.\n"}),
    "ultrachat-200k": ({"prompt": "Q?", "prompt_id": "p", "messages": [U, A]}, {"text": "Q?\nA.\n"}),
    "instella-gsm8k-synthetic": ({"messages": [U, A]}, {"text": "Q?\nA.\n"}),
    "olmo-2-preference-mix": ({"id": "x", "source": "s", "prompt": "Q?", "chosen": [U, A],
                               "rejected": [U, {"role": "assistant", "content": "B."}]},
                              {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "B."}]}),
    "am-deepseek-r1-distilled": ({"messages": [dict(U, info={"source": "s"}), dict(A, info={"answer_content": "A."})]},
                                 {"messages": [U, A]}),
    "big-math": ({"problem": "Q?", "answer": "1", "source": "s", "domain": ["d"], "llama8b_solve_rate": 0.2},
                 {"prompt": BOXED, "answer": "1"}),
    "deepmath-103k": ({"question": "Q?", "final_answer": "1", "difficulty": 5.0, "topic": "t", "r1_solution_1": "s1",
                       "r1_solution_2": "s2", "r1_solution_3": "s3"}, {"prompt": BOXED, "answer": "1"}),
    "deepscaler": ({"problem": "Q?", "answer": "1", "solution": "s"}, {"prompt": BOXED, "answer": "1"}),
    "gsm8k": ({"question": "Q?", "answer": "steps <<1+0=1>>\n#### 1"}, {"prompt": "Q?", "answer": "1"}),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_ROWS))
def test_every_source_on_its_public_layout(name, tmp_path):
    row, expected = PUBLIC_ROWS[name]
    src = get_source(name)
    as_text = "text" in expected
    assert as_text == bool(src.used_by.get("as_text"))
    got = RowConverter(src, as_text=as_text)(row, "f#1", 0)
    assert got == dict(id=f"{name}-0", source=name, **expected)
    out = tmp_path / "o.jsonl"   # and through the files: JSONL in, the same record out
    convert(name, str(out), [_jsonl(tmp_path / "in.jsonl", [row])], as_text=as_text)
    assert _read(out) == [got]


def test_every_source_but_the_mmlu_rewrite_has_a_public_row():
    assert set(known_sources()) - set(PUBLIC_ROWS) == {"mmlu-auxiliary-train"}


def test_command_line(tmp_path, capsys):
    from instella_plugin.data.cli import main

    inp = _jsonl(tmp_path / "in.jsonl", SMOLTALK)
    out = tmp_path / "out.jsonl"
    assert main(["convert", "smoltalk", "--input", inp, "--output", str(out), "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    assert "smoltalk: 3 rows read, 2 kept, 1 filtered\n  filtered (no assistant turn): 1" in printed
    assert len(_read(out)) == 2
    assert main(["convert", "--list"]) == 0 and "olmo-2-preference-mix" in capsys.readouterr().out
    assert main(["convert", "smol", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown source 'smol'" in capsys.readouterr().err
    assert main(["convert", "smoltalk", "--input", inp]) == 2
    assert "--output is required" in capsys.readouterr().err
    assert main(["convert", "smoltalk", "--input", inp, "--output", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_progress_counts_rows_against_the_parquet_total(tmp_path, capsys):
    path = tmp_path / "bm.parquet"
    pq.write_table(pa.table({"problem": ["a", "b", "c", ""], "answer": ["1", "2", "3", "4"]}), path)
    counts = convert("big-math", str(tmp_path / "o.jsonl"), [str(path)], progress_every=1e-9)
    err = capsys.readouterr().err
    assert "big-math: 2 rows/4 (50%), 2 kept" in err and "big-math: 4 rows/4 (100%), 3 kept" in err and "ETA" in err
    assert dict(counts.filtered) == {"empty prompt or answer": 1}

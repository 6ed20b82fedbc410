"""Synthetic long-context QA through the TextGenerator seam.

Fast: a scripted generator (a test double behind the seam) answers each span prompt with a question
about the span's first word; the chats hold the whole document then the question, the answer is the
word the span really starts with (read back with the tokenizer), spans have the configured lengths,
bad replies are counted and dropped, bad settings refused. Slow: the pipeline on a tiny Megatron
checkpoint (megatron-core's inference engine), its chats formatted by ``instella data sft`` and
trained through the ``long-sft`` recipe at tiny size (packed, document-masked, CP 2).
"""
import json
import random

import pytest
import yaml

from instella_plugin import cli
from instella_plugin.data.tokenizer import load_tokenizer
from instella_plugin.inference.api import Completion
from instella_plugin.synth.long_qa import LongQAConfig, parse_qa, split_spans, synthesise_long_qa, write_long_qa
from instella_plugin.synth.long_qa_cli import main  # imports megatron-core's inference (its faulthandler needs the real stderr)

WORDS = ("amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lumen meadow nectar onyx "
         "pebble quartz raven saffron tundra umber violet willow xenon yarrow zephyr").split()


def document(seed, words=600):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


class ScriptedGenerator:
    """Replies "Question/Answer" about the passage's first word; every ``bad_every``-th reply is junk."""

    def __init__(self, tokenizer, bad_every=0):
        self.tokenizer, self.bad_every, self.calls = tokenizer, bad_every, []

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        out = []
        for p in prompts:
            passage = p.split("Passage:\n", 1)[1].strip()
            n = sum(len(c[0]) for c in self.calls)
            first = passage.split()[0]
            text = ("no idea" if self.bad_every and (len(out) + n) % self.bad_every == 0 else
                    f"Question: Which word opens the passage?\nAnswer: {first}")
            out.append(Completion(prompt_tokens=(), tokens=(), text=text, finish_reason="eos"))
        return out


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_spans_cover_the_document_with_the_configured_lengths():
    rng = random.Random(0)
    for n in (1, 50, 99, 100, 1234, 9999):
        spans = split_spans(n, (40, 100), rng)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        lengths = [e - a for a, e in spans]
        assert all(40 <= x <= 100 for x in lengths[:-1])
        assert len(spans) == 1 or 40 <= lengths[-1] <= 139


def test_parse_qa():
    assert parse_qa("Question: Who?\nAnswer: Ann.") == ("Who?", "Ann.")
    assert parse_qa("  Sure!\nQuestion: What is x?\n\nAnswer: 3\nmore text") == ("What is x?", "3\nmore text")
    assert parse_qa("Answer: 3") is None and parse_qa("Question: q\nAnswer:   ") is None


def test_qa_chats_hold_the_document_then_the_question(tok):
    docs = [document(1), document(2, 40), document(3, 900)]  # the second is too short
    cfg = LongQAConfig(span_tokens=(64, 128), spans_per_document=2, min_document_tokens=200, batch_size=3)
    gen = ScriptedGenerator(tok)
    counts = {}
    records = list(synthesise_long_qa(docs, gen, cfg, tok, counts))
    assert counts == {"documents": 3, "skipped_short": 1, "prompts": 4, "chats": 4, "unparsable": 0}
    assert [len(c[0]) for c in gen.calls] == [3, 1]  # batched
    assert gen.calls[0][1].greedy and gen.calls[0][1].max_new_tokens == cfg.max_new_tokens
    for r in records:
        user, assistant = r["messages"]
        doc = docs[r["source"]["document"]]
        assert user["role"] == "user" and user["content"] == doc + "\n\nWhich word opens the passage?"
        a, e = r["source"]["span"]
        assert 64 <= e - a <= 191
        ids = tok.encode(doc, add_special_tokens=False)
        assert assistant == {"role": "assistant", "content": tok.decode(ids[a:e]).split()[0]}
    # deterministic for a seed
    assert list(synthesise_long_qa(docs, ScriptedGenerator(tok), cfg, tok)) == records


def test_unparsable_replies_are_counted_and_dropped(tmp_path, tok):
    docs = [document(k) for k in range(6)]
    cfg = LongQAConfig(span_tokens=(64, 128), min_document_tokens=200)
    counts = write_long_qa(docs, ScriptedGenerator(tok, bad_every=3), str(tmp_path / "qa.jsonl"), cfg, tok)
    assert counts["prompts"] == 6 and counts["unparsable"] == 2 and counts["chats"] == 4
    lines = (tmp_path / "qa.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x)["messages"][1]["content"] for x in lines)
    summary = json.loads((tmp_path / "qa.jsonl.summary.json").read_text())
    assert summary["chats"] == 4 and summary["config"]["span_tokens"] == [64, 128]
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_long_qa(docs, ScriptedGenerator(tok), str(tmp_path / "qa.jsonl"), cfg, tok)
    with pytest.raises(ValueError, match="no long-context chats.*1 shorter than"):
        write_long_qa([document(9, 10)], ScriptedGenerator(tok), str(tmp_path / "none.jsonl"), cfg, tok)
    assert not (tmp_path / "none.jsonl").exists() and not (tmp_path / "none.jsonl.partial").exists()


def test_summary_kind_names_the_span_by_its_opening(tok):
    class Echo:
        tokenizer = tok

        def generate(self, prompts, params):
            return [Completion((), (), "A summary.", "eos") for _ in prompts]

    cfg = LongQAConfig(kind="summary", span_tokens=(64, 128), min_document_tokens=200, opening_words=5)
    (rec,) = synthesise_long_qa([document(4)], Echo(), cfg, tok)
    a, e = rec["source"]["span"]
    ids = tok.encode(document(4), add_special_tokens=False)
    opening = " ".join(tok.decode(ids[a:e]).split()[:5])
    assert rec["messages"][0]["content"].endswith(f'Summarise the part of the document that begins with "{opening}".')
    assert rec["messages"][1]["content"] == "A summary."


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="quiz"), "unknown long-QA kind"), (dict(span_tokens=(10, 5)), "MIN <= MAX"),
    (dict(span_tokens=(2048, 8192), min_document_tokens=100), "shorter than a span"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LongQAConfig(**kwargs)


def test_cli_through_an_openai_compatible_endpoint(tmp_path, capsys):
    """The CLI end to end against a local HTTP server speaking /v1/completions."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            first = body["prompt"].split("Passage:\n", 1)[1].split()[0]
            reply = {"choices": [{"text": f"Question: First word?\nAnswer: {first}", "finish_reason": "stop"}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        docs = tmp_path / "docs.jsonl"
        docs.write_text("".join(json.dumps({"text": document(k)}) + "\n" for k in range(3)))
        out = tmp_path / "qa.jsonl"
        argv = [str(docs), "--output", str(out), "--endpoint", f"http://127.0.0.1:{server.server_port}/v1",
                "--span-tokens", "64", "128", "--min-document-tokens", "200", "--max-new-tokens", "32"]
        assert main(argv) == 0
        assert "3 chats from 3 documents" in capsys.readouterr().out
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(rows) == 3 and len(seen) == 3 and seen[0]["max_tokens"] == 32 and seen[0]["temperature"] == 0.0
        assert all(r["messages"][0]["content"].endswith("First word?") for r in rows)
        assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
        assert main([str(tmp_path / "none.jsonl")] + argv[1:] + ["--overwrite"]) == 2
    finally:
        server.shutdown()


# ---- slow: a tiny checkpoint generates, long-sft trains on the result --------------------------------
def _generate_with_checkpoint(load, docs, out_path):
    from instella_plugin.inference.loading import checkpoint_plan, init_inference_parallel, load_generator

    init_inference_parallel(device="cpu")
    gen = load_generator(checkpoint_plan(load))
    cfg = LongQAConfig(kind="summary", span_tokens=(48, 64), min_document_tokens=100, max_new_tokens=8)
    return write_long_qa(docs, gen, out_path, cfg)


@pytest.mark.slow
@pytest.mark.dist
def test_tiny_checkpoint_generates_and_long_sft_trains_on_it(tmp_path, tok):
    from instella_plugin.data.sft import read_chat_jsonl, write_sft
    from instella_plugin.testing.distributed import run_distributed
    from instella_plugin.testing.trainer import TINY_MODEL, read_log, run_trainer
    from instella_plugin.training.recipes import load_recipe

    start = tmp_path / "tiny"
    run_trainer(1, TINY_MODEL + ["--model-preset", "instella-tiny", "--seq-length", "256", "--train-iters", "1",
                                 "--lr-warmup-iters", "0", "--global-batch-size", "2", "--micro-batch-size", "2",
                                 "--save", start])
    docs = [document(k, 50) for k in range(4)]  # each chat (document, question, answer) fits 256 tokens
    out = str(tmp_path / "long_qa.jsonl")
    counts = run_distributed(_generate_with_checkpoint, 1, str(start), docs, out)[0]
    print(f"long-qa on a tiny checkpoint: {counts}")
    assert counts["chats"] == counts["prompts"] == 4
    root = tmp_path / "data"
    chats = list(read_chat_jsonl(out))
    for name in ("books", "dclm", "arxiv", "ultrachat-200k", "openmathinstruct2", "mmlu-auxiliary-train",
                 "tulu3-personas"):
        write_sft(chats, str(root / "long-sft" / name / "part0"), tok)
    recipe = dict(load_recipe("long-sft"), model_preset="instella-tiny", seq_length=256,
                  max_position_embeddings=256, global_batch_size=2, micro_batch_size=1, context_parallel_size=2,
                  train_iters=3, lr_decay_iters=3, lr_warmup_iters=1, bf16=False, use_distributed_optimizer=False,
                  recompute_granularity=None, recompute_method=None, recompute_num_layers=None, log_interval=1,
                  rotary_base=10000, reset_iteration=False)
    recipe = {k: v for k, v in recipe.items() if v is not None and k != "name"}
    (tmp_path / "long-sft-tiny.yaml").write_text(yaml.safe_dump(recipe))
    run_trainer(2, ["--plugin", "instella", "--instella-recipe", tmp_path / "long-sft-tiny.yaml",
                    "--data-root", root, "--device", "cpu", "--no-plot", "--save", tmp_path / "sft"])
    losses, _ = read_log(tmp_path / "sft")
    print(f"long-sft tiny on the synthesised chats (CP 2): losses {losses}")
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 20 for v in losses.values())


def test_instella_data_synth_routes_long_qa(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "synth", "long-qa", "--help"])
    assert exit_info.value.code == 0
    assert "usage: instella data synth long-qa" in capsys.readouterr().out

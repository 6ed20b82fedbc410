"""The GSM8K-synthetic pipeline with a scripted generator: programs that do not reproduce the answer,
raise, loop, import os/subprocess or allocate without bound are rejected with their reason counted; kept
problems' answers equal their program's output (and an independent computation); a planted
near-duplicate of a test problem is dropped; an endpoint that is down or slow is retried, then named;
an interrupted run resumes to the same output; the command line end to end through an HTTP endpoint."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from instella_plugin.inference.api import Completion, SamplingParams
from instella_plugin.synth.decontaminate import NgramIndex, normalise
from instella_plugin.synth.cli import main  # imports megatron-core's inference (its faulthandler needs the real stderr)
from instella_plugin.synth.endpoint import GeneratorUnavailable, OpenAIEndpoint, Retrying, check_one_process
from instella_plugin.synth.gsm8k import SynthConfig, final_answer, synthesise
from instella_plugin.synth.sandbox import SandboxLimits, run_program

LIMITS = SandboxLimits(call_timeout_s=1.0, memory_mb=256)
CONFIG = SynthConfig(per_seed=4, attempts=24, seed=7, batch_size=4)


def _program(params, question, body, constraints="True", preamble=""):
    names = ", ".join(params)
    return (f"```python\n{preamble}PARAMETERS = {params!r}\nQUESTION = {question!r}\n\n"
            f"def constraints({names}):\n    return {constraints}\n\n"
            f"def answer({names}):\n{body}\n```\n")


# (seed question, gold answer, generator's abstraction, how the scripted solver answers a new problem)
APPLES = "Tom has {apples} apples and buys {more} more. How many apples does he have now?"
CAKES = "Lena bakes {cakes} cakes and cuts each cake into {slices} slices. How many slices are there in total?"
WALK = "Sam walks {km} km every day for {days} days. How many km does he walk in all?"
SEEDS = [
    (APPLES.format(apples=3, more=5), "8", _program({"apples": 3, "more": 5}, APPLES, "    return apples + more",
                                                    "apples >= 1 and more >= 1"), lambda a, b: a + b),
    ("A box holds 12 pens. How many pens are in 4 boxes?", "48",
     _program({"pens": 12, "boxes": 4}, "A box holds {pens} pens. How many pens are in {boxes} boxes?",
              "    return pens + boxes"), None),
    ("Ann splits 10 sweets among 2 friends. How many does each get?", "5",
     _program({"sweets": 10, "friends": 2}, "Ann splits {sweets} sweets among {friends} friends. How many does each get?",
              "    return sweets / (friends - 2)"), None),
    ("A clock ticks 60 times a minute. How many ticks in 3 minutes?", "180",
     _program({"ticks": 60, "minutes": 3}, "A clock ticks {ticks} times a minute. How many ticks in {minutes} minutes?",
              "    while True:\n        pass"), None),
    ("Joe has 7 cards and gets 2 more. How many cards?", "9",
     _program({"cards": 7, "more": 2}, "Joe has {cards} cards and gets {more} more. How many cards?",
              "    return cards + more", preamble="import os\n"), None),
    ("Kim has 4 hats and 4 scarves. How many items?", "8",
     _program({"hats": 4, "scarves": 4}, "Kim has {hats} hats and {scarves} scarves. How many items?",
              "    subprocess.run(['ls'])\n    return hats + scarves", preamble="import subprocess\n"), None),
    ("A shelf has 5 rows of 9 books. How many books?", "45",
     _program({"rows": 5, "books": 9}, "A shelf has {rows} rows of {books} books. How many books?",
              "    x = []\n    while True:\n        x.append(bytearray(10 ** 8))"), None),
    ("Bo runs 3 laps twice. How many laps?", "6", "I am not sure how to write this as a program.", None),
    (CAKES.format(cakes=4, slices=8), "32", _program({"cakes": 4, "slices": 8}, CAKES, "    return cakes * slices"),
     lambda a, b: a * b),
    (WALK.format(km=2, days=6), "12", _program({"km": 2, "days": 6}, WALK, "    return km * days"),
     lambda a, b: a * b + 1),   # the solver gets these wrong: they must all be dropped
    ("Eve has 6 pears and eats 2. How many are left?", "4",
     _program({"pears": 6, "eaten": 2}, "Eve has {pears} pears and eats {eaten}. How many are left?",
              "    return pears - eaten", constraints="False"), None),
]
# the held-out set holds a near-duplicate of the cakes problem (other numbers): its instances must go
TEST_SET = ["Lena bakes 7 cakes and cuts each cake into 6 slices. How many slices are there in total?",
            "A train leaves at 9 and arrives at 11. How long is the trip in hours?"]
SEED_RECORDS = [{"id": str(i), "prompt": q, "answer": a} for i, (q, a, _, _) in enumerate(SEEDS)]


class Scripted:
    """A test double of the TextGenerator seam: abstractions by seed question, solutions by template."""
    tokenizer = None

    def __init__(self):
        self.calls = 0
        self.by_question = {q: resp for q, _, resp, _ in SEEDS}
        self.solvers = [(re.compile(re.escape(t).replace(r"\{apples\}", r"(\d+)").replace(r"\{more\}", r"(\d+)")
                                    .replace(r"\{cakes\}", r"(\d+)").replace(r"\{slices\}", r"(\d+)")
                                    .replace(r"\{km\}", r"(\d+)").replace(r"\{days\}", r"(\d+)")), fn)
                        for t, fn in ((APPLES, SEEDS[0][3]), (CAKES, SEEDS[8][3]), (WALK, SEEDS[9][3]))]

    def describe(self):
        return "scripted"

    def respond(self, prompt: str) -> str:
        if prompt.rstrip().endswith("Answer:"):
            question = prompt.rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]
            for pattern, fn in self.solvers:
                m = pattern.fullmatch(question)
                if m:
                    a, b = map(int, m.groups())
                    return f" We combine {a} and {b}. The answer is {fn(a, b)}.\n\nQuestion: more"
            return " I do not know. The answer is 0."
        question = prompt.rsplit("Problem: ", 1)[1].strip()
        return self.by_question[question]

    def generate(self, prompts, params):
        assert isinstance(params, SamplingParams)
        self.calls += 1
        return [Completion(prompt_tokens=(), tokens=(), text=self.respond(p), finish_reason="stop") for p in prompts]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


EXPECTED_REJECTED = {"program: does not reproduce the answer": 1, "program: raised ZeroDivisionError": 1,
                     "program: timeout": 1, "program: imports os": 1, "program: imports subprocess": 1,
                     "program: memory limit": 1, "no program in the response": 1,
                     "solution: disagrees with the program": 4}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "gsm8k-synthetic.jsonl")
    summary = synthesise(SEED_RECORDS, out, Scripted(), NgramIndex(TEST_SET), CONFIG, LIMITS)
    return out, summary


def test_counts_and_reasons(full_run):
    out, s = full_run
    print("summary:", s.report())
    assert (s.seeds, s.abstracted, s.verified, s.reinstantiated, s.decontaminated, s.agreed, s.kept) == (11, 8, 4, 12, 4, 4, 4)
    rejected = dict(s.rejected)
    assert rejected.pop("instance: outside the constraints") > 0
    assert rejected == EXPECTED_REJECTED
    assert json.load(open(out + ".summary.json"))["kept"] == 4
    with open(out + ".summary.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_kept_answers_equal_their_programs(full_run):
    out, _ = full_run
    records = _read(out)
    assert len(records) == 4 and len({r["question"] for r in records}) == 4
    for r in records:
        apples, more = r["provenance"]["parameters"]["apples"], r["provenance"]["parameters"]["more"]
        assert r["question"] == APPLES.format(apples=apples, more=more) != SEEDS[0][0]
        assert r["answer"] == str(apples + more)                      # independent of the program
        run = run_program(re.search(r"```python\n(.*)```", SEEDS[0][2], re.S).group(1),
                          [{"function": "answer", "kwargs": r["provenance"]["parameters"]}], (), LIMITS)
        assert run.calls[0]["value"] == int(r["answer"])              # the program's own output
        assert final_answer(r["solution"]) == float(r["answer"])
        assert r["messages"] == [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["solution"]}]
        assert r["text"] == r["question"] + "\n" + r["solution"] + "\n"
        assert r["provenance"]["seed_id"] == "0" and r["provenance"]["generator"] == "scripted"
        assert "Question:" not in r["solution"]                       # cut at the stop string


def test_decontamination_drops_the_planted_near_duplicate():
    index = NgramIndex(TEST_SET)
    assert normalise("Lena bakes 12 cakes, $3.50 each (25%).") == ["lena", "bakes", "<num>", "cakes", "<num>", "each", "<num>"]
    assert index.contaminated(CAKES.format(cakes=9, slices=12))
    assert index.overlap(CAKES.format(cakes=9, slices=12)) == 1.0
    assert not index.contaminated(APPLES.format(apples=9, more=12))
    assert index.contaminated("A train leaves at 5 and arrives at 8.")     # shorter than n: found whole
    assert not index.contaminated("A train leaves at noon.")


def test_generator_down_then_resume_gives_the_same_output(tmp_path, full_run):
    class DownAfter(Scripted):
        def generate(self, prompts, params):
            if self.calls >= 2:
                raise ConnectionError("connection refused")
            return super().generate(prompts, params)

    out = str(tmp_path / "resumed.jsonl")
    slept = []
    flaky = Retrying(DownAfter(), retries=2, backoff_s=0.5, sleep=slept.append, log=lambda m: None)
    with pytest.raises(GeneratorUnavailable, match="scripted did not answer after 3 tries .*ConnectionError"):
        synthesise(SEED_RECORDS, out, flaky, NgramIndex(TEST_SET), CONFIG, LIMITS)
    assert slept == [0.5, 1.0]                                        # exponential backoff
    assert len(_read(out + ".partial")) == 4                          # the first batch is on disk
    with pytest.raises(ValueError, match="other settings.*per_seed"):
        synthesise(SEED_RECORDS, out, Scripted(), NgramIndex(TEST_SET), SynthConfig(per_seed=2, seed=7, batch_size=4), LIMITS)
    again = Scripted()
    summary = synthesise(SEED_RECORDS, out, again, NgramIndex(TEST_SET), CONFIG, LIMITS)
    assert again.calls == 3      # only the two unfinished batches: seeds 4-7 (nothing to solve), seeds 8-10
    assert _read(out) == _read(full_run[0]) and summary.as_dict() == full_run[1].as_dict()


class _Handler(BaseHTTPRequestHandler):
    script = Scripted()
    mode = {"fail": 0, "sleep": 0.0}
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, body))
        if self.mode["sleep"]:
            threading.Event().wait(self.mode["sleep"])
        if self.mode["fail"] > 0:
            self.mode["fail"] -= 1
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"overloaded")
            return
        if self.path.endswith("/chat/completions"):
            text = self.script.respond(body["messages"][-1]["content"])
            answer = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        else:
            answer = {"choices": [{"text": self.script.respond(body["prompt"]), "finish_reason": "stop"}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_openai_endpoint_answers_retries_and_fails_clearly(server):
    params = SamplingParams(max_new_tokens=32, temperature=0.0, stop=("\n\nQuestion:",))
    prompt = "Question: " + APPLES.format(apples=2, more=2) + "\nAnswer:"
    (c,) = OpenAIEndpoint(server, "m").generate([prompt], params)
    assert c.text.endswith("The answer is 4.\n\nQuestion: more")
    path, body = _Handler.seen[-1]
    assert path == "/v1/completions" and body["stop"] == ["\n\nQuestion:"] and body["max_tokens"] == 32
    (c,) = OpenAIEndpoint(server, "m", chat=True).generate([prompt], params)
    assert "The answer is 4." in c.text and _Handler.seen[-1][0] == "/v1/chat/completions"
    _Handler.mode["fail"] = 2                                          # 503 twice, then an answer
    (c,) = Retrying(OpenAIEndpoint(server, "m"), retries=3, sleep=lambda s: None, log=lambda m: None).generate([prompt], params)
    assert "The answer is 4." in c.text and _Handler.mode["fail"] == 0
    _Handler.mode["sleep"] = 1.0                                       # slower than the client's timeout
    with pytest.raises(GeneratorUnavailable, match="did not answer after 2 tries.*timed out"):
        Retrying(OpenAIEndpoint(server, "m", timeout_s=0.2), retries=1, sleep=lambda s: None, log=lambda m: None).generate([prompt], params)
    _Handler.mode["sleep"] = 0.0
    down = "http://127.0.0.1:9/v1"                                     # nothing listens on the discard port
    with pytest.raises(GeneratorUnavailable, match="openai-endpoint http://127.0.0.1:9/v1 model m did not answer "
                                                   "after 3 tries .*refused"):
        Retrying(OpenAIEndpoint(down, "m"), retries=2, sleep=lambda s: None, log=lambda m: None).generate([prompt], params)


def test_command_line_end_to_end_through_an_endpoint(tmp_path, server, capsys):
    seeds = tmp_path / "train.jsonl"
    seeds.write_text("".join(json.dumps({"question": q, "answer": f"Some steps.\n#### {a}"}) + "\n" for q, a, _, _ in SEEDS))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in TEST_SET))
    out = tmp_path / "synthetic.jsonl"
    argv = ["gsm8k", "--endpoint", server, "--model", "m", "--seeds", str(seeds), "--test-set", str(test),
            "--output", str(out), "--per-seed", "4", "--seed", "7", "--batch-size", "4", "--call-timeout", "1.0",
            "--memory-mb", "256", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "seeds 11, abstracted 8, verified 4, re-instantiated 12, decontaminated 4, agreed 4, kept 4" in printed
    assert [r["answer"] for r in _read(out)] == [str(sum(r["provenance"]["parameters"].values())) for r in _read(out)]
    assert main(argv) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    down = ["gsm8k", "--endpoint", "http://127.0.0.1:9/v1", "--seeds", str(seeds), "--test-set", str(test),
            "--output", str(tmp_path / "down.jsonl"), "--retries", "1", "--backoff", "0.01", "--no-progress"]
    assert main(down) == 3
    err = capsys.readouterr().err
    assert "did not answer after 2 tries" in err and "rerun the same command to resume" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    assert main(down[:5] + ["--test-set", str(bad), "--output", str(tmp_path / "b.jsonl")]) == 2
    assert "bad.jsonl#1: no field 'question'" in capsys.readouterr().err


def test_held_out_texts_from_an_evaluation_task(tmp_path, server, capsys):
    from instella_plugin.synth.held_out import task_texts

    folder = tmp_path / "evaldata" / "openai" / "gsm8k" / "main"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text("".join(json.dumps({"question": q, "answer": "x\n#### 1"}) + "\n" for q in TEST_SET))
    texts = task_texts(["gsm8k"], str(tmp_path / "evaldata"))
    assert texts == [f"{q} x\n#### 1" for q in TEST_SET]
    assert NgramIndex(texts).contaminated(CAKES.format(cakes=2, slices=3))
    seeds = tmp_path / "train.jsonl"
    seeds.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a, _, _ in SEEDS[8:10]))
    out = tmp_path / "o.jsonl"
    assert main(["gsm8k", "--endpoint", server, "--seeds", str(seeds), "--decontaminate-tasks", "gsm8k",
                 "--eval-data-dir", str(tmp_path / "evaldata"), "--output", str(out), "--seed", "7", "--no-progress"]) == 1
    summary = json.load(open(str(out) + ".summary.json"))
    assert (summary["verified"], summary["decontaminated"], summary["kept"]) == (2, 4, 0)
    assert main(["gsm8k", "--endpoint", server, "--seeds", str(seeds), "--decontaminate-tasks", "gsm8k",
                 "--eval-data-dir", str(tmp_path / "nowhere"), "--output", str(out) + "2", "--no-progress"]) == 2
    assert "no data for openai/gsm8k main split 'test'" in capsys.readouterr().err


def test_a_seed_without_a_numeric_answer_and_a_hostile_template_are_counted():
    from instella_plugin.synth.gsm8k import Pipeline

    hostile = "Ria has 2 dogs and 3 cats. How many pets?"
    script = Scripted()
    script.by_question[hostile] = _program({"dogs": 2, "cats": 3}, "Ria has {dogs:>999999999999} dogs and {cats} cats. "
                                           "How many pets?", "    return dogs + cats")
    records, counts = Pipeline(script, NgramIndex(TEST_SET), CONFIG, LIMITS).process(
        [(0, {"id": "0", "prompt": SEEDS[0][0], "answer": "eight"}), (1, SEED_RECORDS[0]),
         (2, {"id": "2", "prompt": hostile, "answer": "5"})])
    assert dict(counts.rejected) == {"seed: answer is not a number": 1,
                                     "program: QUESTION is not plain text with {name} fields of PARAMETERS": 1}
    assert counts.seeds == 3 and counts.kept == 4


def test_generated_parameters_must_be_finite_numbers():
    from instella_plugin.synth.gsm8k import _valid_parameters, draw_parameters

    assert _valid_parameters({"a": 3, "rate": 0.25, "price": 2.5})
    for bad in ({"a": float("inf")}, {"a": float("nan")}, {"a": True}, {"a": "3"}, {}, {"not a name": 1}, {"a": 10 ** 13}):
        assert not _valid_parameters(bad), bad
    import random

    rng = random.Random(0)
    for _ in range(200):
        new = draw_parameters({"n": 12, "one": 1, "zero": 0, "neg": -6, "frac": 0.25, "price": 2.5}, rng)
        assert new["one"] == 1 and new["zero"] == 0 and isinstance(new["n"], int) and 6 <= new["n"] <= 24
        assert -12 <= new["neg"] <= -3 and new["frac"] in (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.8, 0.9)
        assert 1.2 <= new["price"] <= 5.0 and round(new["price"], 1) == new["price"]


def test_endpoint_key_and_one_process_refusals(monkeypatch):
    monkeypatch.delenv("SYNTH_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="--api-key-env SYNTH_TEST_KEY: that environment variable is not set"):
        OpenAIEndpoint.from_flags("http://localhost:1/v1", "m", api_key_env="SYNTH_TEST_KEY", chat=False, timeout_s=1)
    monkeypatch.setenv("SYNTH_TEST_KEY", "secret")
    assert OpenAIEndpoint.from_flags("http://h/v1/", "m", api_key_env="SYNTH_TEST_KEY", chat=True,
                                     timeout_s=1).api_key == "secret"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="long-qa with --load runs in one process.*--endpoint"):
        check_one_process("long-qa")
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_one_process("long-qa")

"""Needle-in-a-haystack over lengths x depths, scored against a generator whose behaviour is known.

The scripted generator reads only the last ``window`` tokens of each prompt (a model with a short
effective context) and answers with the magic number of the asked key when the whole needle is in
view. So the expected accuracy of every (length, depth) cell follows by hand from where the needle
sits in the tokenised prompt; the evaluation must report exactly that grid, in its JSON and heatmap.
Slow: ``instella eval niah`` on a tiny Megatron checkpoint end to end.
"""
import json
import re
import subprocess
import sys

import pytest

from instella_plugin.data.tokenizer import load_tokenizer
from instella_plugin.evaluation.long_context import (
    NeedleConfig,
    accuracy_grid,
    build_examples,
    evaluate_needles,
    plot_heatmap,
    table,
    write_results,
)
from instella_plugin.inference.api import Completion

LENGTHS, DEPTHS, WINDOW = (256, 512, 1024), (0.0, 0.5, 1.0), 600


class WindowedGenerator:
    def __init__(self, tokenizer, window, first_needle=False):
        self.tokenizer, self.window, self.first_needle = tokenizer, window, first_needle

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            ids = self.tokenizer.encode(p, add_special_tokens=False)
            seen = self.tokenizer.decode(ids[-self.window:])
            key = re.search(r"What is the special magic number for (\w+)", seen).group(1)
            asked = "\\w+" if self.first_needle else key
            m = re.search(rf"One of the special magic numbers for {asked} is: (\d+)\.", seen)
            out.append(Completion((), (), f" {m.group(1)}." if m else " I do not know.", "eos"))
        return out


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _needle_start(tok, prompt, key):
    """Token index where the asked needle starts (found by hand in the prompt text)."""
    at = prompt.index(f"One of the special magic numbers for {key} is:")
    return len(tok.encode(prompt[:at], add_special_tokens=False))


def test_prompts_have_the_asked_length_and_depth(tok):
    cfg = NeedleConfig(lengths=LENGTHS, depths=DEPTHS, samples=2)
    examples = build_examples(cfg, tok)
    assert len(examples) == len(LENGTHS) * len(DEPTHS) * 2
    for e in examples:
        n = len(tok.encode(e.prompt, add_special_tokens=False))
        assert e.length - 20 <= n <= e.length  # within one filler sentence, never over
        assert e.prompt.count(e.answer) == 1 and e.prompt.count(f"numbers for {e.key} is") == 1
        start = _needle_start(tok, e.prompt, e.key)
        assert start == e.needle_token
        # depth: the share of the haystack (between the instructions and the question) before the needle
        h = len(tok.encode(e.prompt[:e.prompt.index("afterwards.\n") + 12], add_special_tokens=False))
        t = len(tok.encode(e.prompt[:e.prompt.index("\nWhat is the special")], add_special_tokens=False))
        needle = len(tok.encode(f"One of the special magic numbers for {e.key} is: {e.answer}. ",
                                add_special_tokens=False))
        assert abs((start - h) / (t - h - needle) - e.depth) <= 0.05, (e.length, e.depth, start, h, t)
    assert [e.prompt for e in build_examples(cfg, tok)] == [e.prompt for e in examples]  # seeded


def test_accuracy_grid_equals_the_hand_computed_one(tmp_path, tok):
    cfg = NeedleConfig(lengths=LENGTHS, depths=DEPTHS, samples=2, seed=7)
    record = evaluate_needles(WindowedGenerator(tok, WINDOW), cfg, log=None)
    expected = {}
    for e in build_examples(cfg, tok):
        n = len(tok.encode(e.prompt, add_special_tokens=False))
        expected.setdefault((e.length, e.depth), []).append(_needle_start(tok, e.prompt, e.key) >= n - WINDOW)
    lengths, depths, grid = accuracy_grid(record)
    assert lengths == list(LENGTHS) and depths == list(DEPTHS)
    want = [[sum(expected[(n, d)]) / 2 for n in LENGTHS] for d in DEPTHS]
    assert grid == want
    assert {v for row in want for v in row} >= {0.0, 1.0}  # the window really cuts some needles off
    assert record["per_length"]["256"] == 1.0 and record["per_length"]["1024"] < 1.0
    assert record["accuracy"] == pytest.approx(sum(map(sum, want)) / 9)
    path = write_results(str(tmp_path / "niah.json"), record)
    assert json.loads(open(path).read())["cells"] == record["cells"]
    png = plot_heatmap(record, str(tmp_path / "niah.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "overall" in table(record) and "1024" in table(record)


def test_multikey_distractors_trip_a_model_that_takes_the_first_needle(tok):
    cfg = NeedleConfig(lengths=(512,), depths=(0.0, 0.5, 1.0), samples=4, variant="multikey", distractors=3, seed=3)
    examples = build_examples(cfg, tok)
    for e in examples:
        assert len(e.distractors) == 3 and e.key not in {k for k, _ in e.distractors}
        assert all(f"numbers for {k} is: {v}." in e.prompt for k, v in e.distractors)
    record = evaluate_needles(WindowedGenerator(tok, 10 ** 6, first_needle=True), cfg, log=None)
    first_is_asked = [min(re.finditer(r"One of the special magic numbers for (\w+)", e.prompt),
                          key=lambda m: m.start()).group(1) == e.key for e in examples]
    assert record["accuracy"] == pytest.approx(sum(first_is_asked) / len(examples))
    assert record["accuracy"] < 1.0
    single = evaluate_needles(WindowedGenerator(tok, 10 ** 6), cfg, log=None)
    assert single["accuracy"] == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(depths=(0.5, 1.5)), "depths must lie in"), (dict(lengths=(8,)), "lengths must be"),
    (dict(variant="haystack"), "unknown needle variant"), (dict(variant="multikey", distractors=0), "distractors"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeedleConfig(**kwargs)


def test_a_length_too_short_for_the_needle(tok):
    with pytest.raises(ValueError, match="too short for the question"):
        build_examples(NeedleConfig(lengths=(64,), variant="multikey", distractors=5), tok)


@pytest.mark.slow
def test_cli_on_a_tiny_checkpoint(tmp_path):
    from instella_plugin.testing.trainer import REPO, TINY_MODEL, run_trainer

    start = tmp_path / "tiny"
    run_trainer(1, TINY_MODEL + ["--model-preset", "instella-tiny", "--seq-length", "256", "--train-iters", "1",
                                 "--lr-warmup-iters", "0", "--global-batch-size", "2", "--micro-batch-size", "2",
                                 "--save", start])
    out = tmp_path / "niah"
    proc = subprocess.run([sys.executable, "-m", "instella_plugin.cli", "eval", "niah", "--load", str(start),
                           "--lengths", "128,192", "--depths", "0,0.5,1", "--samples", "1", "--device", "cpu",
                           "--max-new-tokens", "4", "--output-dir", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout[-800:])
    record = json.loads((out / "niah_single.json").read_text())
    assert len(record["cells"]) == 6 and all(c["n"] == 1 for c in record["cells"])
    assert (out / "niah_single.png").read_bytes()[:4] == b"\x89PNG"
    too_long = subprocess.run([sys.executable, "-m", "instella_plugin.cli", "eval", "niah", "--load", str(start),
                               "--lengths", "4096", "--device", "cpu", "--output-dir", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    assert too_long.returncode != 0 and "exceeds the model's context" in too_long.stdout + too_long.stderr

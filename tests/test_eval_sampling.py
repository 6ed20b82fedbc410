"""pass@k over n sampled answers on the tiny model: seeded per request (independent of batching), the
per-example pass@k equal to the unbiased estimator over the recorded per-sample checks, chat prompts."""
from dataclasses import replace

import pytest

from instella_plugin.evaluation import checkers
from instella_plugin.evaluation.hf_backend import HFBackend
from instella_plugin.evaluation.metrics import pass_at_k
from instella_plugin.evaluation.runner import build_requests, evaluate
from instella_plugin.evaluation.examples import build_examples
from instella_plugin.evaluation.task_config import load_task

from test_eval_parity import data_dir, tiny_dir  # noqa: F401  (fixtures)

N = 4


def _has_letter_e(response, gold, answer):
    """A stand-in checker with mixed outcomes on a random model's text: 'correct' when an 'e' appears."""
    return response[:20], "e" in response[:20]


@pytest.fixture
def task(monkeypatch):
    monkeypatch.setitem(checkers.CHECKERS, "has_e", _has_letter_e)
    cfg = load_task("math500")
    return replace(cfg, checker="has_e", metrics=("pass@1", "pass@2", "pass@4"),
                   generation=replace(cfg.generation, max_new_tokens=10, n=N, temperature=1.0, top_p=1.0))


def test_pass_at_k_from_seeded_samples(task, tiny_dir, data_dir):  # noqa: F811
    a = evaluate([task], HFBackend(str(tiny_dir), batch_size=1), str(data_dir), limit=3)
    b = evaluate([task], HFBackend(str(tiny_dir), batch_size=3), str(data_dir), limit=3)
    assert a["samples"] == b["samples"]                     # each sample's seed is its own, not its batch's
    recs = a["samples"]["math500"]
    assert all(len(r["responses"]) == N for r in recs)
    assert any(len(set(r["responses"])) > 1 for r in recs)  # really sampled
    outcomes = [[_has_letter_e(t, None, None)[1] for t in r["responses"]] for r in recs]
    assert 0 < sum(map(sum, outcomes)) < N * len(recs)     # mixed, so pass@k is not trivially 0 or 1
    for r, ok in zip(recs, outcomes):
        for k in (1, 2, 4):
            assert r["metrics"][f"pass@{k}"] == pytest.approx(pass_at_k(N, sum(ok), k))
    mean1 = sum(sum(ok) / N for ok in outcomes) / len(outcomes)
    assert a["results"]["math500"]["metrics"]["pass@1"] == pytest.approx(mean1)


def test_math_checker_and_chat_prompt(tiny_dir, data_dir):  # noqa: F811
    cfg = load_task("math500")
    backend = HFBackend(str(tiny_dir))
    req = build_requests(replace(cfg, generation=replace(cfg.generation, max_new_tokens=8)),
                         build_examples(cfg, str(data_dir), limit=1), backend.tokenizer, backend.max_length)
    text = backend.tokenizer.decode(req.prompts[0])
    assert text.startswith("<|endoftext|><|user|>\nWhat is 0 + 1?") and text.endswith("<|assistant|>\n")
    assert checkers.CHECKERS["math"]("So $x = \\boxed{1}$.", "1", cfg.answer) == ("1", True)

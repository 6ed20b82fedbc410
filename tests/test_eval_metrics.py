"""Metric formulas against hand computation, pass@k against its closed form, answer extraction on
chain-of-thought text, the instella-base suite against INSTELLA.md, and few-shot prompts."""
import math
from itertools import combinations

import pytest

from instella_plugin.evaluation import metrics as M
from instella_plugin.evaluation.checkers import CHECKERS
from instella_plugin.evaluation.examples import build_examples, prompt_file_shots
from instella_plugin.evaluation.extract import extract
from instella_plugin.evaluation.runner import encode_pair
from instella_plugin.evaluation.task_config import Answer, load_suite, load_task
from instella_plugin.evaluation.task_data import TaskDataError

from test_eval_parity import write_task_data


def test_multiple_choice_metrics_by_hand():
    # choices "a" (1 char), "bbbb" (4), "cc" (2); tokens 1, 2, 1
    lls, chars, toks = [-2.0, -4.0, -3.0], [1, 4, 2], [1, 2, 1]
    # acc: argmax(-2, -4, -3) = 0; acc_norm: (-2, -1, -1.5) -> 1; per token: (-2, -2, -3) -> tie, first = 0
    # mutual info with uncond (-1, -5, -1): (-1, 1, -2) -> 1
    got = M.multiple_choice(["acc", "acc_norm", "acc_per_token", "acc_mutual_info"], lls, 1, chars, toks,
                            [-1.0, -5.0, -1.0])
    assert got == {"acc": 0.0, "acc_norm": 1.0, "acc_per_token": 0.0, "acc_mutual_info": 1.0}
    assert M.multiple_choice(["acc", "acc_per_token"], lls, 0, chars, toks) == {"acc": 1.0, "acc_per_token": 1.0}


def test_aggregate_mean_and_stderr_by_hand():
    per = [{"acc": v} for v in (1.0, 0.0, 1.0, 1.0)]
    out = M.aggregate(per, ["acc"])
    # mean 0.75; sample variance ((.25^2)*3 + .75^2) / 3 = 0.25; stderr sqrt(0.25 / 4) = 0.25
    assert out["acc"] == 0.75 and out["acc_stderr"] == pytest.approx(0.25)


def _pass_at_k_enumerated(n, c, k):
    """Fraction of k-subsets of n samples (c correct) holding a correct one: the definition itself."""
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 6), (8, 3, 2), (10, 9, 4), (16, 4, 1)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    closed = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert M.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
    assert M.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_enumerated(n, c, k), abs=1e-12)
    assert M.pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_refuses_bad_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        M.pass_at_k(4, 1, 5)
    assert M.generation(["exact_match", "pass@1", "pass@2"], [False, True, True, False]) == \
        {"exact_match": 0.0, "pass@1": 0.5, "pass@2": pytest.approx(1 - 1 / 6)}


GSM = Answer(regex="The answer is (-?[$0-9.,]+)", fallback="last_number", normalize=("strip", "number"))


@pytest.mark.parametrize("text,want", [
    (" Tom has 3 + 4 = 7 apples. Then he buys 5, so 7 + 5 = 12. The answer is 12.", "12"),
    (" She pays $1,250.00 in all. The answer is $1,250.00.\n\nQ: next", "1250"),
    (" It costs 18 dollars. The answer is -3.5.", "-3.5"),
    (" No final sentence: 4 * 6 = 24, minus 2 is 22", "22"),   # flexible fallback: last number
    (" nothing numeric here", ""),
])
def test_gsm8k_answer_extraction(text, want):
    assert extract(text, GSM) == want


def test_checkers_exact_match_and_math():
    assert CHECKERS["exact_match"](" so 5 + 7 = 12. The answer is 12.", "12", GSM) == ("12", True)
    assert CHECKERS["exact_match"](" The answer is 13.", "12", GSM) == ("13", False)
    bbh = load_task("bbh").answer
    assert CHECKERS["exact_match"]("Step one. So the answer is (B).", "(B)", bbh) == ("(B)", True)
    assert CHECKERS["exact_match"]("No idea.", "(B)", bbh)[1] is False
    assert CHECKERS["exact_match"]("Count: 3.5 apples. So the answer is 3.5.\nQ: next", "3.5", bbh) == ("3.5", True)
    assert CHECKERS["exact_match"]("So the answer is valid", "valid", bbh) == ("valid", True)
    assert CHECKERS["math"]("<think>hmm</think> so \\boxed{\\frac{1}{2}}", "0.5", GSM)[1] is True
    assert CHECKERS["math"]("\\boxed{3}", "4", GSM)[1] is False


# INSTELLA.md, "Evaluation protocol": "ARC-Challenge, ARC-Easy, BoolQ, HellaSwag, PIQA, SciQ, WinoGrande,
# OpenBookQA zero-shot as multiple choice scored by log-likelihood; MMLU 5-shot; BBH 3-shot with chain of
# thought (exact match); GSM8K 8-shot chain of thought (exact match on the final number)."
PROTOCOL = {**{t: ("multiple_choice", 0) for t in ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq",
                                                   "winogrande", "openbookqa")},
            "mmlu": ("multiple_choice", 5), "bbh": ("generate", 3), "gsm8k": ("generate", 8)}


def test_suite_matches_instella_md():
    suite = {t.name: t for t in load_suite("instella-base")}
    assert sorted(suite) == sorted(PROTOCOL)
    for name, (output, shots) in PROTOCOL.items():
        t = suite[name]
        assert (t.output, t.num_fewshot) == (output, shots), name
        if output == "multiple_choice":
            assert t.primary in ("acc", "acc_norm") and "acc" in t.metrics, name
        else:
            assert (t.primary, t.generation.temperature, t.generation.n) == ("exact_match", 0.0, 1), name
    assert "Let's think step by step" in suite["bbh"].doc_to_text and len(suite["bbh"].subtasks) == 27
    assert suite["gsm8k"].fewshot_target and "The answer is" in suite["gsm8k"].fewshot_target
    assert suite["gsm8k"].answer.regex.startswith("The answer is") and suite["gsm8k"].answer.normalize[-1] == "number"


def test_encode_pair_moves_trailing_space_like_lm_eval():
    from instella_plugin.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ctx, cont = encode_pair(tok, "Question: why?\nAnswer: ", "because")
    assert tok.decode(ctx) == "Question: why?\nAnswer:" and tok.decode(cont) == " because"
    ctx, cont = encode_pair(tok, "", " yes")
    assert ctx == [0] and tok.decode(cont) == " yes"


def test_fewshot_prompts_are_seeded_and_independent_of_limit(tmp_path):
    data = write_task_data(tmp_path)
    gsm = load_task("gsm8k")
    full, first = build_examples(gsm, str(data)), build_examples(gsm, str(data), limit=3)
    assert [e.contexts for e in first] == [e.contexts for e in full[:3]]
    assert full[0].contexts == build_examples(gsm, str(data))[0].contexts
    prompt = full[0].contexts[0]
    assert prompt.count("Q: ") == 9 and prompt.count("The answer is") == 8 and "<<" not in prompt
    assert full[0].contexts != full[1].contexts  # shots drawn per example
    mmlu = build_examples(load_task("mmlu"), str(data))
    for ex in mmlu:   # five shots, all of the question's subject
        p = ex.contexts[0]
        assert p.count("\nAnswer:") == 6 and p.startswith("The following are multiple choice questions")
    assert "college physics" in mmlu[0].contexts[0] and "world religions" in mmlu[1].contexts[0]
    bbh = build_examples(load_task("bbh"), str(data), limit=1)
    assert len(bbh) == 27 and all(e.contexts[0].count("Let's think step by step.") == 4 for e in bbh)


def test_prompt_file_shot_count_is_checked():
    text = "canary\n-----\nTask.\n\nQ: a\nA: x\n\nQ: b\nA: y"
    assert prompt_file_shots(text, "f.txt", 2) == "Task.\n\nQ: a\nA: x\n\nQ: b\nA: y\n\n"
    with pytest.raises(TaskDataError, match="f.txt holds 2 shots.*num_fewshot 3"):
        prompt_file_shots(text, "f.txt", 3)


def test_fetch_plans_every_file_and_keeps_existing_ones(tmp_path):
    from instella_plugin.evaluation.fetch import fetch, planned_files

    data = write_task_data(tmp_path, n=2)
    suite = load_suite("instella-base")
    plan = [p for t in suite for p in planned_files(t, str(data))]
    kinds = [k for k, _, _ in plan]
    assert kinds.count("file") == 27 and kinds.count("split") == 8 + 2 + 27 + 2   # 0-shot, mmlu, bbh, gsm8k
    assert ("split", ("cais/mmlu", "all", "dev"), str(data / "cais/mmlu/all/dev.jsonl")) in plan
    assert all(__import__("os").path.isfile(target) for _, _, target in plan)   # the fixture has every file
    logged = []
    assert fetch(suite, str(data), log=logged.append) == 0 and len(logged) == len(plan)

"""The DeepScaleR rule reward on a table of response / ground-truth pairs with the expected reward.

Each row was written by hand from the rule in INSTELLA.md: the text after the last ``</think>`` (when
present), its last ``\\boxed{}``, normalised string match then symbolic equivalence; 1 when correct,
0 otherwise (no box, a truncated box, a wrong value).
"""
import pytest

from instella_plugin.evaluation.math_check import check, extract_answer, final_text, last_boxed, normalize
from instella_plugin.rl.reward import math_reward, math_rewards

TABLE = [
    # (response, ground truth, expected reward)
    # -- plain correct answers
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("So x = \\boxed{7}", "7", 1.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{2.50}", "2.5", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    # -- fractions and equivalent forms
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1.0),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),
    # -- LaTeX forms: \left/\right, tuples, intervals, sets, equations
    ("\\boxed{\\left(1, 2\\right)}", "(1,2)", 1.0),
    ("\\boxed{[0, 1)}", "[0,1)", 1.0),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{y=2x+1}", "y = 1 + 2x", 1.0),
    ("\\boxed{(1, 3)}", "(1,2)", 0.0),
    # -- units, degrees, percent, dollars, text
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{25\\%}", "25", 1.0),
    ("\\boxed{\\$18.90}", "18.90", 1.0),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}", 1.0),
    ("\\boxed{12 \\text{ meters}}", "13", 0.0),
    # -- multiple boxes: the last one counts
    ("First \\boxed{3}, corrected: \\boxed{4}", "4", 1.0),
    ("First \\boxed{4}, corrected: \\boxed{3}", "4", 0.0),
    ("\\fbox{9} then \\boxed{8}", "8", 1.0),
    ("\\boxed{8} then \\fbox{9}", "9", 1.0),
    ("nested \\boxed{\\frac{\\sqrt{\\frac{1}{4}}}{1}}", "\\frac{1}{2}", 1.0),
    ("\\boxed 5", "5", 1.0),
    # -- missing or broken boxes
    ("The answer is 42.", "42", 0.0),
    ("The answer is $42$", "42", 0.0),
    ("\\boxed{", "42", 0.0),
    ("\\boxed{42", "42", 0.0),
    ("\\boxed{}", "42", 0.0),
    ("", "42", 0.0),
    # -- </think> handling: only the text after the last one counts
    ("<think>maybe \\boxed{3}</think> The answer is \\boxed{4}.", "4", 1.0),
    ("<think>maybe \\boxed{4}</think> The answer is \\boxed{3}.", "4", 0.0),
    ("<think>the answer is \\boxed{4}</think> so it is four.", "4", 0.0),
    ("<think>a</think> b </think> \\boxed{6}", "6", 1.0),
    ("<think>still thinking \\boxed{6}", "6", 1.0),  # no </think>: the whole response
    ("\\boxed{6}</think>", "6", 0.0),
]


@pytest.mark.parametrize("response,gold,expected", TABLE, ids=[f"row{i}" for i in range(len(TABLE))])
def test_reward_table(response, gold, expected):
    assert math_reward(response, gold) == expected, (response, gold, check(response, gold))


def test_table_is_large_and_mixed():
    assert len(TABLE) >= 40
    assert {e for *_, e in TABLE} == {0.0, 1.0}


def test_extraction_parts():
    assert final_text("<think>x</think>y</think>z") == "z"
    assert final_text("no think") == "no think"
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{2}{3}} c") == "\\frac{2}{3}"
    assert last_boxed("\\boxed{1} \\boxed{2") == "1"  # a truncated last box falls back to the complete one
    assert last_boxed("nothing") is None
    assert extract_answer("<think>\\boxed{1}</think>\\boxed{ 2 }") == "2"
    assert normalize("\\left( 1,2 \\right)") == "(1,2)" and normalize("x = 3.50") == "3.5"


def test_batch_and_bad_input():
    assert math_rewards(["\\boxed{1}", "\\boxed{2}"], ["1", "1"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 responses but 1 ground-truth"):
        math_rewards(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="ground-truth answer is empty"):
        math_reward("\\boxed{1}", "  ")

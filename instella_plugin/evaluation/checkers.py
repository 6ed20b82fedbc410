"""Answer checkers, by name: ``fn(response, gold, answer) -> (extracted, correct)``.

``exact_match`` extracts the answer with the task's ``answer`` rule (regex, fallback, normalisation)
and compares it with the gold answer under the same normalisation. ``math`` is the boxed-answer rule
of Instella-Math (``math_check``: last ``\\boxed{}`` after ``</think>``, then symbolic equivalence);
it ignores the task's regex. A new checker is one entry here.
"""
from typing import Callable, Dict, Tuple

from instella_plugin.evaluation import math_check
from instella_plugin.evaluation.extract import extract, normalize

Checker = Callable[[str, str, object], Tuple[str, bool]]


def exact_match(response: str, gold: str, answer) -> Tuple[str, bool]:
    got = extract(response, answer)
    return got, got != "" and got == normalize(str(gold), answer.normalize)


def math(response: str, gold: str, answer) -> Tuple[str, bool]:
    result = math_check.check(response, str(gold))
    return result.extracted or "", result.correct


CHECKERS: Dict[str, Checker] = {"exact_match": exact_match, "math": math}

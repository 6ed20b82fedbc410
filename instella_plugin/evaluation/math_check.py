"""Math answer checking: the final answer of a response and whether it equals the ground truth.

The rule is DeepScaleR's, which Instella-Math's GRPO reward and its Pass@k evaluation use
(INSTELLA.md): take the text after the last ``</think>`` when there is one (else the whole response),
extract the last ``\\boxed{...}`` (``\\fbox{...}`` and ``\\boxed 5`` too), then compare with the ground
truth first by a normalised string match, then by symbolic equivalence.

Equivalence is ``math-verify`` (Hugging Face, PyPI ``math-verify==0.9.0``): a maintained LaTeX ->
SymPy parser and comparator (fractions, roots, percentages, units, sets, intervals, equations
``x = 3`` against ``3``), where DeepScaleR carries its own copy of the Hendrycks MATH normaliser plus
sympy. We keep our own extraction (the last box of the final text: math-verify's ``parse`` on a whole
response would also take unboxed expressions, which DeepScaleR scores 0) and a small string
normaliser for the cheap first test. Nothing here imports torch.
"""
import re
from dataclasses import dataclass
from typing import Optional

from math_verify import LatexExtractionConfig, parse, verify

THINK_END = "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Sympy work per parse/verify, in seconds (math-verify's signal-based timeout; main thread only).
TIMEOUT_SECONDS = 5


@dataclass(frozen=True)
class MathCheck:
    """What was extracted from a response (None: no boxed answer) and whether it is correct."""
    extracted: Optional[str]
    correct: bool


def final_text(response: str) -> str:
    """The text after the last ``</think>``, or the whole response when there is none."""
    return response.rsplit(THINK_END, 1)[-1] if THINK_END in response else response


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced) or ``\\boxed X``; None if none."""
    best, best_at = None, -1
    for command in _BOX_COMMANDS:
        at = text.rfind(command)
        while at != -1:
            content = _box_content(text, at + len(command))
            if content is not None:
                if at > best_at:
                    best, best_at = content, at
                break
            at = text.rfind(command, 0, at)
    return best


def _box_content(text: str, i: int) -> Optional[str]:
    """The argument of a box command whose name ends at ``i``: ``{...}`` balanced, or ``\\boxed 5``."""
    if text.startswith("{", i):
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
        return None  # unbalanced: a truncated response
    m = re.match(r" +([^\s$]+)", text[i:])  # "\boxed 5" (a space, then one token)
    return m.group(1) if m else None


def extract_answer(response: str) -> Optional[str]:
    """The final boxed answer of a response (after ``</think>``), or None."""
    content = last_boxed(final_text(response))
    return content.strip() if content is not None else None


_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]*\}\s*$")


def normalize(answer: str) -> str:
    """A canonical string for the first, cheap comparison (Hendrycks MATH-style normalisation)."""
    s = answer.strip()
    s = s.strip("$")
    s = re.sub(r"\\(?:left|right)\b", "", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = _UNIT_TEXT.sub("", s)
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)  # "x = 3" -> "3"
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")  # 1,000 -> 1000
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".")  # 2.50 -> 2.5, 3.0 -> 3
    return s


_LATEX = [LatexExtractionConfig(boxed_match_priority=0)]


def _parsed(answer: str):
    return parse(f"\\boxed{{{answer}}}", extraction_config=_LATEX, parsing_timeout=TIMEOUT_SECONDS)


def is_equivalent(predicted: str, gold: str) -> bool:
    """Normalised strings equal, else math-verify's symbolic/numeric equivalence (gold first, as it expects)."""
    if not predicted.strip():
        return False
    if normalize(predicted) == normalize(gold):
        return True
    try:
        gold_parsed, pred_parsed = _parsed(gold), _parsed(predicted)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=TIMEOUT_SECONDS))
    except Exception:  # noqa: BLE001  (a parser or sympy failure on odd input scores as a wrong answer)
        return False


def check(response: str, gold: str) -> MathCheck:
    """Extract the response's final boxed answer and compare it with ``gold`` (a ground-truth string)."""
    if gold is None or not str(gold).strip():
        raise ValueError("the ground-truth answer is empty; every problem needs one to be checked")
    extracted = extract_answer(response)
    return MathCheck(extracted, extracted is not None and is_equivalent(extracted, str(gold)))

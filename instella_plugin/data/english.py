"""Is a text English? A script and function-word test for filtering chat data (AM-DeepSeek-R1-Distilled).

The Instella-Math SFT keeps the English part of AM-DeepSeek-R1-Distilled, whose other part is mostly
Chinese. Two checks, cheap enough for millions of long reasoning traces and free of model files:
1. script: at least ``min_latin`` of the letters are Latin (formulas and code are ASCII, so maths in
   English passes; Chinese, Japanese, Korean, Cyrillic... do not);
2. language among Latin-script texts: when a text has enough words, English function words ("the",
   "of", "is"...) make up at least ``min_function_share`` of them (French, Spanish, German fail).
Greek letters are left out of the script share (formulas use them: θ, π, Σ) while they are under a
quarter of the letters.
"""
from __future__ import annotations

import re

FUNCTION_WORDS = frozenset(
    "the of and to a in is it that for on as with are be this by an or was we if then so not at from "
    "which have has can there their what how when each all its let find these our you any where".split())
_WORD = re.compile(r"[A-Za-z]+")


def _is_latin(ch: str) -> bool:
    return ch < "\u0250" or "\u1e00" <= ch <= "\u1eff"  # Basic Latin to Latin Extended-B, Latin Extended Additional


def is_english(text: str, min_latin: float = 0.95, min_function_share: float = 0.08, min_words: int = 12) -> bool:
    """True when ``text`` reads as English by the two checks of the module docstring."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return True  # numbers and symbols only: nothing to say it is not English
    latin_or_other = [c for c in letters if not "\u0370" <= c <= "\u03ff"]
    if len(latin_or_other) < 0.75 * len(letters):
        return False  # Greek text, not Greek symbols in a formula
    letters = latin_or_other
    if sum(map(_is_latin, letters)) < min_latin * len(letters):
        return False
    words = [w.lower() for w in _WORD.findall(text) if len(w) > 0]
    if len(words) < min_words:
        return True
    return sum(w in FUNCTION_WORDS for w in words) >= min_function_share * len(words)

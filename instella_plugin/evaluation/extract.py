"""Answer extraction from generated text and the normalisations applied before comparing answers.

``extract(text, answer)``: the first capture group of the task's regex (its first or last match);
when nothing matches, ``fallback`` decides: ``none`` (empty answer: wrong), ``last_number`` (the
last number in the text, GSM8K's flexible match) or ``text`` (the whole text). ``normalize`` steps:
``strip``, ``lower``, ``no_commas`` (1,000 -> 1000), ``no_trailing_period``, ``number`` (a numeric
string in canonical form: "$18.00" -> "18").
"""
import re

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


def _canonical_number(text: str) -> str:
    t = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


NORMALIZERS = {
    "strip": str.strip,
    "lower": str.lower,
    "no_commas": lambda s: s.replace(",", ""),
    "no_trailing_period": lambda s: s[:-1] if s.endswith(".") else s,
    "number": _canonical_number,
}


def normalize(text: str, steps) -> str:
    for step in steps:
        if step not in NORMALIZERS:
            raise ValueError(f"unknown normalisation {step!r}; known: {sorted(NORMALIZERS)}")
        text = NORMALIZERS[step](text)
    return text


def extract(text: str, answer) -> str:
    """The answer in ``text`` (normalised), or "" when there is none; ``answer`` is a task's ``Answer``."""
    found = None
    if answer.regex:
        matches = list(re.finditer(answer.regex, text))
        if matches:
            m = matches[0] if answer.group_select == "first" else matches[-1]
            found = m.group(1) if m.groups() else m.group(0)
    if found is None:
        if answer.fallback == "last_number":
            numbers = _NUMBER.findall(text)
            found = numbers[-1] if numbers else ""
        elif answer.fallback == "text":
            found = text
        else:
            found = ""
    return normalize(found, answer.normalize)

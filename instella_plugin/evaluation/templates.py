"""Jinja templates and expressions over one example ("doc") of a task's data.

``doc_to_text`` and friends are templates (``"Question: {{question}}\\nAnswer:"``); ``doc_to_choice``
and ``doc_to_target`` of a multiple-choice task are expressions that evaluate to Python values
(``choices.text``, ``choices.label.index(answerKey)``). Undefined names raise, so a data file without
a field the task reads fails with the field's name. Filters the public tasks need: ``hellaswag_clean``
(lm-eval's WikiHow artefact removal), ``strip_calc`` (GSM8K's ``<<...>>`` calculator notes),
``after``/``before`` (text around a marker).
"""
import re
from functools import lru_cache

import jinja2


class TemplateError(ValueError):
    """A template that does not parse or reads a field the example does not have."""


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: strip, ' [title]' -> '. ', drop [bracketed] notes, '  ' -> ' '."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def strip_calc(text: str) -> str:
    """GSM8K solutions without the ``<<48/2=24>>`` calculator annotations."""
    return re.sub(r"<<.*?>>", "", text)


def _after(text: str, marker: str) -> str:
    return text.split(marker)[-1]


def _before(text: str, marker: str) -> str:
    return text.split(marker)[0]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    env.filters.update(hellaswag_clean=hellaswag_clean, strip_calc=strip_calc, after=_after, before=_before)
    return env


_ENV = _environment()


@lru_cache(maxsize=512)
def _template(source: str):
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template {source!r} does not parse: {e}") from None


@lru_cache(maxsize=512)
def _expression(source: str):
    try:
        return _ENV.compile_expression(source, undefined_to_none=False)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"expression {source!r} does not parse: {e}") from None


def check_syntax(source: str, expression: bool = False) -> None:
    (_expression if expression else _template)(source)


def _explain(source: str, doc: dict, err: Exception) -> TemplateError:
    return TemplateError(f"{source!r} cannot be evaluated on an example with fields {sorted(doc)}: {err}")


def render(source: str, doc: dict) -> str:
    """The template filled from ``doc``."""
    try:
        return _template(source).render(**doc)
    except (jinja2.UndefinedError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise _explain(source, doc, e) from None


def evaluate(source: str, doc: dict):
    """The Python value of the expression on ``doc``."""
    try:
        value = _expression(source)(**doc)
    except (jinja2.UndefinedError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise _explain(source, doc, e) from None
    if isinstance(value, jinja2.Undefined):
        raise _explain(source, doc, KeyError(source))
    return value

"""Synthetic long-context QA: chats whose answer lies in one span of a long document.

Stages, per document: tokenise it, cut it into consecutive spans of ``span_tokens`` (each length drawn
in [min, max] with the seed; a short tail joins the span before it), pick up to ``spans_per_document``
of them, and ask the generator about each span alone (prompts in ``long_qa_prompts.yaml``):

- ``qa``: the generator writes a question and its answer ("Question: ..." / "Answer: ..."); replies
  without both lines are counted as ``unparsable`` and dropped;
- ``summary``: the question is fixed and names the span by its opening words; the generator's reply
  (a summary of the span) is the answer, so any generator, a small base model included, yields chats.

Each kept pair becomes one chat: the user turn holds the **whole** document, a blank line, then the
question; the assistant turn holds the answer. ``instella data sft`` turns the JSONL into an SFT store
(loss on the answer only) that ``long-sft`` packs. The generator is anything behind the
``TextGenerator`` seam (``inference.api``): megatron-core's engine on a checkpoint, an OpenAI-compatible
endpoint (``synth.endpoint``), or a scripted double in tests; spans are cut with the Instella tokenizer
(``tokenizer``), whatever the generator tokenises with. Generation is greedy by default and
deterministic given the seed; records carry the document and span they came from.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import yaml

from instella_plugin.data.jsonl_output import JsonlOutput, refuse_output, write_json_atomic
from instella_plugin.data.tokenizer import load_tokenizer
from instella_plugin.inference.api import SamplingParams, TextGenerator

PROMPTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "long_qa_prompts.yaml")
KINDS = ("qa", "summary")
_QA = re.compile(r"^\s*Question:\s*(?P<q>.+?)\s*$.*?^\s*Answer:\s*(?P<a>.+?)\s*\Z", re.S | re.M)


def load_prompts(path: str = PROMPTS_PATH) -> Dict[str, str]:
    with open(path, encoding="utf-8") as f:
        prompts = yaml.safe_load(f)
    missing = {"qa", "summary_prompt", "summary_question"} - set(prompts or {})
    if missing:
        raise ValueError(f"{path}: missing prompt(s) {sorted(missing)}")
    return prompts


@dataclass(frozen=True)
class LongQAConfig:
    """How documents become questions. Token counts use the Instella tokenizer."""
    kind: str = "qa"
    span_tokens: Tuple[int, int] = (2048, 8192)
    spans_per_document: int = 1
    min_document_tokens: int = 4096    # shorter documents are skipped (not long-context material)
    max_new_tokens: int = 512
    temperature: float = 0.0
    opening_words: int = 12
    batch_size: int = 8
    seed: int = 1234

    def __post_init__(self):
        lo, hi = self.span_tokens
        if self.kind not in KINDS:
            raise ValueError(f"unknown long-QA kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"span_tokens must be two integers 1 <= MIN <= MAX, got {self.span_tokens!r}")
        if self.min_document_tokens < lo:
            raise ValueError(f"min_document_tokens {self.min_document_tokens} is shorter than a span "
                             f"({lo} tokens at least); raise it or lower the span size")
        for name in ("spans_per_document", "max_new_tokens", "batch_size", "opening_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def split_spans(num_tokens: int, span_tokens: Tuple[int, int], rng: random.Random) -> List[Tuple[int, int]]:
    """Consecutive (start, end) spans covering ``num_tokens``, each [min, max] long but the last,
    which joins its predecessor when shorter than min (so it may reach max + min - 1)."""
    lo, hi = span_tokens
    spans, at = [], 0
    while at < num_tokens:
        end = min(at + rng.randint(lo, hi), num_tokens)
        spans.append((at, end))
        at = end
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < lo:
        (a, _), (_, e) = spans[-2], spans.pop()
        spans[-1] = (a, e)
    return spans


def parse_qa(text: str) -> Optional[Tuple[str, str]]:
    """(question, answer) from a reply holding "Question: ..." then "Answer: ..."; None otherwise."""
    m = _QA.search(text.strip())
    if not m or not m.group("q").strip() or not m.group("a").strip():
        return None
    return m.group("q").strip(), m.group("a").strip()


def _chat(document: str, question: str, answer: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": f"{document.strip()}\n\n{question}"},
            {"role": "assistant", "content": answer}]


def synthesise_long_qa(documents: Iterable[str], generator: TextGenerator, config: LongQAConfig = LongQAConfig(),
                       tokenizer=None, counts: Optional[dict] = None) -> Iterator[dict]:
    """Records ``{"messages": [...], "source": {...}}`` for ``documents`` (see the module docstring).
    ``counts`` (a dict) is filled with documents, skipped_short, prompts, chats, unparsable."""
    tok = tokenizer if hasattr(tokenizer, "encode") else load_tokenizer(tokenizer)
    prompts = load_prompts()
    rng = random.Random(config.seed)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed)
    counts = counts if counts is not None else {}
    for key in ("documents", "skipped_short", "prompts", "chats", "unparsable"):
        counts.setdefault(key, 0)
    pending: List[dict] = []

    def flush() -> Iterator[dict]:
        if not pending:
            return
        completions = generator.generate([p["prompt"] for p in pending], params)
        if len(completions) != len(pending):
            raise RuntimeError(f"the generator returned {len(completions)} completions for {len(pending)} prompts")
        for job, done in zip(pending, completions):
            if config.kind == "qa":
                pair = parse_qa(done.text)
                if pair is None:
                    counts["unparsable"] += 1
                    continue
                question, answer = pair
            else:
                question, answer = job["question"], done.text.strip()
                if not answer:
                    counts["unparsable"] += 1
                    continue
            counts["chats"] += 1
            yield {"messages": _chat(job["document"], question, answer), "source": job["source"]}
        pending.clear()

    for index, document in enumerate(documents):
        if not isinstance(document, str):
            raise ValueError(f"document {index} is {type(document).__name__}, not text")
        counts["documents"] += 1
        ids = tok.encode(document, add_special_tokens=False)
        if len(ids) < config.min_document_tokens:
            counts["skipped_short"] += 1
            continue
        spans = split_spans(len(ids), config.span_tokens, rng)
        chosen = sorted(rng.sample(range(len(spans)), min(config.spans_per_document, len(spans))))
        for s in chosen:
            a, e = spans[s]
            span_text = tok.decode(ids[a:e]).strip()
            job = {"document": document, "source": {"document": index, "span": [a, e], "kind": config.kind}}
            if config.kind == "qa":
                job["prompt"] = prompts["qa"].format(span=span_text)
            else:
                opening = " ".join(span_text.split()[:config.opening_words])
                job["prompt"] = prompts["summary_prompt"].format(span=span_text)
                job["question"] = prompts["summary_question"].format(opening=opening)
            pending.append(job)
            counts["prompts"] += 1
            if len(pending) >= config.batch_size:
                yield from flush()
    yield from flush()


def write_long_qa(documents: Iterable[str], generator: TextGenerator, output: str,
                  config: LongQAConfig = LongQAConfig(), tokenizer=None, overwrite: bool = False,
                  inputs: Sequence[str] = ()) -> dict:
    """Write the chats as JSONL to ``output`` (atomically; ``OUTPUT.summary.json`` gets the counts).
    Raises when nothing was produced (no long document, or no reply parsed)."""
    refuse_output(output, overwrite, inputs)
    counts: dict = {}
    with JsonlOutput(output) as out:
        for record in synthesise_long_qa(documents, generator, config, tokenizer, counts):
            out.write(record)
        if out.records == 0:
            raise ValueError(f"no long-context chats from {counts.get('documents', 0)} document(s): "
                             f"{counts.get('skipped_short', 0)} shorter than {config.min_document_tokens} tokens, "
                             f"{counts.get('unparsable', 0)} replies without 'Question:'/'Answer:' lines "
                             "(try --kind summary with a small or base model)")
        out.commit()
    write_json_atomic(output + ".summary.json", dict(counts, config=_plain(config)))
    return counts


def _plain(config: LongQAConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()}

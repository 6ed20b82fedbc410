"""``instella data convert SOURCE``: a post-training source to the JSONL the other data commands read.

Per kind (``sources.yaml``): chats ``{"id", "source", "messages": [{"role", "content"}...]}`` for
``instella data sft``; preference pairs ``{"id", "source", "chosen": [...], "rejected": [...]}`` for
``instella data sft --preference``; prompt sets ``{"id", "source", "prompt", "answer"}`` for GRPO and
synthesis; with ``as_text`` chats become ``{"id", "source", "text"}`` documents for ``instella data
prepare``, flattened as the official stage-2 conversion does: each message's stripped content followed
by a newline, no role markers.

Per-source formats: the MMLU auxiliary set gets a seeded random question template and shuffled options
(the answer keeps its content under its new letter); o1-journey keeps its long chain of thought up to
the final "####" line; AM-DeepSeek-R1-Distilled keeps English chats only. Output is deterministic for a
seed (each row's random draw depends on the seed and the row's index only) and streamed: rows are read
and written one at a time. A row without an expected field is an error naming the file, row and field;
rows that are well-formed but unusable (no assistant turn, a role the chat format has no place for,
not English...) are dropped and counted by reason.
"""
from __future__ import annotations

import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from instella_plugin.data.english import is_english
from instella_plugin.data.jsonl_output import JsonlOutput, refuse_output, write_json_atomic
from instella_plugin.data.sources import (Source, SourceError, count_rows, field_value, get_source, iter_rows,
                                          mmlu_templates, source_files)

ROLES = ("system", "user", "assistant")
LABELS = "ABCDEFGHIJ"
DEFAULT_SEED = 96  # the official SFT preparation script's default


class Filtered(Exception):
    """A well-formed row that is dropped; the message is the reason counted in the report."""


@dataclass
class Counts:
    """What a conversion read, kept and dropped (by reason)."""
    source: str
    rows: int = 0
    kept: int = 0
    filtered: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "kept": self.kept, "filtered": dict(self.filtered)}

    def report(self) -> str:
        lines = [f"{self.source}: {self.rows:,} rows read, {self.kept:,} kept, {sum(self.filtered.values()):,} filtered"]
        lines += [f"  filtered ({reason}): {n:,}" for reason, n in self.filtered.most_common()]
        return "\n".join(lines)


def flatten_chat(messages: Sequence[Dict[str, str]]) -> str:
    """The official stage-2 flattening of a chat into a document."""
    return "".join(m["content"].strip() + "\n" for m in messages)


def _messages(src: Source, value, where: str, what: str) -> List[Dict[str, str]]:
    if not isinstance(value, list):
        raise SourceError(f"{where}: field {what!r} holds {type(value).__name__}, expected a list of messages")
    out = []
    for n, msg in enumerate(value):
        if not isinstance(msg, dict) or src.role_key not in msg or src.content_key not in msg:
            raise SourceError(f"{where}: message {n} of {what!r} lacks {src.role_key!r}/{src.content_key!r}: {msg!r}")
        role = src.roles.get(msg[src.role_key], msg[src.role_key])
        if role not in ROLES:
            raise Filtered(f"role {msg[src.role_key]!r}")
        content = msg[src.content_key]
        if not isinstance(content, str):
            raise Filtered("message without text")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise Filtered("no assistant turn")
    return out


def _text(value, where: str, what: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise SourceError(f"{where}: field {what!r} holds {type(value).__name__}, expected text")
    return value


def mmlu_rewrite(question: str, choices: Sequence[str], answer: int, rng: random.Random,
                 templates: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """A user/assistant chat: a random template, the options shuffled, the answer's new letter.

    The correct option is followed by its index, not its text, so duplicate option texts cannot move it."""
    order = list(range(len(choices)))
    rng.shuffle(order)
    template = rng.choice(list(templates))
    label = LABELS[order.index(answer)]
    options = "\n".join(f"{LABELS[k]}. {choices[i]}" for k, i in enumerate(order))
    return [{"role": "user", "content": template["question"].format(question=question, options=options)},
            {"role": "assistant", "content": template["answer"].format(label=label)}]


class RowConverter:
    """One source's rows to output records (``__call__``), with the source's per-row rules."""

    def __init__(self, src: Source, as_text: bool = False, seed: int = DEFAULT_SEED):
        if as_text and src.kind != "chat":
            raise SourceError(f"--as-text flattens chats; source {src.name!r} holds {src.kind} rows")
        self.src, self.as_text, self.seed = src, as_text, seed
        self.templates = mmlu_templates() if src.transform == "mmlu_rewrite" else None

    def _chat(self, row: dict, where: str, index: int) -> List[Dict[str, str]]:
        src, f = self.src, self.src.fields
        if src.transform == "mmlu_rewrite":
            question = _text(field_value(row, f["question"], where), where, f["question"])
            choices = field_value(row, f["choices"], where)
            answer = field_value(row, f["answer"], where)
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or not 2 <= len(choices) <= 10:
                raise SourceError(f"{where}: field {f['choices']!r} must be a list of 2-10 option texts, got {choices!r}")
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise SourceError(f"{where}: field {f['answer']!r} must be an option index 0..{len(choices) - 1}, got {answer!r}")
            return mmlu_rewrite(question, choices, answer, random.Random(f"{self.seed}:{index}"), self.templates)
        if "messages" in f:
            return _messages(src, field_value(row, f["messages"], where), where, f["messages"])
        prompt = _text(field_value(row, f["prompt"], where), where, f["prompt"])
        response = _text(field_value(row, f["response"], where), where, f["response"])
        if src.response_cut:
            response = response.split(src.response_cut)[0]
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    def __call__(self, row: dict, where: str, index: int) -> dict:
        src, f = self.src, self.src.fields
        rec = {"id": f"{src.name}-{index}", "source": src.name}
        if src.kind == "preference":
            chosen = _messages(src, field_value(row, f["chosen"], where), where, f["chosen"])
            rejected = _messages(src, field_value(row, f["rejected"], where), where, f["rejected"])
            rec.update(chosen=chosen, rejected=rejected)
            return rec
        if src.kind == "prompt":
            prompt = _text(field_value(row, f["prompt"], where), where, f["prompt"])
            answer = _text(field_value(row, f["answer"], where), where, f["answer"])
            if src.answer_cut:
                answer = answer.rsplit(src.answer_cut, 1)[-1]
            if not prompt.strip() or not answer.strip():
                raise Filtered("empty prompt or answer")
            rec.update(prompt=prompt + src.prompt_suffix, answer=answer.strip())
            return rec
        messages = self._chat(row, where, index)
        if src.english_only and not is_english(" ".join(m["content"] for m in messages)):
            raise Filtered("not English")
        if self.as_text:
            rec["text"] = flatten_chat(messages)
        else:
            rec["messages"] = messages
        return rec


def _progress_line(name: str, counts: Counts, total: Optional[int], seconds: float) -> str:
    rate = counts.rows / max(seconds, 1e-9)
    line = f"{name}: {counts.rows:,} rows"
    if total:
        eta = (total - counts.rows) / max(rate, 1e-9)
        line += f"/{total:,} ({100 * counts.rows / total:.0f}%)"
    line += f", {counts.kept:,} kept, {rate:,.0f} rows/s"
    return line + (f", ETA {eta / 60:.1f} min" if total else "")


def convert(name: str, output: str, inputs: Sequence[str] = (), as_text: bool = False, seed: int = DEFAULT_SEED,
            limit: Optional[int] = None, config: Optional[str] = None, split: Optional[str] = None,
            overwrite: bool = False, progress_every: float = 10.0) -> Counts:
    """Convert source ``name`` to ``output`` (JSONL) and write ``output.counts.json``; returns the counts.

    Checks the source, the inputs and the output before reading any row."""
    src = get_source(name)
    convert_row = RowConverter(src, as_text, seed)
    files = source_files(src, inputs, config, split)
    refuse_output(output, overwrite, files)
    total = count_rows(files)
    total = min(total, limit) if total is not None and limit else total
    counts, start, last = Counts(src.name), time.monotonic(), time.monotonic()
    with JsonlOutput(output) as out:
        for index, (row, where) in enumerate(iter_rows(files, limit)):
            counts.rows += 1
            try:
                out.write(convert_row(row, where, index))
                counts.kept += 1
            except Filtered as why:
                counts.filtered[str(why)] += 1
            if progress_every and time.monotonic() - last > progress_every:
                last = time.monotonic()
                print(_progress_line(src.name, counts, total, last - start), file=sys.stderr)
        if counts.kept == 0:
            raise SourceError(f"source {src.name!r}: nothing to write from {', '.join(files)} "
                              f"({counts.rows} rows, filtered: {dict(counts.filtered) or 'none'})")
        out.commit()
    write_json_atomic(output + ".counts.json", counts.as_dict())
    return counts

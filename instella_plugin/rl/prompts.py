"""GRPO prompt data: rows of a prompt and a ground-truth answer (JSONL or Parquet), tokenised once,
prompts over the length limit filtered out and counted, and a deterministic order.

A row's prompt is a string (wrapped as a user turn of Instella's chat template, ending with the
``<|assistant|>`` marker, unless ``--no-grpo-chat-template``) or a list of chat messages. The order is a
seeded permutation per epoch, so the problems of step k depend only on (seed, k): a resumed run sees
exactly the prompts an uninterrupted one would.
"""
import json
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from instella_plugin.data.sft import ChatFormatter

SUFFIXES = (".jsonl", ".json", ".parquet")


class PromptDataError(ValueError):
    """A prompt file that cannot be used; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class Problem:
    index: int                      # row number in the file
    prompt_ids: Tuple[int, ...]
    answer: str


def read_rows(path: str) -> List[dict]:
    """Every row of a JSONL (one object a line) or Parquet file."""
    if not os.path.isfile(path):
        raise PromptDataError(f"prompt file {path} does not exist (give --data-path a JSONL or Parquet file of "
                              "prompts and answers)")
    if not path.endswith(SUFFIXES):
        raise PromptDataError(f"prompt file {path}: expected one of {', '.join(SUFFIXES)}")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # only Parquet input needs pyarrow

        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptDataError(f"{path} line {n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise PromptDataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def check_rows(rows: Sequence[dict], path: str, prompt_key: str, answer_key: str) -> None:
    """Every row has a non-empty prompt and answer under the given keys (else PromptDataError)."""
    if not rows:
        raise PromptDataError(f"prompt file {path} holds no rows")
    for key, flag in ((prompt_key, "--grpo-prompt-key"), (answer_key, "--grpo-answer-key")):
        if key not in rows[0]:
            raise PromptDataError(f"{path}: no field {key!r} ({flag}); the rows have {sorted(rows[0])}")
    for n, row in enumerate(rows):
        for key, what in ((prompt_key, "prompt"), (answer_key, "answer")):
            value = row.get(key)
            if value is None or (isinstance(value, str) and not value.strip()) or value == []:
                raise PromptDataError(f"{path} row {n}: no {what} (field {key!r}); every prompt needs a ground-truth "
                                      "answer for the reward: fix or drop the row")


def load_problems(path: str, tokenizer, prompt_key: str, answer_key: str, max_prompt_tokens: int,
                  chat_template: bool = True) -> Tuple[List[Problem], int]:
    """(problems within the length limit, number filtered out for length)."""
    rows = read_rows(path)
    check_rows(rows, path, prompt_key, answer_key)
    formatter = ChatFormatter(tokenizer)
    problems, too_long = [], 0
    for n, row in enumerate(rows):
        prompt = row[prompt_key]
        if isinstance(prompt, str) and not chat_template:
            ids = formatter.tok.encode(prompt, add_special_tokens=False)
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids = list(formatter(messages)[0]) + formatter.markers["assistant"]
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        problems.append(Problem(n, tuple(int(i) for i in ids), str(row[answer_key]).strip()))
    if not problems:
        raise PromptDataError(f"{path}: all {len(rows)} prompts are longer than --grpo-max-prompt-tokens "
                              f"{max_prompt_tokens}")
    return problems, too_long


def problem_order(num_problems: int, seed: int, start: int, count: int) -> List[int]:
    """Indices of the problems at positions [start, start + count) of the run's sequence: a fresh seeded
    permutation each epoch."""
    out, cache = [], {}
    for p in range(start, start + count):
        epoch, i = divmod(p, num_problems)
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(num_problems)
        out.append(int(cache[epoch][i]))
    return out

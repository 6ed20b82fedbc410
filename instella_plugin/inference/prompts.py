"""Prompts for ``instella generate``: a JSONL file read and checked line by line, and prompts to token ids.

A prompts file holds one JSON object per line with either ``"prompt"`` (text) or ``"messages"`` (a
chat: ``[{"role": "user", "content": ...}, ...]``, always rendered with the tokenizer's chat template
and the assistant's turn opened); any ``"id"`` is carried to the output. Errors name the file, the
line and the field. Nothing here imports torch or megatron, so bad input fails at once.
"""
import json
import os
from typing import Dict, List, Sequence, Union

Item = Dict[str, object]


class PromptsFileError(ValueError):
    pass


def read_prompts_file(path: str) -> List[Item]:
    """The prompts of a JSONL file, each ``{"prompt": str}`` or ``{"messages": list}`` (plus ``id``)."""
    if not os.path.isfile(path):
        raise PromptsFileError(f"--prompts-file {path}: no such file (one JSON object per line, each with a "
                               "\"prompt\" string or a \"messages\" chat)")
    items: List[Item] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptsFileError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            items.append(check_item(obj, f"{path}:{n}"))
    if not items:
        raise PromptsFileError(f"{path}: holds no prompts (one JSON object per line)")
    return items


def check_item(obj, where: str) -> Item:
    if not isinstance(obj, dict):
        raise PromptsFileError(f"{where}: expected a JSON object with \"prompt\" or \"messages\", got "
                               f"{type(obj).__name__}")
    if ("prompt" in obj) == ("messages" in obj):
        raise PromptsFileError(f"{where}: give exactly one of the fields \"prompt\" (text) and \"messages\" (a chat)")
    if "prompt" in obj and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        raise PromptsFileError(f"{where}: field \"prompt\" must be a non-empty string")
    if "messages" in obj:
        msgs = obj["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if not ok:
            raise PromptsFileError(f"{where}: field \"messages\" must be a non-empty list of "
                                   "{\"role\": ..., \"content\": ...} objects")
    return obj


def prompt_ids(tokenizer, item: Union[str, Item], chat: bool = False) -> List[int]:
    """Token ids of a prompt: text as it is (or as one user turn with ``chat``), or a chat's messages."""
    if isinstance(item, dict) and "messages" in item:
        messages = item["messages"]
    elif chat:
        text = item if isinstance(item, str) else item["prompt"]
        messages = [{"role": "user", "content": text}]
    else:
        text = item if isinstance(item, str) else item["prompt"]
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              return_dict=False))


class PromptTooLong(ValueError):
    """A prompt plus the tokens asked for does not fit the model's context."""


def check_fits(ids: Sequence[Sequence[int]], max_new_tokens: int, context: int) -> None:
    """Every prompt plus ``max_new_tokens`` within the model's context, else ``PromptTooLong``."""
    for i, p in enumerate(ids):
        if len(p) + max_new_tokens > context:
            raise PromptTooLong(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens {max_new_tokens} that is "
                f"{len(p) + max_new_tokens} > the model's context of {context} tokens: shorten the prompt or "
                "lower --max-new-tokens")

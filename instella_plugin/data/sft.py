"""Instella chat formatting for SFT and DPO: token + loss-mask arrays, storage, and the reader.

Format (official Instella SFT data code): BOS (= EOS, id 0), then per message the role marker
``<|system|>\\n`` / ``<|user|>\\n`` / ``<|assistant|>\\n`` (plain text, not special tokens) and the
stripped content, each tokenised separately; user and system content are followed by ``"\\n"``,
assistant content by EOS and ``"\\n"``. The loss mask is 1 on assistant content and its EOS only.
The tokenizer's ``CHAT_TEMPLATE`` (``data.tokenizer``) renders the same text, so
``apply_chat_template(..., tokenize=True)`` gives the same ids (every assistant turn, the last
included, ends with EOS and ``"\\n"``).

Storage (``PREFIX`` relative to the data root): two megatron-core indexed datasets written through
``IndexedDatasetBuilder``, ``PREFIX_tokens`` (uint16 token ids) and ``PREFIX_mask`` (uint8 loss mask,
same lengths). One document per example; an SFT example is one sequence, a preference pair two
(chosen, then rejected). Existing stores are replaced only with ``overwrite`` and stay readable until
both new pairs are complete; an input with no chat is an error.
"""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from instella_plugin.data.indexed import PartialPairWriter, check_pair, choose_dtype, refuse_existing
from instella_plugin.data.tokenizer import CHAT_TEMPLATE, load_tokenizer  # noqa: F401  (CHAT_TEMPLATE: re-export)

ROLES = ("system", "user", "assistant")

class ChatFormatter:
    """Tokenise chats into (ids, loss mask) the Instella way; marker encodings are cached."""

    def __init__(self, tokenizer=None):
        self.tok = tokenizer if hasattr(tokenizer, "encode") else load_tokenizer(tokenizer)
        self.bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.eos = self.tok.eos_token_id
        self.markers = {r: self._enc(f"<|{r}|>\n") for r in ROLES}
        self.newline = self._enc("\n")

    def _enc(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def __call__(self, messages: Sequence[Dict[str, str]]) -> Tuple[np.ndarray, np.ndarray]:
        """(ids int32, mask uint8) of one chat; raises ValueError on an unknown role or bad message."""
        if not messages:
            raise ValueError("a chat needs at least one message")
        ids, mask = [self.bos], [0]
        for n, msg in enumerate(messages):
            role, content = (msg.get("role"), msg.get("content")) if isinstance(msg, dict) else (None, None)
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"message {n}: expected {{'role': one of {ROLES}, 'content': str}}, got {msg!r}")
            body = self._enc(content.strip())
            ids += self.markers[role]
            mask += [0] * len(self.markers[role])
            if role == "assistant":
                ids += body + [self.eos]
                mask += [1] * (len(body) + 1)
            else:
                ids += body
                mask += [0] * len(body)
            ids += self.newline
            mask += [0] * len(self.newline)
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


def _writers(prefix: str, vocab: int, overwrite: bool, inputs: Sequence[str]):
    refuse_existing([prefix + "_tokens", prefix + "_mask"], overwrite, inputs)
    return PartialPairWriter(prefix + "_tokens", choose_dtype(vocab)), PartialPairWriter(prefix + "_mask", np.uint8)


def _commit(tok_w: PartialPairWriter, mask_w: PartialPairWriter, what: str, inputs: Sequence[str]) -> None:
    if tok_w.documents == 0:
        named = ", ".join(inputs) if inputs else "the input"
        raise ValueError(f"no {what} to write from {named} (empty input); nothing was written")
    mask_w.commit()
    tok_w.commit()


def write_sft(chats: Iterable[Sequence[Dict[str, str]]], prefix: str, tokenizer=None, overwrite: bool = False,
              inputs: Sequence[str] = ()) -> int:
    """Format and store chats (each a list of messages) at ``prefix``; returns the example count.

    ``inputs``: the files the chats come from, named in errors and never written over."""
    fmt = ChatFormatter(tokenizer)
    tok_w, mask_w = _writers(prefix, len(fmt.tok), overwrite, inputs)
    with tok_w, mask_w:
        for chat in chats:
            ids, mask = fmt(chat)
            tok_w.add_document(ids)
            mask_w.add_document(mask)
        _commit(tok_w, mask_w, "chats", inputs)
    return tok_w.documents


def write_preference(pairs: Iterable[Tuple[Sequence[dict], Sequence[dict]]], prefix: str, tokenizer=None,
                     overwrite: bool = False, inputs: Sequence[str] = ()) -> int:
    """Store (chosen, rejected) chat pairs: each pair one document of two sequences."""
    fmt = ChatFormatter(tokenizer)
    tok_w, mask_w = _writers(prefix, len(fmt.tok), overwrite, inputs)
    with tok_w, mask_w:
        for chosen, rejected in pairs:
            (ci, cm), (ri, rm) = fmt(chosen), fmt(rejected)
            tok_w.add_document(np.concatenate([ci, ri]), [len(ci), len(ri)])
            mask_w.add_document(np.concatenate([cm, rm]), [len(cm), len(rm)])
        _commit(tok_w, mask_w, "preference pairs", inputs)
    return tok_w.documents


def read_chat_jsonl(path: str, preference: bool = False) -> Iterable:
    """Chats from JSONL: ``{"messages": [...]}`` per line, or ``{"chosen": [...], "rejected": [...]}``."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                yield (rec["chosen"], rec["rejected"]) if preference else rec["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                keys = "'chosen' and 'rejected'" if preference else "'messages'"
                raise ValueError(f"{path}:{lineno}: expected a JSON object with {keys} ({exc!r})") from exc


class _Store:
    """The token and mask datasets of one prefix, checked to describe the same examples."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for part in ("_tokens", "_mask"):
            check_pair(prefix + part)
        self.tokens, self.mask = IndexedDataset(prefix + "_tokens"), IndexedDataset(prefix + "_mask")
        if not (np.array_equal(self.tokens.sequence_lengths, self.mask.sequence_lengths)
                and np.array_equal(self.tokens.document_indices, self.mask.document_indices)):
            raise ValueError(f"{prefix}: the _tokens and _mask datasets differ in shape; rewrite the SFT data")
        self.seqs_per_doc = np.diff(self.tokens.document_indices)

    def example(self, seq: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.tokens[seq].astype(np.int64), self.mask[seq].astype(np.float32)


def _sample(parts: List[Tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int, packed: bool) -> Dict[str, np.ndarray]:
    """Lay examples into one window of seq_length + 1 tokens and shift it into inputs and labels."""
    window = np.full(seq_length + 1, pad_id, dtype=np.int64)
    mask = np.zeros(seq_length + 1, dtype=np.float32)
    segments = np.zeros(seq_length + 1, dtype=np.int64)
    at = 0
    for n, (ids, m) in enumerate(parts):
        k = min(len(ids), seq_length + 1 - at)
        window[at:at + k], mask[at:at + k], segments[at:at + k] = ids[:k], m[:k], n + 1
        at += k
    out = {"tokens": window[:-1], "labels": window[1:], "loss_mask": mask[1:],
           "position_ids": np.arange(seq_length, dtype=np.int64)}
    if packed:
        out["segment_ids"] = segments[:-1]  # 1-based example index per token, 0 on padding
    return out


class SFTDataset:
    """Fixed-length SFT samples from ``prefix`` (written by ``write_sft``).

    ``__getitem__`` returns numpy arrays of length ``seq_length``: ``tokens``, ``labels`` (tokens shifted
    by one), ``loss_mask`` (float32, aligned with labels), ``position_ids``. Each example is truncated to
    ``seq_length + 1`` tokens and padded with ``pad_id`` (mask 0): the official recipe. With
    ``pack=True`` consecutive examples are concatenated greedily into each window and ``segment_ids``
    tells them apart (positions are not reset, as in Instella's packed training).
    """

    def __init__(self, prefix: str, seq_length: int, pad_id: int = 1, pack: bool = False):
        self.store = _Store(prefix)
        if (self.store.seqs_per_doc != 1).any():
            raise ValueError(f"{prefix} holds preference pairs; read it with PreferenceDataset")
        self.seq_length, self.pad_id, self.pack = seq_length, pad_id, pack
        lengths = np.minimum(self.store.tokens.sequence_lengths, seq_length + 1)
        self.bins: List[List[int]] = []
        if pack:
            used = seq_length + 1
            for i, n in enumerate(lengths):
                if used + n > seq_length + 1:
                    self.bins.append([])
                    used = 0
                self.bins[-1].append(i)
                used += int(n)
        else:
            self.bins = [[i] for i in range(len(lengths))]

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        parts = [self.store.example(i) for i in self.bins[idx]]
        return _sample(parts, self.seq_length, self.pad_id, self.pack)


class PreferenceDataset:
    """(chosen, rejected) pairs from ``prefix`` (written by ``write_preference``): each item holds the
    ``SFTDataset`` keys of both, prefixed ``chosen_`` and ``rejected_``."""

    def __init__(self, prefix: str, seq_length: int, pad_id: int = 1):
        self.store = _Store(prefix)
        if (self.store.seqs_per_doc != 2).any():
            raise ValueError(f"{prefix} does not hold preference pairs (two sequences per example)")
        self.seq_length, self.pad_id = seq_length, pad_id

    def __len__(self) -> int:
        return len(self.store.seqs_per_doc)

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        out = {}
        for k, name in enumerate(("chosen", "rejected")):
            sample = _sample([self.store.example(2 * idx + k)], self.seq_length, self.pad_id, False)
            out.update({f"{name}_{key}": v for key, v in sample.items()})
        return out

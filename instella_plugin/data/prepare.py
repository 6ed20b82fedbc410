"""``instella data prepare``: tokenise documents into one Megatron ``.bin``/``.idx`` pair.

Reads JSONL/Parquet/Arrow files or a Hugging Face dataset from a local path or the local cache
(``readers.py``), tokenises each document with a Hugging Face tokenizer (default: the real Instella
tokenizer), appends EOS (id 0) to each document, and writes through megatron-core's
``IndexedDatasetBuilder`` (``indexed.PartialPairWriter``: ``.bin`` renamed into place first, ``.idx``
last). Documents are read in order in the main process, tokenised in chunks by ``workers`` processes
and written back in submission order, so the output bytes do not depend on the worker count.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, asdict
from typing import List, Optional, Sequence

import numpy as np

from instella_plugin.data.indexed import PartialPairWriter, choose_dtype, refuse_existing
from instella_plugin.data.readers import BadRecord, read_documents, resolve_inputs
from instella_plugin.data.sentences import punkt_splitter, split_sentences
from instella_plugin.data.tokenizer import load_tokenizer

_WORKER = {}


@dataclass
class PrepareStats:
    """What one ``prepare`` call wrote."""

    prefix: str
    documents: int
    tokens: int
    bad_records: int
    empty_documents: int
    seconds: float
    dtype: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _init_worker(tokenizer, eod_id: Optional[int], split: Optional[str]) -> None:
    """Per-process state; ``tokenizer`` is a ``tokenizers.Tokenizer`` or its JSON (sent to workers)."""
    if isinstance(tokenizer, str):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer)
    _WORKER.update(tokenizer=tokenizer, eod=eod_id, split=split)


def _tokenize_chunk(texts: Sequence[str]):
    """Tokenise a chunk of documents: (tokens int32, sequence lengths, sequences per document).

    With sentence splitting each sentence is one sequence of its document; EOS ends the last one.
    """
    tok, eod, split = _WORKER["tokenizer"], _WORKER["eod"], _WORKER["split"]
    if split:
        pieces_per_doc = [split_sentences(t, split) for t in texts]
        flat = [p for pieces in pieces_per_doc for p in pieces]
        per_doc = np.fromiter((len(p) for p in pieces_per_doc), dtype=np.int64, count=len(texts))
    else:
        flat, per_doc = list(texts), np.ones(len(texts), dtype=np.int64)
    encodings = tok.encode_batch(flat, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    if eod is not None:
        ends = np.cumsum(per_doc) - 1
        for d in ends[per_doc > 0]:
            ids[d].append(eod)
        lengths[ends[per_doc > 0]] += 1
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return tokens, lengths, per_doc


def _progress(total: int, enabled: Optional[bool], desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=(not sys.stderr.isatty()) if enabled is None else not enabled, dynamic_ncols=True,
                mininterval=0.5)


def prepare(inputs: List[str] | str, output_prefix: str, tokenizer=None, json_key: str = "text",
            workers: int = 1, dtype: str = "auto", append_eod: bool = True, split_sentences: bool = False,
            language: str = "english", skip_bad_records: bool = False, progress: Optional[bool] = None,
            chunk_documents: int = 512, overwrite: bool = False) -> PrepareStats:
    """Tokenise ``inputs`` into ``output_prefix.{bin,idx}``; return counts and timing.

    ``tokenizer``: None for the Instella tokenizer, a path/name for ``load_tokenizer``, or a loaded
    ``PreTrainedTokenizerFast``. ``skip_bad_records``: skip and count malformed records instead of
    stopping at the first one (the error names file and line). Empty documents are skipped and counted.
    An existing pair at ``output_prefix`` is refused unless ``overwrite``; it stays readable, byte for
    byte, until the new pair is complete. A run that writes no document is an error naming the inputs
    (empty, or every record skipped). On any error or interruption no new ``.idx`` is published.
    """
    files = resolve_inputs([inputs] if isinstance(inputs, str) else list(inputs))
    refuse_existing([output_prefix], overwrite, files)
    tok = tokenizer if hasattr(tokenizer, "backend_tokenizer") else load_tokenizer(tokenizer)
    np_dtype = choose_dtype(len(tok), dtype)
    eod = tok.eos_token_id if append_eod else None
    if append_eod and eod is None:
        raise ValueError("the tokenizer has no EOS token; pass append_eod=False (--no-append-eod) or another tokenizer")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    split = language if split_sentences else None
    if split_sentences:
        punkt_splitter(language)  # fail on a missing model before any work
    total_bytes = sum(os.path.getsize(f) if os.path.isfile(f) else 0 for f in files) or None  # None: no ETA
    start = time.perf_counter()
    bad = empty = 0
    if workers > 1:
        pool = mp.get_context("fork").Pool(workers, _init_worker, (tok.backend_tokenizer.to_str(), eod, split))
    else:
        pool = None
        _init_worker(tok.backend_tokenizer, eod, split)
    pending: collections.deque = collections.deque()
    bar = _progress(total_bytes, progress, os.path.basename(output_prefix))
    try:
        with PartialPairWriter(output_prefix, np_dtype) as writer:
            def drain(limit: int) -> None:
                while len(pending) > limit:
                    result, nbytes = pending.popleft()
                    writer.add_chunk(*(result.get() if pool is not None else result))
                    bar.update(nbytes)
                    bar.set_postfix_str(f"{writer.tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)

            chunk, chunk_bytes = [], 0
            for text, where, nbytes in read_documents(files, json_key):
                chunk_bytes += nbytes
                if isinstance(text, BadRecord):
                    if not skip_bad_records:
                        raise text
                    bad += 1
                    continue
                if not text.strip():
                    empty += 1
                    continue
                chunk.append(text)
                if len(chunk) >= chunk_documents:
                    pending.append((pool.apply_async(_tokenize_chunk, (chunk,)) if pool else _tokenize_chunk(chunk), chunk_bytes))
                    chunk, chunk_bytes = [], 0
                    drain(2 * workers if pool else 0)
            if chunk or chunk_bytes:
                pending.append((pool.apply_async(_tokenize_chunk, (chunk,)) if pool else _tokenize_chunk(chunk), chunk_bytes))
            drain(0)
            if writer.documents == 0:
                raise ValueError(_nothing_written(files, bad, empty))
            writer.commit()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return PrepareStats(output_prefix, writer.documents, writer.tokens, bad, empty,
                        time.perf_counter() - start, np.dtype(np_dtype).name)


def _nothing_written(files: List[str], bad: int, empty: int) -> str:
    """Why a run wrote no document, naming the inputs."""
    named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    if bad or empty:
        why = (f"all {bad + empty} records were skipped ({bad} malformed, skipped by --skip-bad-lines; "
               f"{empty} with empty text)")
    else:
        why = "the input holds no records (it is empty)"
    return f"no documents to write from {named}: {why}; nothing was written"


def stats_line(stats: PrepareStats) -> str:
    """One human line summarising a run."""
    d = asdict(stats)
    return (f"{d['prefix']}: {d['documents']:,} documents, {d['tokens']:,} tokens ({d['dtype']}) in "
            f"{d['seconds']:.1f}s, {stats.tokens_per_second:,.0f} tokens/s; skipped {d['bad_records']} bad and "
            f"{d['empty_documents']} empty records")

"""Megatron indexed datasets (``.bin``/``.idx``): crash-safe writing and validation.

Writing goes through megatron-core's ``IndexedDatasetBuilder``. A pair is complete only when its
``.idx`` exists: ``PartialPairWriter`` writes ``PREFIX.bin.partial`` and ``PREFIX.idx.partial`` and
leaves an old pair of the prefix as it is, readable, until ``commit()``: that removes the old
``.idx``, renames the new ``.bin`` into place and the new ``.idx`` last. A process killed while
writing leaves the old pair byte-identical; one killed inside the commit leaves no ``.idx`` next to
a ``.bin`` it does not describe. ``refuse_existing`` is the ``--overwrite`` rule of every data command
(run before any work). ``check_pair`` validates an existing pair against its ``.bin`` before anyone
trains on it.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


class IndexedDataError(ValueError):
    """An ``.idx``/``.bin`` pair that is missing, truncated or inconsistent."""


class OutputExists(FileExistsError):
    """An output that already exists, written over only with ``--overwrite``."""


def refuse_existing(prefixes, overwrite: bool, inputs=()) -> None:
    """The output rule of the data commands, checked before any work.

    Refuses an output ``.bin``/``.idx`` that is one of ``inputs`` (always), and one that exists unless
    ``overwrite`` (then the old pair stays readable until the new one is complete).
    """
    outputs = [p + ext for p in prefixes for ext in (".bin", ".idx")]
    real_inputs = {os.path.realpath(i) for i in inputs}
    clash = [o for o in outputs if os.path.realpath(o) in real_inputs]
    if clash:
        raise ValueError(f"output {clash[0]} is also an input; write to another --output-prefix")
    existing = [o for o in outputs if os.path.lexists(o)]
    if existing and not overwrite:
        raise OutputExists(f"output {', '.join(existing)} already exists; pass --overwrite to replace it (the old "
                           "data stays readable until the new data is complete), or choose another output")


def choose_dtype(vocab_size: int, requested: str = "auto") -> type:
    """numpy dtype for token ids: ``uint16`` when every id fits (auto), else ``int32``.

    Raises before any work when ``uint16`` is requested for a vocabulary that does not fit.
    """
    fits16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if requested == "auto":
        return np.uint16 if fits16 else np.int32
    if requested == "uint16":
        if not fits16:
            raise ValueError(
                f"--dtype uint16 cannot hold a vocabulary of {vocab_size} ids (ids up to {vocab_size - 1} > "
                f"65535); use --dtype int32 or --dtype auto"
            )
        return np.uint16
    if requested == "int32":
        return np.int32
    raise ValueError(f"unknown dtype {requested!r}; choose auto, uint16 or int32")


def publish_pair(bin_tmp, idx_tmp: str, prefix: str) -> None:
    """Rename a complete new pair over ``prefix``: the old ``.idx`` goes first (the old pair stops looking
    complete), then the ``.bin`` is renamed into place (skipped when ``bin_tmp`` is None) and the ``.idx``
    last. Until this call an old pair is untouched."""
    if os.path.lexists(prefix + ".idx"):
        os.remove(prefix + ".idx")
    if bin_tmp is not None:
        os.replace(bin_tmp, prefix + ".bin")
    os.replace(idx_tmp, prefix + ".idx")


class PartialPairWriter:
    """Write one ``.bin``/``.idx`` pair under temporary names; ``commit()`` publishes it.

    Use as a context manager: leaving the block by an exception removes the partial files.
    """

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix = prefix
        self.dtype = dtype
        self.bin_path, self.idx_path = prefix + ".bin", prefix + ".idx"
        self.bin_tmp, self.idx_tmp = self.bin_path + ".partial", self.idx_path + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.builder = IndexedDatasetBuilder(self.bin_tmp, dtype=dtype)
        self.documents = 0
        self.tokens = 0
        self._done = False

    def add_document(self, ids, lengths=None) -> None:
        """Append one document; ``lengths`` splits it into sequences (default: one sequence)."""
        arr = np.asarray(ids, dtype=self.dtype)
        self.builder.add_document(arr, [arr.size] if lengths is None else list(lengths))
        self.documents += 1
        self.tokens += int(arr.size)

    def add_chunk(self, tokens: np.ndarray, seq_lengths: np.ndarray, seqs_per_doc: np.ndarray) -> None:
        """Append many documents at once: their tokens concatenated, every sequence's length, and
        how many sequences each document has (the builder's lists extended in bulk)."""
        if len(tokens) and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id {int(tokens.max())} does not fit {np.dtype(self.dtype).name}; use --dtype int32")
        self.builder.data_file.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self.builder.sequence_lengths.extend(int(n) for n in seq_lengths)
        base = self.builder.document_indices[-1]
        self.builder.document_indices.extend(int(n) for n in base + np.cumsum(seqs_per_doc))
        self.documents += len(seqs_per_doc)
        self.tokens += int(len(tokens))

    def commit(self) -> None:
        """Write the index; then publish: remove the old ``.idx``, rename the ``.bin``, the ``.idx`` last."""
        self.builder.finalize(self.idx_tmp)
        publish_pair(self.bin_tmp, self.idx_tmp, self.prefix)
        self._done = True

    def abort(self) -> None:
        """Close and delete the partial files."""
        try:
            self.builder.data_file.close()
        finally:
            for path in (self.bin_tmp, self.idx_tmp):
                if os.path.exists(path):
                    os.remove(path)
        self._done = True

    def __enter__(self) -> "PartialPairWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self._done:
            self.abort()
        return None


@dataclass(frozen=True)
class PairInfo:
    """What an ``.idx`` says about its pair (after ``check_pair`` validated it)."""

    prefix: str
    dtype: type
    sequences: int
    documents: int
    tokens: int


def check_pair(prefix: str) -> PairInfo:
    """Validate ``PREFIX.idx`` against ``PREFIX.bin`` without trusting either; return counts.

    Checks: both files exist, the header magic/version/dtype, that the ``.idx`` is exactly as long
    as its counts imply (with or without the optional per-sequence modes), that pointers follow the
    lengths, that document indices are monotonic and end at the sequence count, and that the
    ``.bin`` holds exactly the tokens the index describes.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        raise IndexedDataError(f"{prefix}: missing {', '.join(missing)}; (re)run `instella data prepare` or `instella data index`")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != INDEX_MAGIC:
            raise IndexedDataError(f"{idx_path}: not a Megatron index (bad or truncated header); rebuild it")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise IndexedDataError(f"{idx_path}: unsupported index version {version}")
        try:
            dtype = DType.dtype_from_code(code)
        except ValueError as exc:
            raise IndexedDataError(f"{idx_path}: unknown dtype code {code}") from exc
        body = n_seq * 4 + n_seq * 8 + n_doc * 8
        if size not in (_HEADER_BYTES + body, _HEADER_BYTES + body + n_seq):
            raise IndexedDataError(
                f"{idx_path}: {size} bytes, but its header promises {n_seq} sequences and {n_doc - 1} documents "
                f"({_HEADER_BYTES + body} bytes): the index is truncated or corrupt; rebuild it"
            )
        lengths = np.frombuffer(f.read(n_seq * 4), dtype=np.int32)
        pointers = np.frombuffer(f.read(n_seq * 8), dtype=np.int64)
        doc_idx = np.frombuffer(f.read(n_doc * 8), dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    tokens = int(lengths.sum(dtype=np.int64))
    expected_ptr = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64) * itemsize]) if n_seq else pointers
    if (lengths < 0).any() or not np.array_equal(pointers, expected_ptr):
        raise IndexedDataError(f"{idx_path}: sequence pointers do not follow the lengths; the index is corrupt")
    if n_doc == 0 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or (np.diff(doc_idx) < 0).any():
        raise IndexedDataError(f"{idx_path}: document indices are inconsistent with {n_seq} sequences")
    bin_size = os.path.getsize(bin_path)
    if bin_size != tokens * itemsize:
        raise IndexedDataError(
            f"{prefix}: the .idx describes {tokens} tokens of {np.dtype(dtype).name} ({tokens * itemsize} bytes) but "
            f"the .bin has {bin_size} bytes: the pair does not match (a truncated copy, or a .bin from another "
            f"run); rebuild the pair"
        )
    return PairInfo(prefix, dtype, int(n_seq), int(n_doc) - 1, tokens)


def read_documents(prefix: str):
    """Yield each document of a pair as one numpy array (its sequences concatenated)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    doc_idx = ds.document_indices
    for d in range(len(doc_idx) - 1):
        parts = [ds[i] for i in range(doc_idx[d], doc_idx[d + 1])]
        yield np.concatenate(parts) if parts else np.zeros(0, dtype=ds.index.dtype)

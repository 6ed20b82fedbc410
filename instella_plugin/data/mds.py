"""MosaicML streaming (MDS) shards as training data: ``instella data prepare --input-format mds``.

Instella-Long's post-training data (``amd/Instella-Long``) is published as MDS shards in ProLong's
layout: each sample is one already tokenised (and usually packed) sequence with the columns
``input_ids`` (``ndarray:uint32``), ``indices`` (``ndarray:uint32``, the ``(start, end)`` token span of
each document in the sequence) and, for instruction data, ``mask`` (``ndarray:uint8``, 1 where the
loss counts); ``length`` and ``domain`` ride along and are not needed. The column names can be
changed (``MDSColumns``); only the token column is required: without ``indices`` a sample is one
document, without ``mask`` every token counts.

Output: an SFT store (``data.sft``: ``PREFIX_tokens`` and ``PREFIX_mask``, megatron ``.bin/.idx``
pairs) with **one example per document**. ``SFTDataset(pack=True)`` packs consecutive examples into
each window again and marks each with its own segment id, which the plugin turns into attention
document boundaries, so the packing the shards were written with comes back (a sample of exactly
``seq_length`` tokens fills one window) and no document attends to another. Tokens the ``indices``
leave uncovered become documents of their own.

Shards are read with the library's own readers (``streaming.base.format``), compressed ones
(zstd, gzip, ...) through its ``decompress``. Importing ``streaming`` itself pulls in its vision
datasets (torchvision), so the ``streaming`` package is registered by path without running its
``__init__`` before the format modules are imported.
"""
import importlib.util
import json
import os
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from instella_plugin.data.indexed import PartialPairWriter, choose_dtype, refuse_existing


def _register_streaming_by_path() -> None:
    if "streaming" in sys.modules:
        return
    spec = importlib.util.find_spec("streaming")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("MDS input needs mosaicml-streaming (pip install mosaicml-streaming --no-deps)")
    package = types.ModuleType("streaming")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["streaming"] = package


_register_streaming_by_path()
from streaming.base.compression import decompress  # noqa: E402
from streaming.base.format import MDSWriter, reader_from_json  # noqa: E402,F401  (MDSWriter: for writers of MDS)
from streaming.base.format.index import get_index_basename  # noqa: E402


@dataclass(frozen=True)
class MDSColumns:
    """Which MDS columns hold the tokens, the document spans and the loss mask."""
    tokens: str = "input_ids"
    indices: str = "indices"
    mask: str = "mask"


def find_mds_dirs(inputs: Sequence[str]) -> List[str]:
    """Every directory at or under ``inputs`` that holds an MDS ``index.json``, in sorted order."""
    found = []
    for root in inputs:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"MDS input {root!r} is not a directory (give the folder with index.json)")
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            if get_index_basename() in files:
                found.append(folder)
    if not found:
        raise FileNotFoundError(f"no MDS index.json under {', '.join(inputs)}; is this MosaicML streaming data?")
    return found


def _shards(folder: str) -> List[dict]:
    with open(os.path.join(folder, get_index_basename()), encoding="utf-8") as f:
        index = json.load(f)
    shards = index.get("shards") if isinstance(index, dict) else None
    if not shards:
        raise ValueError(f"{folder}/index.json lists no shards")
    return shards


def check_columns(folders: Sequence[str], columns: MDSColumns) -> Dict[str, bool]:
    """Refuse shards without the token column (before any work); say which optional ones exist."""
    present = {}
    for folder in folders:
        for shard in _shards(folder):
            if shard.get("format") != "mds":
                raise ValueError(f"{folder}: shard {shard.get('raw_data', {}).get('basename')} is "
                                 f"{shard.get('format')!r}, not MDS")
            names = shard.get("column_names", [])
            if columns.tokens not in names:
                raise ValueError(f"MDS shards in {folder} have the columns {names}, no token column "
                                 f"{columns.tokens!r}; pass --mds-tokens-column with the column that holds "
                                 "the token ids")
            encodings = dict(zip(names, shard.get("column_encodings", [])))
            if not str(encodings.get(columns.tokens, "")).startswith("ndarray"):
                raise ValueError(f"MDS column {columns.tokens!r} in {folder} is {encodings.get(columns.tokens)!r}; "
                                 "token ids must be an ndarray column (e.g. ndarray:uint32)")
            for key in ("indices", "mask"):
                name = getattr(columns, key)
                present[key] = present.get(key, True) and name in names
    return present


def iter_samples(folder: str) -> Iterator[dict]:
    """The decoded samples of one MDS directory, shard by shard, through streaming's readers."""
    with tempfile.TemporaryDirectory(prefix="mds-") as scratch:
        for shard in _shards(folder):
            raw = shard["raw_data"]["basename"]
            base = folder
            if not os.path.exists(os.path.join(folder, raw)):
                zipped = shard.get("zip_data")
                if not zipped or not os.path.exists(os.path.join(folder, zipped["basename"])):
                    raise FileNotFoundError(f"{folder}: shard {raw} is missing (neither raw nor compressed file)")
                with open(os.path.join(folder, zipped["basename"]), "rb") as f:
                    data = decompress(shard["compression"], f.read())
                base = scratch
                os.makedirs(os.path.dirname(os.path.join(scratch, raw)), exist_ok=True)
                with open(os.path.join(scratch, raw), "wb") as f:
                    f.write(data)
            reader = reader_from_json(base, None, shard)
            reader.validate(allow_unsafe_types=False)
            for i in range(reader.samples):
                yield reader.get_item(i)
            if base == scratch:
                os.remove(os.path.join(scratch, raw))


def sample_documents(sample: dict, columns: MDSColumns, where: str = "sample") -> List[Tuple[np.ndarray, np.ndarray]]:
    """(token ids int64, loss mask uint8) of each document of one MDS sample, in order."""
    ids = np.asarray(sample[columns.tokens]).reshape(-1).astype(np.int64)
    n = len(ids)
    mask = sample.get(columns.mask)
    mask = np.ones(n, dtype=np.uint8) if mask is None else np.asarray(mask).reshape(-1).astype(np.uint8)
    if len(mask) != n:
        raise ValueError(f"{where}: {columns.mask!r} has {len(mask)} entries for {n} tokens")
    spans = sample.get(columns.indices)
    cuts = {0, n}
    if spans is not None:
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        for start, end in spans:
            if not 0 <= start < end <= n:
                raise ValueError(f"{where}: document span ({start}, {end}) is outside the {n} tokens or empty")
            cuts.update((int(start), int(end)))
        order = spans[np.argsort(spans[:, 0])]
        if (order[1:, 0] < order[:-1, 1]).any():
            raise ValueError(f"{where}: document spans in {columns.indices!r} overlap")
    edges = sorted(cuts)
    return [(ids[a:b], mask[a:b]) for a, b in zip(edges, edges[1:]) if b > a]


def prepare_mds(inputs: Sequence[str], output_prefix: str, columns: MDSColumns = MDSColumns(),
                vocab_size: int = 50304, dtype: str = "auto", overwrite: bool = False) -> dict:
    """Convert MDS shards under ``inputs`` into the SFT store ``output_prefix`` (see the module
    docstring); returns counts of samples, documents, tokens and loss tokens."""
    folders = find_mds_dirs(inputs)
    check_columns(folders, columns)
    token_dtype = choose_dtype(vocab_size, dtype)
    refuse_existing([output_prefix + "_tokens", output_prefix + "_mask"], overwrite, inputs)
    stats = {"samples": 0, "documents": 0, "tokens": 0, "loss_tokens": 0}
    top = np.iinfo(token_dtype).max
    with PartialPairWriter(output_prefix + "_tokens", token_dtype) as tok_w, \
            PartialPairWriter(output_prefix + "_mask", np.uint8) as mask_w:
        for folder in folders:
            for k, sample in enumerate(iter_samples(folder)):
                for ids, mask in sample_documents(sample, columns, f"{folder} sample {k}"):
                    if ids.min() < 0 or ids.max() > top:
                        raise ValueError(f"{folder} sample {k}: token id {int(ids.max())} does not fit "
                                         f"{np.dtype(token_dtype).name}; pass --dtype int32")
                    tok_w.add_document(ids)
                    mask_w.add_document(mask)
                    stats["documents"] += 1
                    stats["tokens"] += len(ids)
                    stats["loss_tokens"] += int(mask.sum())
                stats["samples"] += 1
        if stats["documents"] == 0:
            raise ValueError(f"the MDS shards under {', '.join(inputs)} hold no samples; nothing was written")
        mask_w.commit()
        tok_w.commit()
    return stats

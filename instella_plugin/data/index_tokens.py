"""``instella data index``: an ``.idx`` for existing raw token files, without re-tokenising.

OLMo/Dolma token files (``part-*.npy``) are raw ``uint16`` ids with no header, documents ending in
EOS: byte-compatible with a Megatron ``.bin``. This scans a file for ``eod_id`` (default 0, the
Instella tokenizer's EOS; older AI2 files use 50279), makes each EOS-terminated run one document
(trailing tokens after the last EOS form a final document), and writes the index with megatron-core's
own index writer. The ``.bin`` is the input itself (``--bin-mode symlink``, the default), a hard link,
or a copy. Both are written under temporary names and published together (``indexed.publish_pair``:
an old pair stays readable until then; ``.idx`` last, so a crash leaves no complete-looking pair).
An existing output is replaced only with ``overwrite``; an empty token file is an error.
A true NumPy ``.npy`` (with a header) has its payload copied into the ``.bin``.
"""
from __future__ import annotations

import os
import shutil
from typing import List

import numpy as np

from megatron.core.datasets.indexed_dataset import _IndexWriter

from instella_plugin.data.indexed import OutputExists, publish_pair

_NPY_MAGIC = b"\x93NUMPY"
_SCAN_CHUNK = 1 << 26  # tokens per scan step


def _payload(path: str, dtype) -> tuple:
    """(memmap of the token ids, byte offset of the payload) for a raw or a real .npy file."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: an empty token file (0 bytes); there is nothing to index")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == _NPY_MAGIC:
        arr = np.load(path, mmap_mode="r")
        if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
            raise ValueError(f"{path}: a .npy of {arr.dtype} {arr.shape}, expected 1-D {np.dtype(dtype).name}; pass --dtype")
        if arr.size == 0:
            raise ValueError(f"{path}: a .npy holding no tokens; there is nothing to index")
        return arr, arr.offset
    itemsize = np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size % itemsize:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {np.dtype(dtype).name} tokens; wrong --dtype "
                         f"or a truncated file")
    return np.memmap(path, dtype=dtype, mode="r"), 0


def document_lengths(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """Length of every document (each ends at an ``eod_id`` inclusive; a trailing run is the last)."""
    ends = [np.flatnonzero(tokens[i:i + _SCAN_CHUNK] == eod_id) + i + 1 for i in range(0, len(tokens), _SCAN_CHUNK)]
    ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
    if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
        ends = np.append(ends, len(tokens))
    lengths = np.diff(np.concatenate([[0], ends]))
    if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
        raise ValueError(f"a document of {lengths.max()} tokens exceeds the index's int32 lengths; is --eod-id right?")
    return lengths.astype(np.int32)


def _check_output(path: str, output_prefix: str, overwrite: bool) -> bool:
    """Refuse an output that is the input or exists (unless ``overwrite``); True when the input is its own .bin."""
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    same = os.path.abspath(path) == os.path.abspath(bin_path)
    if os.path.realpath(path) == os.path.realpath(idx_path):
        raise ValueError(f"output {idx_path} is the input itself; give another --output-dir")
    existing = [p for p in ((idx_path,) if same else (bin_path, idx_path)) if os.path.lexists(p)]
    if existing and not overwrite:
        raise OutputExists(f"output {', '.join(existing)} already exists; pass --overwrite to replace it (the old "
                           "pair stays readable until the new one is complete), or give another --output-dir")
    return same


def index_token_file(path: str, output_prefix: str, eod_id: int = 0, dtype: str = "uint16",
                     bin_mode: str = "symlink", overwrite: bool = False) -> dict:
    """Write ``output_prefix.{bin,idx}`` for the raw token file ``path``; return counts."""
    np_dtype = {"uint16": np.uint16, "int32": np.int32}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"--dtype must be uint16 or int32, not {dtype!r}")
    if bin_mode not in ("symlink", "hardlink", "copy"):
        raise ValueError(f"--bin-mode must be symlink, hardlink or copy, not {bin_mode!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file {path} does not exist")
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    same = _check_output(path, output_prefix, overwrite)
    tokens, offset = _payload(path, np_dtype)
    lengths = document_lengths(tokens, eod_id)
    if len(tokens) and not (tokens == eod_id).any():
        raise ValueError(f"{path}: no token equals --eod-id {eod_id}; AI2's older token files end documents with 50279")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_bin = None
    if not same:
        tmp_bin = bin_path + ".partial"
        if os.path.lexists(tmp_bin):
            os.remove(tmp_bin)
        if offset:  # a real .npy: the payload alone is the .bin
            with open(path, "rb") as src, open(tmp_bin, "wb") as dst:
                src.seek(offset)
                shutil.copyfileobj(src, dst, 1 << 24)
        elif bin_mode == "symlink":
            os.symlink(os.path.abspath(path), tmp_bin)
        elif bin_mode == "hardlink":
            os.link(path, tmp_bin)
        else:
            shutil.copyfile(path, tmp_bin)
    elif offset:
        raise ValueError(f"{path} has a .npy header and cannot serve as its own .bin; give another --output-prefix")
    tmp_idx = idx_path + ".partial"
    with _IndexWriter(tmp_idx, np_dtype) as writer:
        writer.write(lengths, None, np.arange(len(lengths) + 1, dtype=np.int64))
    publish_pair(tmp_bin, tmp_idx, output_prefix)
    return {"prefix": output_prefix, "documents": int(len(lengths)), "tokens": int(len(tokens))}


def index_token_files(paths: List[str], output_dir: str | None = None, **kwargs) -> List[dict]:
    """Index many files; each gets the prefix ``output_dir/STEM`` (default: beside the input)."""
    prefixes = [os.path.join(output_dir or os.path.dirname(p), os.path.splitext(os.path.basename(p))[0]) for p in paths]
    clash = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if clash:
        raise ValueError(f"several inputs would be indexed to {', '.join(clash)}; files with the same name need "
                         "their own --output-dir runs")
    for path, prefix in zip(paths, prefixes):  # every output checked before the first is written
        _check_output(path, prefix, kwargs.get("overwrite", False))
    return [index_token_file(path, prefix, **kwargs) for path, prefix in zip(paths, prefixes)]

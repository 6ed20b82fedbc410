"""Document readers for ``instella data prepare``: JSONL (optionally gzipped), Parquet, Arrow, and
Hugging Face datasets from a local path or the local Hugging Face cache (never the network).

Every reader yields ``(text, where, nbytes)``: ``where`` is ``"file:line"`` (JSONL) or ``"file#row"``,
``nbytes`` the input bytes the record used (for progress and ETA; estimated for columnar files).
Malformed JSONL lines raise ``BadRecord`` naming the file and line; callers may skip and count them.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterator, List, Tuple

JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_EXT = (".parquet",)
ARROW_EXT = (".arrow",)
ALL_EXT = JSONL_EXT + PARQUET_EXT + ARROW_EXT


class BadRecord(ValueError):
    """One input record that cannot be read (malformed JSON, missing key, non-string text)."""


def _has_ext(path: str, exts) -> bool:
    return path.lower().endswith(exts)


def _files_in(directory: str) -> List[str]:
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.join(root, n) for n in names if _has_ext(n, ALL_EXT) and not n.startswith(".")]
    return sorted(found)


def _hf_cache_dir(name: str) -> str | None:
    """Local snapshot of a Hugging Face dataset repo, or None (offline: never downloads)."""
    if "/" not in name or os.path.sep in name.strip("/").split("/", 1)[1]:
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=name, repo_type="dataset", local_files_only=True,
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except Exception:
        return None


def resolve_inputs(inputs: List[str]) -> List[str]:
    """Expand files, directories, glob patterns and Hugging Face dataset names into data files.

    Raises ``FileNotFoundError`` listing every input that matched nothing, before any work.
    """
    files, missing = [], []
    for item in inputs:
        if os.path.isfile(item) or (os.path.exists(item) and not os.path.isdir(item)):  # files, FIFOs, /dev/fd/N
            files.append(item)
        elif os.path.isdir(item):
            found = _files_in(item)
            (files.extend(found) if found else missing.append(f"{item} (a directory with no {'/'.join(ALL_EXT)} files)"))
        elif any(ch in item for ch in "*?["):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            (files.extend(found) if found else missing.append(f"{item} (pattern matched nothing)"))
        else:
            snapshot = _hf_cache_dir(item)
            found = _files_in(snapshot) if snapshot else []
            (files.extend(found) if found else missing.append(
                f"{item} (no such file; not a dataset in the local Hugging Face cache either: download it "
                f"first, e.g. `huggingface-cli download --repo-type dataset {item}`)"))
    if missing:
        raise FileNotFoundError("no input data for: " + "; ".join(missing))
    unknown = [f for f in files if os.path.isfile(f) and not _has_ext(f, ALL_EXT)]  # pipes are read as JSONL
    if unknown:
        raise ValueError(f"unsupported input format for {', '.join(unknown)}: use JSONL(.gz), Parquet or Arrow")
    return files


def _read_jsonl(path: str, key: str) -> Iterator[Tuple[object, str, int]]:
    with open(path, "rb") as raw:
        gz = path.endswith(".gz")
        stream = gzip.GzipFile(fileobj=raw) if gz else raw
        last = 0
        for lineno, line in enumerate(stream, 1):
            if gz:  # progress in compressed bytes, against the compressed file size
                now = raw.tell()
                nbytes, last = now - last, now
            else:  # also works on pipes, e.g. prepare <(zstdcat data.jsonl.zst)
                nbytes = len(line)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield BadRecord(f"{where}: malformed JSON line ({exc})"), where, nbytes
                continue
            if not isinstance(record, dict) or key not in record:
                yield BadRecord(f"{where}: no {key!r} field (use --json-key to choose the text field)"), where, nbytes
                continue
            text = record[key]
            if not isinstance(text, str):
                yield BadRecord(f"{where}: field {key!r} is {type(text).__name__}, not a string"), where, nbytes
                continue
            yield text, where, nbytes


def _read_table(path: str, key: str) -> Iterator[Tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if _has_ext(path, PARQUET_EXT):
        batches = pq.ParquetFile(path).iter_batches(columns=[key]) if key in pq.read_schema(path).names else None
    else:
        with open(path, "rb") as f:
            magic = f.read(6)
        source = pa.memory_map(path, "r")
        reader = pa.ipc.open_file(source) if magic == b"ARROW1" else pa.ipc.open_stream(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if magic == b"ARROW1" else reader
        if key not in reader.schema.names:
            batches = None
    if batches is None:
        raise ValueError(f"{path}: no column {key!r} (use --json-key to choose the text column)")
    rows = pq.ParquetFile(path).metadata.num_rows if _has_ext(path, PARQUET_EXT) else _arrow_rows(path)
    per_row = os.path.getsize(path) // max(rows, 1)
    row = 0
    for batch in batches:
        for text in batch.column(batch.schema.get_field_index(key)).to_pylist():
            row += 1
            where = f"{path}#{row}"
            if not isinstance(text, str):
                yield BadRecord(f"{where}: column {key!r} holds {type(text).__name__}, not a string"), where, per_row
                continue
            yield text, where, per_row


def _arrow_rows(path: str) -> int:
    import pyarrow as pa

    with pa.memory_map(path, "r") as source:
        try:
            return pa.ipc.open_file(source).read_all().num_rows
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all().num_rows


def read_documents(files: List[str], key: str = "text") -> Iterator[Tuple[object, str, int]]:
    """Yield ``(text_or_BadRecord, where, nbytes)`` for every record of every file, in order."""
    for path in files:
        jsonl = _has_ext(path, JSONL_EXT) or not os.path.isfile(path)
        yield from (_read_jsonl(path, key) if jsonl else _read_table(path, key))

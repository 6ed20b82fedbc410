"""The post-training source registry (``sources.yaml``) and the rows of a source, read offline.

A source names a public data set (Hugging Face id, config, split) and how its fields map to chats,
preference pairs or prompts. Rows come through the ``datasets`` library, streamed one file at a time
(memory stays flat in the input size), from files given on the command line (JSONL/Parquet/Arrow in
the data set's own field layout) or from the data set's snapshot in the local Hugging Face cache.
Nothing is downloaded: a data set missing from the cache is an error that says how to fetch it once
on a connected machine. Each row comes with ``where`` (``file#row``, 1-based) for error messages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import datasets
import datasets.exceptions
import pyarrow.parquet as pq
import yaml

from instella_plugin.data.readers import ARROW_EXT, JSONL_EXT, PARQUET_EXT, _hf_cache_dir, resolve_inputs

SOURCES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sources.yaml")
KINDS = ("chat", "preference", "prompt")
JSON_CHUNK_BYTES = 1 << 20
_FIELD_KEYS = ("messages", "prompt", "response", "chosen", "rejected", "answer", "question", "choices")


class SourceError(ValueError):
    """An unknown source, a malformed registry entry, or input rows without the expected fields."""


@dataclass(frozen=True)
class Source:
    """One registry entry (see the key list at the top of ``sources.yaml``)."""
    name: str
    hf: str
    kind: str
    split: str = "train"
    config: Optional[str] = None
    fields: Dict[str, str] = field(default_factory=dict)   # role in the mapping -> dotted field path
    role_key: str = "role"
    content_key: str = "content"
    roles: Dict[str, str] = field(default_factory=dict)
    response_cut: Optional[str] = None
    answer_cut: Optional[str] = None
    prompt_suffix: str = ""
    transform: Optional[str] = None
    english_only: bool = False
    used_by: Dict[str, object] = field(default_factory=dict)

    def fetch_hint(self) -> str:
        config = f" (config {self.config})" if self.config else ""
        return (f"fetch it once on a connected machine with `huggingface-cli download --repo-type dataset {self.hf}`"
                f"{config} and copy the Hugging Face cache here, or pass the files with --input")


def _load_registry(path: str = SOURCES_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def known_sources(path: str = SOURCES_FILE) -> List[str]:
    return sorted(_load_registry(path)["sources"])


def mmlu_templates(path: str = SOURCES_FILE) -> List[Dict[str, str]]:
    return list(_load_registry(path)["mmlu_templates"])


def get_source(name: str, path: str = SOURCES_FILE) -> Source:
    """The registry entry ``name``; unknown names list the known ones."""
    entries = _load_registry(path)["sources"]
    if name not in entries:
        raise SourceError(f"unknown source {name!r}; known sources: {', '.join(sorted(entries))}")
    raw = dict(entries[name])
    fields = {k: raw.pop(k) for k in _FIELD_KEYS if k in raw}
    try:
        src = Source(name=name, fields=fields, **raw)
    except TypeError as exc:
        raise SourceError(f"{path}: source {name!r} has an unknown key ({exc})") from exc
    need = {"chat": ("messages",) if "messages" in fields else ("prompt", "response"),
            "preference": ("chosen", "rejected"), "prompt": ("prompt", "answer")}.get(src.kind)
    if need is None:
        raise SourceError(f"{path}: source {name!r} has kind {src.kind!r}; expected one of {KINDS}")
    if src.transform == "mmlu_rewrite":
        need = ("question", "choices", "answer")
    missing = [k for k in need if k not in fields]
    if missing:
        raise SourceError(f"{path}: source {name!r} ({src.kind}) lacks the field mapping {missing}")
    return src


def field_value(row: dict, path: str, where: str):
    """``row[a][b]...`` for the dotted ``path``; a missing field names the file, the row and the field."""
    value = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise SourceError(f"{where}: no field {path!r} (the row has {keys}); is this the right source, "
                              "or a file in another layout?")
        value = value[part]
    return value


def _builder_for(path: str) -> str:
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(ARROW_EXT):
        return "arrow"
    if low.endswith(JSONL_EXT):
        return "json"
    raise SourceError(f"unsupported input format for {path}: use JSONL(.gz), Parquet or Arrow")


def cached_files(src: Source, config: Optional[str] = None, split: Optional[str] = None) -> List[str]:
    """The data files of ``src``'s split in the local Hugging Face cache (the data set's own config
    layout, resolved by ``datasets``); raises with the fetch command when it is not there."""
    snapshot = _hf_cache_dir(src.hf)
    if snapshot is None:
        raise FileNotFoundError(f"source {src.name!r}: {src.hf} is not in the local Hugging Face cache "
                                f"(no network is used); {src.fetch_hint()}")
    config, split = config or src.config, split or src.split
    try:
        builder = datasets.load_dataset_builder(snapshot, config)
    except ValueError as exc:
        raise SourceError(f"source {src.name!r}: {src.hf} in the cache has no config {config!r} ({exc})") from exc
    files = (builder.config.data_files or {}).get(split)
    if not files:
        have = sorted(builder.config.data_files or {})
        raise SourceError(f"source {src.name!r}: {src.hf} (config {config}) has no split {split!r}; it has {have}")
    return list(files)


def count_rows(files: Sequence[str]) -> Optional[int]:
    """Rows of the files when their metadata says (Parquet), else None: for progress and ETA."""
    if not all(f.lower().endswith(PARQUET_EXT) for f in files):
        return None
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def iter_rows(files: Sequence[str], limit: Optional[int] = None) -> Iterator[Tuple[dict, str]]:
    """``(row, "file#n")`` for every row of every file, streamed through ``datasets``."""
    count = 0
    for path in files:
        builder = _builder_for(path)
        # JSON is parsed in 1 MiB blocks (datasets' default, 10 MiB, keeps ~70 MB more resident for nothing)
        options = {"chunksize": JSON_CHUNK_BYTES} if builder == "json" else {}
        stream = iter(datasets.load_dataset(builder, data_files=[path], split="train", streaming=True, **options))
        n = 0
        while limit is None or count < limit:
            try:
                row = next(stream)
            except StopIteration:
                break
            except (ValueError, datasets.exceptions.DatasetsError) as exc:  # arrow's parse errors are ValueErrors
                raise SourceError(f"{path}: cannot read it as {builder} after row {n} ({type(exc).__name__}: {exc}); "
                                  "a malformed line, or rows whose fields change type?") from exc
            n += 1
            count += 1
            yield row, f"{path}#{n}"


def source_files(src: Source, inputs: Sequence[str] = (), config: Optional[str] = None,
                 split: Optional[str] = None) -> List[str]:
    """``inputs`` expanded (files, directories, globs), or the cached files of the source's split."""
    if inputs:
        files = resolve_inputs(list(inputs))
        for f in files:
            _builder_for(f)
        return files
    return cached_files(src, config, split)

"""A task's examples from local files (JSONL, JSON or Parquet) or a local Hugging Face datasets cache.

The files keep the public datasets' field layout and sit under ``DATA_DIR/<dataset path>/<config>/``
as ``<split>.jsonl`` (what ``instella eval fetch`` writes), ``<split>.parquet`` or the Hub's shard
names (``<split>-00000-of-00001.parquet``). Without such a file the split is looked up in the local
datasets cache, offline; when neither has it the error names the file expected and the command that
fetches it once on a connected machine. Files are read with the ``datasets`` library.
"""
import glob
import os
from typing import Dict, List, Optional
from unittest import mock

import datasets

EXTENSIONS = ("jsonl", "json", "parquet")
_LOADER = {"jsonl": "json", "json": "json", "parquet": "parquet"}


class TaskDataError(FileNotFoundError):
    """A data file that is missing, unreadable or lacks a field the task reads."""


def config_dir(data_dir: str, path: str, name: Optional[str]) -> str:
    return os.path.join(data_dir, path, name) if name else os.path.join(data_dir, path)


def find_split_files(data_dir: str, path: str, name: Optional[str], split: str) -> List[str]:
    """The local files of one split (one file, or the Hub's shards of it), or [] when there are none."""
    folder = config_dir(data_dir, path, name)
    for ext in EXTENSIONS:
        exact = os.path.join(folder, f"{split}.{ext}")
        if os.path.isfile(exact):
            return [exact]
    for ext in EXTENSIONS:
        shards = sorted(glob.glob(os.path.join(glob.escape(folder), "**", f"{split}-*.{ext}"), recursive=True))
        if shards:
            return shards
    return []


def fetch_command(path: str, name: Optional[str], split: str, data_dir: str = "DATA_DIR") -> str:
    return (f"`instella eval fetch --tasks TASK --data-dir {data_dir}` on a machine with network access, or "
            f"`python -c \"import datasets; datasets.load_dataset('{path}', {name!r}, split='{split}')"
            f".to_json('{os.path.join(config_dir(data_dir, path, name), split + '.jsonl')}')\"`")


def _from_cache(path: str, name: Optional[str], split: str):
    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
        return datasets.load_dataset(path, name, split=split)


def load_split(data_dir: Optional[str], path: str, name: Optional[str], split: str) -> List[Dict]:
    """The examples of one split as a list of dicts."""
    files = find_split_files(data_dir, path, name, split) if data_dir else []
    if files:
        ext = files[0].rsplit(".", 1)[-1]
        try:
            ds = datasets.load_dataset(_LOADER[ext], data_files=files, split="train")
        except Exception as e:  # noqa: BLE001  (datasets raises many kinds; all mean an unreadable file)
            raise TaskDataError(f"cannot read {', '.join(files)} as {ext}: {type(e).__name__}: {e}") from None
        return ds.to_list()
    try:
        return _from_cache(path, name, split).to_list()
    except Exception:  # noqa: BLE001  (not cached: say where the file should be)
        pass
    expected = os.path.join(config_dir(data_dir or "DATA_DIR", path, name), f"{split}.jsonl")
    raise TaskDataError(f"no data for {path} {name or ''} split {split!r}: expected {expected} (or .parquet, or "
                        f"Hub shards {split}-*.parquet there), and it is not in the local datasets cache. "
                        f"Fetch it once with {fetch_command(path, name, split, data_dir or 'DATA_DIR')}")


def read_text(data_dir: Optional[str], relative: str) -> str:
    """A prompt file under the data directory (BBH's chain-of-thought prompts)."""
    path = os.path.join(data_dir or "DATA_DIR", relative)
    if not os.path.isfile(path):
        raise TaskDataError(f"prompt file {path} does not exist; fetch it once with `instella eval fetch "
                            f"--tasks TASK --data-dir {data_dir or 'DATA_DIR'}` on a machine with network access "
                            "(docs/evaluation.md lists the source)")
    with open(path, encoding="utf-8") as f:
        return f.read()

"""A JSONL output written atomically: records go to ``PATH.partial``, renamed onto ``PATH`` on success.

A run that fails or is killed leaves ``PATH`` as it was (absent, or the old file with ``overwrite``).
``append=True`` keeps what a previous, interrupted run left in ``PATH.partial`` (resumable producers,
such as the synthesis pipeline, continue it).
"""
from __future__ import annotations

import json
import os
from typing import Sequence


def refuse_output(path: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """The output rule of the data commands, checked before any work."""
    if os.path.realpath(path) in {os.path.realpath(i) for i in inputs}:
        raise ValueError(f"output {path} is also an input; write to another --output")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"output {path} already exists; pass --overwrite to replace it, or choose another --output")


class JsonlOutput:
    """``with JsonlOutput(path) as out: out.write(record)``; ``commit()`` publishes the file."""

    def __init__(self, path: str, append: bool = False):
        self.path, self.partial = path, path + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.append = append
        self._f = open(self.partial, "a" if append else "w", encoding="utf-8")
        self.records = 0

    def write(self, record: dict, flush: bool = False) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.records += 1
        if flush:  # a resumable producer: every record on disk before the next expensive step
            self._f.flush()
            os.fsync(self._f.fileno())

    def commit(self) -> str:
        self._f.close()
        os.replace(self.partial, self.path)
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if not self._f.closed:
            self._f.close()
            if exc_type is not None and not self.append:  # a failed one-shot run leaves nothing behind
                os.remove(self.partial)
        return False


def write_json_atomic(path: str, obj) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path

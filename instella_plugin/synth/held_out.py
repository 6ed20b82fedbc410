"""The held-out texts synthetic data is decontaminated against: evaluation tasks' test splits.

``task_texts`` reads each task's test split the way ``instella eval`` does (``evaluation.task_config``
and ``evaluation.task_data``: local files under the data directory, or the local datasets cache) and
returns one text per test document: its string fields joined (question, passage, choices...), so an
n-gram of any of them counts as overlap.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

from instella_plugin.evaluation.task_config import load_task
from instella_plugin.evaluation.task_data import load_split


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def task_texts(tasks: Iterable[str], data_dir: Optional[str]) -> List[str]:
    """One text per test document of each task (every subtask of a task with several)."""
    texts = []
    for name in tasks:
        cfg = load_task(name)
        for part in cfg.parts:
            for doc in load_split(data_dir, cfg.dataset["path"], part, cfg.test_split):
                texts.append(" ".join(_strings(doc)))
    return texts

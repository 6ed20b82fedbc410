"""``instella eval fetch``: write the local data files of tasks, once, on a machine with network access.

Each split a task reads is downloaded with ``datasets.load_dataset`` and written as
``DATA_DIR/<dataset path>/<config>/<split>.jsonl`` (the field layout of the public dataset,
unchanged); BBH's chain-of-thought prompt files come from the BIG-Bench-Hard repository. Files that
exist are kept. Evaluation itself never touches the network.
"""
import os
import urllib.request
from typing import List

import datasets

from instella_plugin.evaluation.task_config import TaskConfig
from instella_plugin.evaluation.task_data import config_dir

PROMPT_FILE_URLS = {"suzgunmirac/BIG-Bench-Hard/": "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main/"}


def planned_files(cfg: TaskConfig, data_dir: str) -> List[tuple]:
    """(kind, source, target path) of every file the task reads."""
    out = []
    for part in cfg.parts:
        splits = [cfg.test_split] + ([cfg.fewshot_split] if cfg.num_fewshot and cfg.fewshot_split else [])
        for split in dict.fromkeys(splits):
            out.append(("split", (cfg.dataset["path"], part, split),
                        os.path.join(config_dir(data_dir, cfg.dataset["path"], part), f"{split}.jsonl")))
        if cfg.num_fewshot and cfg.fewshot_file:
            rel = cfg.fewshot_file.format(subtask=part)
            out.append(("file", rel, os.path.join(data_dir, rel)))
    return out


def _url(rel: str) -> str:
    for prefix, base in PROMPT_FILE_URLS.items():
        if rel.startswith(prefix):
            parts = rel[len(prefix):]
            return base + parts
    raise ValueError(f"no known source for prompt file {rel}; place it under the data directory by hand")


def fetch(tasks: List[TaskConfig], data_dir: str, log=print) -> int:
    """Download what is missing; return the number of files written."""
    written = 0
    for cfg in tasks:
        for kind, source, target in planned_files(cfg, data_dir):
            if os.path.isfile(target):
                log(f"{cfg.name}: {target} exists, kept")
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = target + ".tmp"
            if kind == "split":
                path, name, split = source
                datasets.load_dataset(path, name, split=split).to_json(tmp, lines=True, force_ascii=False)
            else:
                with urllib.request.urlopen(_url(source), timeout=60) as r, open(tmp, "wb") as f:
                    f.write(r.read())
            os.replace(tmp, target)
            written += 1
            log(f"{cfg.name}: wrote {target}")
    return written

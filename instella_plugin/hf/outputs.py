"""Output directories written atomically: build in a sibling temp directory, then swap it into place.

``check_output(path, overwrite, inputs)`` runs before any expensive work: it refuses an output that
is or contains one of the inputs (replacing it would delete the input), a path that
already holds a model (Hugging Face files or a megatron checkpoint) unless ``overwrite`` is set, and
any other non-empty directory or a file outright. ``atomic_output(path, overwrite)`` yields the temp directory;
on success it is renamed to ``path`` (an overwritten old directory is moved aside first and deleted
last), on failure it is removed and ``path`` is left as it was.
"""
import contextlib
import json
import os
import shutil
import time

from instella_plugin.checkpoint_layout import DIST_METADATA, META, TRACKER

MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json", TRACKER, DIST_METADATA, META)


class OutputExists(FileExistsError):
    pass


def holds_model(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return any(n in MODEL_MARKERS for n in names) or any(n.startswith("iter_") for n in names)


def _within(inner: str, outer: str) -> bool:
    return os.path.commonpath([inner, outer]) == outer


def check_output(path: str, overwrite: bool, inputs=()) -> None:
    real = os.path.realpath(path)
    for src in inputs:
        src_real = os.path.realpath(src)
        if _within(src_real, real):
            how = "is" if src_real == real else "contains"
            raise OutputExists(f"output {path} {how} the input {src}; replacing it would destroy the input, so "
                               "write to another directory")
    if os.path.isfile(path):
        raise OutputExists(f"output {path} is a file; give a directory path")
    if not os.path.isdir(path) or not os.listdir(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.access(parent if os.path.isdir(parent) else os.path.dirname(parent), os.W_OK):
            raise OutputExists(f"cannot write into {parent}; choose an output in a writable directory")
        return
    if overwrite:
        return
    what = "a model" if holds_model(path) else "files"
    raise OutputExists(f"output directory {path} already holds {what}; pass --overwrite to replace it, "
                       "or choose another output path")


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool):
    check_output(path, overwrite)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{int(time.time())}"
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}-{int(time.time())}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)

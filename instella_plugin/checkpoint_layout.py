"""The on-disk layout of a checkpoint save directory: names, iteration directories, metadata, publishing.

Megatron-LM's convention, shared by the trainer, the upstream host, ``instella convert`` and
``instella merge``::

    SAVE/latest_checkpointed_iteration.txt   tracker: the last complete iteration ("release" for SAVE/release)
    SAVE/iter_0000100/                        megatron dist_checkpointing (torch_dist) directory
    SAVE/iter_0000100/metadata.json           dist_checkpointing's own index (the weights are complete)
    SAVE/iter_0000100/instella_meta.json      ``CheckpointMeta``: iteration, contents, layout, model config...

``publish`` writes ``instella_meta.json`` and then the tracker, each atomically (temp file, fsync,
``os.replace``), so a reader that follows the tracker always finds a complete iteration. Stdlib only:
no torch, no megatron; the tensors themselves are written by ``training/checkpointing.py`` and
``hf/megatron_io.py``.
"""
import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

TRACKER = "latest_checkpointed_iteration.txt"
META = "instella_meta.json"
DIST_METADATA = "metadata.json"
RELEASE = "release"
_ITER_DIR = re.compile(r"iter_(\d{7,})")


class CheckpointError(RuntimeError):
    pass


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def parse_iteration_dir(name: str) -> Optional[int]:
    """``iter_0000100`` (a name or a path) -> 100; None for anything else (``iter_N.partial`` included)."""
    match = _ITER_DIR.fullmatch(os.path.basename(os.path.normpath(name)))
    return int(match.group(1)) if match else None


def list_iterations(save_dir: str) -> List[int]:
    """The iterations of the ``iter_N`` directories in ``save_dir``, ascending (complete or not)."""
    if not os.path.isdir(save_dir):
        return []
    found = (parse_iteration_dir(n) for n in os.listdir(save_dir) if os.path.isdir(os.path.join(save_dir, n)))
    return sorted(i for i in found if i is not None)


def _tracked(save_dir: str) -> Optional[Tuple[int, str]]:
    """(iteration, directory) the tracker names, checked complete; None without a tracker."""
    tracker = os.path.join(save_dir, TRACKER)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker, encoding="utf-8").read().strip()
    try:
        it = 0 if text == RELEASE else int(text)
    except ValueError:
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number; fix or remove the tracker")
    path = iteration_dir(save_dir, it) if text != RELEASE else os.path.join(save_dir, RELEASE)
    if not os.path.isfile(os.path.join(path, DIST_METADATA)) or not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(f"{tracker} names iteration {text}, but {path} is missing or incomplete "
                              f"(no {DIST_METADATA} / {META}); point the tracker at a complete iteration")
    return it, path


def latest_iteration(save_dir: str) -> Optional[int]:
    """The iteration the tracker names (0 for "release"), None when the directory holds no checkpoint at all."""
    tracked = _tracked(save_dir)
    return None if tracked is None else tracked[0]


def resolve_checkpoint_dir(path: str) -> str:
    """An iteration directory from a save directory (via its tracker) or an iteration directory itself."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    tracked = _tracked(path)
    if tracked is None:
        raise CheckpointError(f"{path} holds no checkpoint (no {TRACKER})")
    return tracked[1]


def read_meta(path: str) -> dict:
    """The ``instella_meta.json`` of a save directory (via its tracker) or an iteration directory, as stored."""
    with open(os.path.join(resolve_checkpoint_dir(path), META), encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class CheckpointMeta:
    """What ``instella_meta.json`` records. ``extra`` holds the writer's own keys (the plugin's
    ``checkpoint_meta``: spec, rotary_base, seq_length, tokenizer, recipe, RoPE schedule; ``args``;
    ``host``; a conversion's ``converted_from``; a merge's ``merge``), stored beside the fields."""

    iteration: int
    consumed_samples: int = 0
    contents: Tuple[str, ...] = ("model",)  # of "model", "optimizer", "scheduler", "rng", "data"
    layout: Optional[Dict[str, Optional[int]]] = None  # tp, pp, vpp, dp, cp of the run that saved it
    model: Optional[Dict[str, Any]] = None  # InstellaConfig.to_dict()
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        clash = sorted(set(self.extra) & {f.name for f in dataclasses.fields(self)})
        if clash:
            raise ValueError(f"CheckpointMeta.extra repeats the fields {clash}; pass them as fields")

    def to_dict(self) -> dict:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "contents": list(self.contents), "layout": self.layout, "model": self.model, **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointMeta":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        if "contents" in known:
            known["contents"] = tuple(known["contents"])
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def weights_only(cls, model: Dict[str, Any], iteration: int, **extra) -> "CheckpointMeta":
        """A checkpoint of weights only, written outside a training run (converter, merge)."""
        return cls(iteration=iteration, contents=("model",), model=model,
                   layout={"tp": 1, "pp": 1, "vpp": None, "dp": 1, "cp": 1}, extra=extra)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # directories cannot be fsynced on every file system
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def publish(save_dir: str, meta: CheckpointMeta, *, staging: Optional[str] = None, release: bool = False) -> str:
    """Make the checkpoint of ``meta.iteration`` in ``save_dir`` the latest one; return its directory.

    Writes ``instella_meta.json`` into the iteration directory (or ``staging``, which then replaces
    the iteration directory by a rename), then the tracker, last. Rank 0 only; the tensors must be
    complete before the call. ``release``: Megatron-LM's ``SAVE/release`` instead of ``iter_N``.
    """
    final = os.path.join(save_dir, RELEASE) if release else iteration_dir(save_dir, meta.iteration)
    folder = staging or final
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot publish iteration {meta.iteration}: {folder} does not exist (write the "
                              "checkpoint's tensors first)")
    _write_atomic(os.path.join(folder, META), json.dumps(meta.to_dict(), indent=1, default=str))
    if staging is not None:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(save_dir)
    _write_atomic(os.path.join(save_dir, TRACKER), RELEASE if release else str(meta.iteration))
    return final

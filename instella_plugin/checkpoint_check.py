"""Is a checkpoint iteration readable? Name the damaged file, and the intact iterations beside it.

A megatron ``torch_dist`` iteration directory holds ``metadata.json``, ``common.pt``, the pickled
index ``.metadata`` and the ``.distcp`` shards that index points into (each stored item at an offset
and a length). torch's own reader, given a truncated shard, fails deep inside ``torch.load`` with
"failed finding central directory" and names neither the file nor the iteration. ``check_readable``
checks the structure first, without loading any tensor: the required files exist, ``.metadata``
unpickles, every shard it names exists and is long enough for its items, and the first and last item
of each shard start and end with the signatures of torch's zip serialisation (a few reads per shard,
whatever the number of items). A failure raises ``UnreadableCheckpoint``
naming the file, the iteration, the other iterations of the save directory that pass the same check,
and the flag that loads the newest of them. It reads nothing of the tensors' values: a shard damaged
in the middle of an item passes (torch stores no checksums).

This module only reads; names and which directory the tracker names are ``checkpoint_layout``'s. No torch.
"""
import os
import pickle
from typing import List, Optional

from instella_plugin.checkpoint_layout import DIST_METADATA, TRACKER, iteration_dir, list_iterations, parse_iteration_dir

REQUIRED = (DIST_METADATA, ".metadata", "common.pt")
_ZIP_HEAD, _ZIP_END, _ZIP_END_LEN = b"PK\x03\x04", b"PK\x05\x06", 22


class UnreadableCheckpoint(ValueError):
    """A checkpoint iteration with a missing, truncated or damaged file."""


def problems(it_dir: str) -> List[str]:
    """What makes ``it_dir`` unreadable, one line per damaged file ([] when it looks complete)."""
    missing = [os.path.join(it_dir, n) for n in REQUIRED if not os.path.isfile(os.path.join(it_dir, n))]
    if missing:
        return [f"{p} is missing" for p in missing]
    index = os.path.join(it_dir, ".metadata")
    try:
        with open(index, "rb") as f:
            md = pickle.load(f)
        storage, kinds = md.storage_data, md.state_dict_metadata
    except Exception as e:  # noqa: BLE001  (any unpickling failure means the same thing here)
        return [f"{index} cannot be read ({type(e).__name__}: {e})"]
    by_file = {}
    for index_key, info in storage.items():
        by_file.setdefault(info.relative_path, []).append((index_key.fqn, info.offset, info.length))
    found = []
    for rel, items in sorted(by_file.items()):
        path = os.path.join(it_dir, rel)
        if not os.path.isfile(path):
            found.append(f"shard {path} is missing ({len(items)} stored items point into it)")
            continue
        size, need = os.path.getsize(path), max(o + n for _, o, n in items)
        if size < need:
            found.append(f"shard {path} is truncated: {size:,} bytes, its index needs {need:,}")
            continue
        bad = _bad_item(path, items, kinds)
        if bad:
            found.append(f"shard {path} is damaged: stored item {bad!r} is not intact")
    return found


def _bad_item(path: str, items, kinds) -> Optional[str]:
    """The shard's first and last stored items (by offset), if their zip head or end record is missing.

    Two seeks per shard, so the check costs the same on every rank of a large job; a tensor is
    always a torch zip record, an object may be raw bytes."""
    items = sorted(items, key=lambda x: x[1])
    with open(path, "rb") as f:
        for fqn, offset, length in {items[0], items[-1]}:
            is_tensor = hasattr(kinds.get(fqn), "chunks")
            f.seek(offset)
            head = f.read(4)
            if head != _ZIP_HEAD:
                if is_tensor:
                    return fqn
                continue
            f.seek(offset + length - _ZIP_END_LEN)
            if length < _ZIP_END_LEN or f.read(4) != _ZIP_END:
                return fqn
    return None


def intact_iterations(save_dir: str, exclude: Optional[str] = None) -> List[int]:
    """Iterations of ``save_dir`` (``iter_N`` directories) that pass ``problems``, ascending."""
    out = []
    for it in list_iterations(save_dir):
        path = iteration_dir(save_dir, it)
        if not (exclude and os.path.samefile(path, exclude)) and not problems(path):
            out.append(it)
    return out


def check_readable(it_dir: str, flag: str = "--load") -> None:
    """Raise ``UnreadableCheckpoint`` when ``it_dir`` has a damaged file; ``flag`` is the option the
    caller reads checkpoints with (``--load``, ``--input``, ``--inputs``), named in the advice."""
    found = problems(it_dir)
    if found:
        raise UnreadableCheckpoint(describe(it_dir, found, flag))


def describe(it_dir: str, found: List[str], flag: str) -> str:
    it = parse_iteration_dir(it_dir)
    save_dir = os.path.dirname(os.path.abspath(os.path.normpath(it_dir)))
    what = f"checkpoint iteration {it} ({it_dir})" if it is not None else f"checkpoint {it_dir}"
    lines = [f"{what} cannot be read:"] + [f"  - {p}" for p in found]
    if it is None:
        return "\n".join(lines + ["  load another checkpoint, or save this one again"])
    intact = intact_iterations(save_dir, exclude=it_dir)
    if not intact:
        return "\n".join(lines + [f"  no other iteration in {save_dir} looks complete; save the checkpoint again"])
    newest = max(intact)
    newest_dir = iteration_dir(save_dir, newest)
    lines.append(f"  iterations in {save_dir} that look complete: {', '.join(map(str, intact))}")
    lines.append(f"  to load the newest of them: {flag} {newest_dir}")
    if flag == "--load":
        lines.append(f"  (or write {newest} into {os.path.join(save_dir, TRACKER)} to resume the run from it)")
    return "\n".join(lines)

"""Streaming safetensors: read one tensor at a time, write planned shards tensor by tensor.

Reading uses plain ``seek`` + ``readinto`` into the tensor's own memory (no mmap, so no pages of
other tensors stay resident) and checks every header against the file size first, so a truncated
or corrupt file fails before any conversion work with the file, the tensor and the sizes named.

Writing takes the full plan (name, shape, dtype in write order) up front, splits it into shards of at
most ``max_shard_bytes``, writes each shard's header when its first tensor arrives and appends
tensors as they are produced; only the tensor being written is in memory. Multi-shard output gets
``model.safetensors.index.json`` in the Hugging Face layout. The caller writes into a temporary
directory and publishes it (see ``outputs.py``).
"""
import ctypes
import json
import os
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def read_header(path: str) -> Tuple[Dict[str, dict], int]:
    """(tensor entries, data start offset) of one file, validated against the file size."""
    size = os.path.getsize(path)
    fix = "the file is truncated or corrupt: re-download or re-convert it"
    if size < 8:
        raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors header; {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header claims {n} bytes but the file has {size}; {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e}); {fix}") from e
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, e in header.items():
        if e.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {e.get('dtype')!r}")
        begin, end = e["data_offsets"]
        want = _nbytes(e["shape"], DTYPES[e["dtype"]])
        if end - begin != want:
            raise SafetensorsError(f"{path}: tensor {name} spans {end - begin} bytes but shape {e['shape']} "
                                   f"{e['dtype']} needs {want}; {fix}")
        if end > data_size:
            raise SafetensorsError(f"{path}: tensor {name} ends at byte {end} of the data section but the file "
                                   f"holds only {data_size} data bytes; {fix}")
    return header, 8 + n


class SafetensorsDir:
    """The tensors of a Hugging Face model directory (one file or an index of shards)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise SafetensorsError(f"{path} holds neither {SINGLE_NAME} nor {INDEX_NAME}: not a safetensors "
                                   "Hugging Face checkpoint")
        self.entries: Dict[str, Tuple[str, dict, int]] = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise SafetensorsError(f"{index} names shard {name}, which is missing; re-download the checkpoint")
            header, start = read_header(file)
            for t, e in header.items():
                self.entries[t] = (file, e, start)
        if weight_map is not None:
            for t, name in weight_map.items():
                if t not in self.entries or os.path.basename(self.entries[t][0]) != name:
                    raise SafetensorsError(f"{index} places {t} in {name}, which does not hold it; the index "
                                           "and the shards disagree")

    def names(self) -> List[str]:
        return list(self.entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name][1]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        file, e, start = self.entries[name]
        begin, end = e["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(file, "rb", buffering=0) as f:
            f.seek(start + begin)
            # a ctypes window on the tensor's memory (a numpy view would pin the storage's size)
            view, got = memoryview((ctypes.c_char * (end - begin)).from_address(buf.data_ptr())).cast("B"), 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise SafetensorsError(f"{file}: tensor {name} cut short at byte {got} of {end - begin}")
                got += n
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])


class ShardedWriter:
    """Write planned tensors, in plan order, into shards of at most ``max_shard_bytes``."""

    def __init__(self, out_dir: str, plan: Iterable[Tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int = 5 * 1024 ** 3, metadata: Optional[Dict[str, str]] = None):
        self.out_dir, self.metadata = out_dir, {"format": "pt", **(metadata or {})}
        self.plan = [(n, tuple(int(d) for d in s), dt) for n, s, dt in plan]
        shards: List[List[int]] = [[]]
        used = 0
        for i, (_, shape, dtype) in enumerate(self.plan):
            nb = _nbytes(shape, dtype)
            if shards[-1] and used + nb > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(i)
            used += nb
        self.shards = shards
        count = len(shards)
        self.files = [SINGLE_NAME] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors"
                                                         for k in range(count)]
        self.shard_of = {i: k for k, idx in enumerate(shards) for i in idx}
        self.next, self.handle = 0, None

    def _open_shard(self, k: int):
        header, offset = {"__metadata__": self.metadata}, 0
        for i in self.shards[k]:
            name, shape, dtype = self.plan[i]
            nb = _nbytes(shape, dtype)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nb]}
            offset += nb
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.handle = open(os.path.join(self.out_dir, self.files[k]), "wb")
        self.handle.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.plan):
            raise RuntimeError(f"tensor {name} is beyond the write plan")
        want, shape, dtype = self.plan[self.next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"write order: expected {want} {shape} {dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        k = self.shard_of[self.next]
        if self.handle is None or (self.next and self.shard_of[self.next - 1] != k):
            self.close_shard()
            self._open_shard(k)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self.handle.write(memoryview(data.numpy()))
        self.next += 1

    def close_shard(self):
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None

    def finish(self) -> List[str]:
        """Close the last shard and write the index (multi-shard); returns the file names."""
        if self.next != len(self.plan):
            raise RuntimeError(f"only {self.next} of {len(self.plan)} planned tensors were written")
        self.close_shard()
        if len(self.files) > 1:
            total = sum(_nbytes(s, d) for _, s, d in self.plan)
            weight_map = {self.plan[i][0]: self.files[k] for k, idx in enumerate(self.shards) for i in idx}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        return list(self.files)

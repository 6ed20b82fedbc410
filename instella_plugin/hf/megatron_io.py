"""Megatron distributed checkpoints (torch_dist), read and written one tensor at a time, in one process.

Reading needs no process group and not the world size that saved the checkpoint: the checkpoint's
``.metadata`` lists every tensor's global shape and saved chunks, and a one-region load plan
(torch.distributed.checkpoint's resharding helper) reads just the bytes of the region asked for.
Model tensors are those under ``embedding.``, ``decoder.``, ``output_layer.``; optimizer, RNG and
scheduler entries are ignored. Layer tensors come in megatron's layouts:

- stacked (the default of ``GPTModel.sharded_state_dict()``): ``decoder.layers.<suffix>`` with a
  leading ``[num_layers]`` axis; one layer is one region;
- per layer (``non_homogeneous_layers``): ``decoder.layers.<i>.<suffix>``;
- SwiGLU ``linear_fc1`` as one global ``[gate; up]`` tensor, or as ``weight_w`` (gate) and
  ``weight_v`` (up) under ``singleton_local_shards``.

Global tensors are TP-independent: ``linear_qkv`` is the grouped [q_g; k_g; v_g] layout, ``linear_fc1``
is [gate; up]. ``read_param`` returns a parameter's global tensor by its megatron name with a
global layer index (``decoder.layers.{i}.<suffix>``).

Writing (``write_dist_checkpoint``) streams too: a save planner resolves each chunk's data only when
the file writer asks for it, so the producer (an HF reader, a running mean) is called once per chunk.
The directory gets megatron's ``metadata.json`` and ``common.pt`` so ``dist_checkpointing.load``
and the trainer read it like their own.
"""
import io
import os
import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan,
                                                  TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
# megatron per-layer parameter suffixes, in the order their HF tensors are listed
LAYER_SUFFIXES = (
    "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
    "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight", "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
)
FIRST_GLOBALS = ("embedding.word_embeddings.weight",)
LAST_GLOBALS = ("decoder.final_layernorm.weight", "output_layer.weight")
MEGATRON_METADATA = '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, ' \
                    '"common_backend": "torch", "common_backend_version": 1}'
_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class MegatronFormatError(ValueError):
    pass


def add_scaled_(acc: torch.Tensor, x: torch.Tensor, weight: float, block_bytes: int = 16 << 20) -> None:
    """``acc += weight * x`` in acc's dtype. A mixed-dtype in-place add on CPU casts the whole input to
    acc's dtype first (a full temporary); this goes block by block, so the temporary stays small."""
    if x.dtype == acc.dtype:
        acc.add_(x, alpha=weight)
        return
    a, b = acc.reshape(-1), x.contiguous().reshape(-1)
    step = max(1, block_bytes // acc.element_size())
    for start in range(0, a.numel(), step):
        a[start:start + step].add_(b[start:start + step], alpha=weight)


class _CachedReader(FileSystemReader):
    """A reader that unpickles the checkpoint's ``.metadata`` once."""

    _md = None

    def read_metadata(self):
        if self._md is None:
            self._md = super().read_metadata()
        return self._md


def _narrow(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, int(o), int(n))
    return t


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``offset`` of an open file (one stored item)."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + pos
        return self.pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buf)[:n]) if n else 0
        self.pos += got
        return got


class _BytesPlanner(LoadPlanner):
    """Load plan for one stored object (raw bytes, not unpickled)."""

    def __init__(self, fqn: str):
        self.fqn, self.data = fqn, None

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False, **kwargs):
        self.metadata = metadata

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def resolve_tensor(self, read_item):
        raise MegatronFormatError(f"{self.fqn} is stored as a tensor, not an object")

    def commit_tensor(self, read_item, tensor):
        pass

    def create_local_plan(self):
        index = MetadataIndex(self.fqn)
        return LoadPlan([ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size((0,)),
                                  storage_index=index, storage_offsets=torch.Size((0,)), lengths=torch.Size((0,)))])

    def load_bytes(self, read_item, value):
        self.data = value.read()


def extra_state_objects(num_layers: int) -> Dict[str, bytes]:
    """The ``_extra_state`` objects of the local layer spec's linears (each ``[None]``), per stacked layer."""
    buf = io.BytesIO()
    torch.save([None], buf)
    modules = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    return {f"decoder.layers.{m}._extra_state/shard_{i}_{num_layers}": buf.getvalue()
            for m in modules for i in range(num_layers)}


class MegatronCheckpoint:
    """The model tensors of one megatron dist checkpoint directory (an ``iter_N`` directory)."""

    def __init__(self, ckpt_dir: str, num_layers: int):
        import json

        meta_json = os.path.join(ckpt_dir, "metadata.json")
        if not os.path.isfile(meta_json) or not os.path.isfile(os.path.join(ckpt_dir, ".metadata")):
            raise MegatronFormatError(f"{ckpt_dir} is not a complete megatron dist checkpoint (needs metadata.json "
                                      "and .metadata); give a save directory or an iter_N directory")
        backend = json.load(open(meta_json, encoding="utf-8")).get("sharded_backend")
        if backend != "torch_dist":
            raise MegatronFormatError(f"{ckpt_dir}: sharded backend {backend!r}; only torch_dist checkpoints are read")
        self.dir, self.num_layers = ckpt_dir, num_layers
        self.reader = _CachedReader(ckpt_dir)
        md = self.reader.read_metadata().state_dict_metadata
        self.tensors = {k: v for k, v in md.items() if k.startswith(MODEL_PREFIXES) and hasattr(v, "chunks")}
        self.objects = sorted(k for k, v in md.items() if k.startswith(MODEL_PREFIXES) and not hasattr(v, "chunks"))
        if not self.tensors:
            raise MegatronFormatError(f"{ckpt_dir} holds no model tensors (keys under {MODEL_PREFIXES})")

    # ---- physical units: what is stored -------------------------------------------------------------
    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def is_stacked(self, key: str) -> bool:
        return key.startswith("decoder.layers.") and not _PER_LAYER.match(key) and \
            len(self.shape(key)) >= 2 and self.shape(key)[0] == self.num_layers

    def units(self) -> List[Tuple[str, Optional[int]]]:
        """(key, layer index for a stacked key else None), in a stable order."""
        out = []
        for key in sorted(self.tensors):
            if self.is_stacked(key):
                out += [(key, i) for i in range(self.num_layers)]
            else:
                out.append((key, None))
        return out

    def unit_shape(self, key: str, layer: Optional[int]) -> Tuple[int, ...]:
        return self.shape(key)[1:] if layer is not None else self.shape(key)

    def _region(self, key: str, layer: Optional[int]):
        shape = self.shape(key)
        if layer is None:
            return (0,) * len(shape), shape
        return (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:]

    def pieces(self, key: str, layer: Optional[int] = None) -> Iterator[Tuple[Tuple[slice, ...], torch.Tensor]]:
        """(index into the region, stored data) for every saved chunk overlapping one region.

        Each chunk is deserialised from its own byte range of the ``.distcp`` file and yielded as is
        (narrowed, not copied), so a caller that consumes pieces in place (``read`` when one chunk
        covers the region, ``accumulate``) holds one chunk at a time.
        """
        if key not in self.tensors:
            raise KeyError(f"{self.dir} has no model tensor {key!r}")
        offsets, sizes = self._region(key, layer)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        storage = self.reader.read_metadata().storage_data
        for item in create_read_items_for_chunk_list(key, self.tensors[key], [chunk]):
            info = storage[item.storage_index]
            if getattr(info, "transform_descriptors", None):
                raise MegatronFormatError(f"{self.dir}: {key} is stored with transforms "
                                          f"{info.transform_descriptors}, which this reader does not decode")
            with open(os.path.join(self.dir, info.relative_path), "rb") as f:
                data = torch.load(_Window(f, info.offset, info.length), map_location="cpu", weights_only=True)
            data = _narrow(data, item.storage_offsets, item.lengths)
            index = tuple(slice(int(o), int(o) + int(n)) for o, n in zip(item.dest_offsets, item.lengths))
            yield index, data
            del data

    def read(self, key: str, layer: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One stored tensor (or one layer of a stacked one) as a full global tensor."""
        _, sizes = self._region(key, layer)
        dtype = dtype or self.dtype(key)
        target = None
        for index, data in self.pieces(key, layer):
            if target is None and tuple(data.shape) == tuple(sizes):  # one chunk covers the region
                target = data.to(dtype).contiguous()
                break
            if target is None:
                target = torch.empty(sizes, dtype=dtype)
            target[index].copy_(data)
        return target[0] if layer is not None else target

    def accumulate(self, acc: torch.Tensor, key: str, layer: Optional[int], weight: float) -> None:
        """``acc += weight * region`` chunk by chunk (acc has the region's shape without a layer axis)."""
        view = acc.unsqueeze(0) if layer is not None else acc
        for index, data in self.pieces(key, layer):
            target = view[index]
            if target.is_contiguous():
                add_scaled_(target, data, weight)
            else:
                target.add_(data, alpha=weight)

    def read_object(self, key: str) -> bytes:
        """A stored model object (e.g. a linear's ``_extra_state``) as its serialized bytes."""
        from torch.distributed.checkpoint import load

        planner = _BytesPlanner(key)
        load({}, storage_reader=self.reader, planner=planner, no_dist=True)
        return planner.data

    # ---- logical parameters: decoder.layers.{global i}.<suffix> ---------------------------------------
    def _locate(self, name: str) -> List[Tuple[str, Optional[int]]]:
        """Stored (key, layer) parts of a parameter, in dim-0 order (two for a split SwiGLU fc1)."""
        m = _PER_LAYER.match(name)
        if name in self.tensors:
            return [(name, None)]
        if m and name + "_w" in self.tensors:  # singleton_local_shards SwiGLU: gate (w) and up (v) apart
            return [(name + "_w", None), (name + "_v", None)]
        stacked = f"decoder.layers.{m.group(2)}" if m else None
        if stacked in self.tensors and self.is_stacked(stacked):
            return [(stacked, int(m.group(1)))]
        raise MegatronFormatError(f"{self.dir} has no tensor for {name} (looked for {name}, {name}_w/_v and "
                                  f"the stacked {stacked})")

    def read_param(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        parts = [self.read(k, layer, dtype=dtype) for k, layer in self._locate(name)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def accumulate_param(self, acc: torch.Tensor, name: str, weight: float) -> None:
        """``acc += weight * parameter`` without materialising the parameter (one stored chunk at a time)."""
        at = 0
        for key, layer in self._locate(name):
            n = self.unit_shape(key, layer)[0]
            self.accumulate(acc[at:at + n], key, layer, weight)
            at += n

    def param_shape(self, name: str) -> Tuple[int, ...]:
        m = _PER_LAYER.match(name)
        if not m or name in self.tensors:
            if name not in self.tensors:
                raise MegatronFormatError(f"{self.dir} has no tensor {name}")
            return self.shape(name)
        if name + "_w" in self.tensors:
            w = self.shape(name + "_w")
            return (2 * w[0],) + w[1:]
        stacked = f"decoder.layers.{m.group(2)}"
        if stacked in self.tensors and self.is_stacked(stacked):
            return self.shape(stacked)[1:]
        raise MegatronFormatError(f"{self.dir} has no tensor for {name}")


def param_names(num_layers: int) -> List[str]:
    """Megatron parameter names with global layer indices, in HF tensor order."""
    names = list(FIRST_GLOBALS)
    for i in range(num_layers):
        names += [f"decoder.layers.{i}.{s}" for s in LAYER_SUFFIXES]
    return names + list(LAST_GLOBALS)


def stacked_layout(cfg) -> Dict[str, Tuple[int, ...]]:
    """Key -> global shape of the trainer's layout (``GPTModel.sharded_state_dict()`` defaults)."""
    h, f, v, kv = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size, cfg.kv_width
    L = cfg.num_layers
    per_layer = {
        "input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (h + 2 * kv, h),
        "self_attention.linear_proj.weight": (h, h), "self_attention.q_layernorm.weight": (h,),
        "self_attention.k_layernorm.weight": (kv,), "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f),
    }
    out = {"embedding.word_embeddings.weight": (v, h), "decoder.final_layernorm.weight": (h,),
           "output_layer.weight": (v, h)}
    out.update({f"decoder.layers.{s}": (L,) + shape for s, shape in per_layer.items()})
    return out


# ---- writing --------------------------------------------------------------------------------------
class _LazySavePlanner(DefaultSavePlanner):
    """Save plan from (key, global shape, dtype, chunk offsets, chunk sizes); data resolved on demand."""

    def __init__(self, chunks, produce: Callable[[str, Tuple[int, ...]], torch.Tensor],
                 objects: Dict[str, bytes]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks, self.produce, self.objects = chunks, produce, objects

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.state_dict, self.is_coordinator, self.mappings = {}, is_coordinator, {}

    def create_local_plan(self):
        items = []
        for key, size, dtype, offsets, sizes in self.chunks:
            items.append(WriteItem(
                index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                            properties=TensorProperties(dtype=dtype), size=torch.Size(size))))
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self.objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.objects[write_item.index.fqn])
        return self.produce(write_item.index.fqn, tuple(write_item.index.offset))


def write_dist_checkpoint(out_dir: str, layout: Dict[str, Tuple[int, ...]], dtypes: Dict[str, torch.dtype],
                          stacked: Sequence[str], produce: Callable[[str, Optional[int]], torch.Tensor],
                          common: Optional[dict] = None, objects: Optional[Dict[str, bytes]] = None,
                          borrowed: Sequence[str] = ()) -> None:
    """Write a megatron torch_dist checkpoint into the (empty) ``out_dir``.

    ``layout`` maps keys to global shapes; keys in ``stacked`` are written one chunk per layer
    (``produce(key, i)`` returns layer i, without the layer axis), others whole (``produce(key, None)``).
    ``objects`` are stored model objects (key -> serialized bytes), e.g. ``extra_state_objects``.
    Each produced tensor must be fresh memory (its storage is released once written) unless its key is
    listed in ``borrowed``.
    """
    from torch.distributed.checkpoint import save

    chunks = []
    for key, size in layout.items():
        if key in stacked:
            chunks += [(key, size, dtypes[key], (i,) + (0,) * (len(size) - 1), (1,) + tuple(size[1:]))
                       for i in range(size[0])]
        else:
            chunks.append((key, size, dtypes[key], (0,) * len(size), tuple(size)))

    last = []

    def resolve(key, offsets):
        # torch's serial writer keeps a reference to the previous chunk while it asks for the next one;
        # that chunk is on disk by now and was made here, so its memory is released before producing
        if last:
            try:
                last.pop().untyped_storage().resize_(0)
            except RuntimeError:  # storage not resizable (e.g. shared with numpy): freed when dropped
                pass
        layer = offsets[0] if key in stacked else None
        t = produce(key, layer).to(dtypes[key]).contiguous()
        if key not in borrowed:
            last.append(t)
        return t.unsqueeze(0) if layer is not None else t

    writer = FileSystemWriter(out_dir, single_file_per_rank=True, sync_files=True, thread_count=1,
                              per_thread_copy_ahead=0)
    save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, resolve, objects or {}), no_dist=True)
    torch.save(common or {}, os.path.join(out_dir, "common.pt"))
    with open(os.path.join(out_dir, "metadata.json"), "w", encoding="utf-8") as f:
        f.write(MEGATRON_METADATA)

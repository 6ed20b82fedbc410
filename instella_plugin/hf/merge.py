"""Weight ensembling of N checkpoints, one tensor at a time, by any method of ``merge_methods``.

Inputs are all Megatron checkpoints (save or iter_N directories, any TP/PP layout) or all Hugging Face
directories of one format; task-vector methods (TIES, DARE) also take a base checkpoint of the same
kind. Before any tensor is read the specification is checked (``merge_config``) and the inputs and
the base must agree: the same architecture (the first differing configuration field is named: layers,
hidden size, vocabulary...), the same tensor names (every missing and extra name is listed, per input)
and shapes (the first mismatching tensor is named). Every method accumulates in fp32 whatever the
storage dtype; the uniform mean is ``(x_1 + ... + x_N) / N`` in fp32 (``acc += w_i * x_i``, then
``acc / sum(w)``), cast once to the output dtype.

The output is written atomically with a record of its inputs, method and parameters
(``instella_merge.json``, and under ``merge`` in a Megatron output's ``instella_meta.json``). A merged
Megatron checkpoint holds weights only, in the trainer's layout: no optimizer, RNG or scheduler state
(``contents: ["model"]``). Greedy soup, which needs an evaluation, is ``merge_soup.greedy_soup``.
"""
import datetime
import math
import os
import shutil
import time
from typing import Callable, List, Optional, Sequence

import torch

from instella_plugin.checkpoint_layout import iteration_dir, publish
from instella_plugin.hf import formats
from instella_plugin.hf.convert import DTYPES, open_megatron, weights_only_meta
from instella_plugin.hf.formats import CheckpointMismatch
from instella_plugin.hf.megatron_io import stacked_layout, write_dist_checkpoint
from instella_plugin.hf.merge_config import MergeConfigError, MergeSpec
from instella_plugin.hf.merge_methods import merge_tensor
from instella_plugin.hf.outputs import atomic_output, check_output, write_json
from instella_plugin.hf.safetensors_io import ShardedWriter

RECORD = "instella_merge.json"
ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "padded_vocab_size", "norm_epsilon", "rotary_base")


def normalise_weights(weights: Optional[Sequence[float]], n: int) -> List[float]:
    if n < 2:
        raise ValueError(f"merging needs at least two checkpoints, got {n}")
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} checkpoints; give one weight per input")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights {list(weights)} must be finite, non-negative and not all zero")
    return [float(w) for w in weights]


def check_architectures(configs, paths) -> None:
    ref = configs[0]
    for cfg, path in zip(configs[1:], paths[1:]):
        for f in ARCH_FIELDS:
            if getattr(cfg, f) != getattr(ref, f):
                raise CheckpointMismatch(f"{path} has a different architecture from {paths[0]}: {f} = "
                                         f"{getattr(cfg, f)} vs {getattr(ref, f)}; only checkpoints of one model "
                                         "can be merged")


def check_tensors(names_shapes, paths) -> None:
    """names_shapes: per input, an ordered dict name -> shape."""
    ref = names_shapes[0]
    problems = []
    for ns, path in zip(names_shapes[1:], paths[1:]):
        missing = [n for n in ref if n not in ns]
        extra = [n for n in ns if n not in ref]
        if missing:
            problems.append(f"{path} lacks {missing}")
        if extra:
            problems.append(f"{path} has extra {extra}")
        bad = next((n for n in ref if n in ns and tuple(ns[n]) != tuple(ref[n])), None)
        if bad is not None:
            problems.insert(0, f"first mismatching tensor: {bad} is {tuple(ns[bad])} in {path} but "
                               f"{tuple(ref[bad])} in {paths[0]}")
    if problems:
        raise CheckpointMismatch("the checkpoints do not hold the same tensors (compared with " + paths[0] +
                                 "):\n  - " + "\n  - ".join(problems))


def _labels(spec: MergeSpec) -> List[str]:
    return list(spec.inputs) + ([f"base {spec.base}"] if spec.base else [])


def _record(spec: MergeSpec, dtype, kind, extra=None) -> dict:
    weights = spec.resolved_weights()
    out = {"inputs": [os.path.abspath(p) for p in spec.inputs], "weights": weights}
    if all(not isinstance(w, list) for w in weights):
        out["normalised_weights"] = [w / sum(weights) for w in weights]
    out.update({"kind": kind, "dtype": str(dtype), "accumulation": "float32",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(), **spec.record(), **(extra or {})})
    if spec.base:
        out["base"] = os.path.abspath(spec.base)
    return out


class Progress:
    """Prints ``merged k/N tensors (MB), MB/s, ETA`` at most every ``every`` seconds (big merges take minutes)."""

    def __init__(self, total_bytes: int, count: int, log: Optional[Callable[[str], None]], every: float = 10.0):
        self.total, self.count, self.log, self.every = total_bytes, count, log, every
        self.done_bytes = self.done = 0
        self.start = self.last = time.time()

    def tick(self, t: torch.Tensor) -> None:
        self.done += 1
        self.done_bytes += t.numel() * t.element_size()
        now = time.time()
        if self.log and (now - self.last >= self.every or self.done == self.count):
            self.last = now
            rate = self.done_bytes / max(now - self.start, 1e-9)
            eta = (self.total - self.done_bytes) / max(rate, 1e-9)
            self.log(f"merged {self.done}/{self.count} tensors ({self.done_bytes / 2**20:.0f}/{self.total / 2**20:.0f} "
                     f"MB), {rate / 2**20:.0f} MB/s, ETA {eta:.0f}s")


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if dtype == torch.float32 else t.to(dtype)


def merge_hf(spec: MergeSpec, out, dtype=None, overwrite=False, max_shard_bytes=5 * 1024 ** 3,
             record_extra=None, log=None) -> str:
    paths = list(spec.inputs) + ([spec.base] if spec.base else [])
    cks = [formats.HFCheckpoint(p) for p in paths]  # each checked against its own config.json
    fmts = {c.format for c in cks}
    if len(fmts) > 1:
        raise CheckpointMismatch(f"the inputs mix Hugging Face formats {sorted(fmts)}; convert them to one format")
    labels = _labels(spec)
    check_architectures([c.cfg for c in cks], labels)
    check_tensors([{n: c.files.shape(n) for n in c.files.names()} for c in cks], labels)
    ref, num_layers = cks[0].files, cks[0].cfg.num_layers
    base = cks[spec.n] if spec.base else None
    plan = [(n, ref.shape(n), dtype or ref.dtype(n)) for n in ref.names()]
    progress = Progress(sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, s, d in plan), len(plan), log)
    with atomic_output(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes)
        for name, _, dt in plan:
            merged = merge_tensor(spec.plan(name, num_layers), name, lambda i: cks[i].files.get(name),
                                  (lambda: base.files.get(name)) if base else None)
            merged = _cast(merged, dt)
            progress.tick(merged)
            writer.write(name, merged)
            del merged
        writer.finish()
        for f in os.listdir(paths[0]):  # config, tokenizer and generation files of the first input
            src = os.path.join(paths[0], f)
            if os.path.isfile(src) and not f.endswith(".safetensors") and f not in (
                    "model.safetensors.index.json", RECORD):
                shutil.copyfile(src, os.path.join(tmp, f))
        write_json(os.path.join(tmp, RECORD), _record(spec, dtype or ref.dtype(plan[0][0]), "hf",
                                                      {"format": cks[0].format, **(record_extra or {})}))
    return out


def merge_megatron(spec: MergeSpec, out, dtype=None, overwrite=False, record_extra=None, log=None) -> str:
    paths = list(spec.inputs) + ([spec.base] if spec.base else [])
    flags = ["--inputs"] * spec.n + (["--base"] if spec.base else [])
    opened = [open_megatron(p, flag=f) for p, f in zip(paths, flags)]  # each checked against its own configuration
    cfgs = [o[2] for o in opened]
    check_architectures(cfgs, _labels(spec))
    cks = [o[3] for o in opened]
    metas = [o[1] for o in opened][:spec.n]
    check_rope_methods([o[1] for o in opened], _labels(spec))
    base = cks[spec.n] if spec.base else None
    cfg = cfgs[0]
    dtype = dtype or cks[0].dtype("embedding.word_embeddings.weight")
    layout = stacked_layout(cfg)
    stacked = [k for k in layout if k.startswith("decoder.layers.")]
    progress = Progress(sum(math.prod(s) for s in layout.values()) * torch.empty((), dtype=dtype).element_size(),
                        sum(s[0] if k in stacked else 1 for k, s in layout.items()), log)

    def produce(key, layer):
        t = _produce(key, layer)
        progress.tick(t)
        return t

    def _produce(key, layer):
        name = key if layer is None else f"decoder.layers.{layer}.{key[len('decoder.layers.'):]}"
        tp = spec.plan(name, cfg.num_layers)
        if tp.method != "linear":
            return _cast(merge_tensor(tp, name, lambda i: cks[i].read_param(name),
                                      (lambda: base.read_param(name)) if base else None), dtype)
        acc = torch.zeros(cks[0].param_shape(name), dtype=torch.float32)
        for ck, w in zip(cks, tp.weights):
            if w != 0:
                ck.accumulate_param(acc, name, w)  # chunk by chunk: no copy of the input tensor
        acc.div_(sum(tp.weights))
        return _cast(acc, dtype)

    iterations = {m.get("iteration") for m in metas}
    iteration = iterations.pop() if len(iterations) == 1 and None not in iterations else 0
    record = _record(spec, dtype, "megatron", {"iterations": [m.get("iteration") for m in metas],
                                                  **(record_extra or {})})
    with atomic_output(out, overwrite) as tmp:
        it_dir = iteration_dir(tmp, iteration)
        os.makedirs(it_dir)
        write_dist_checkpoint(it_dir, layout, {k: dtype for k in layout}, stacked, produce,
                              common={"iteration": iteration, "consumed_samples": 0},
                              objects={k: cks[0].read_object(k) for k in cks[0].objects})
        inherited = {k: metas[0][k] for k in ("spec", "tokenizer", "rope_scaling") if k in metas[0]}
        meta = weights_only_meta(cfg, iteration, rope=float(metas[0].get("rotary_base", cfg.rotary_base)),
                                 seq_length=int(metas[0].get("seq_length", cfg.seq_length)), merge=record, **inherited)
        write_json(os.path.join(tmp, RECORD), record)
        publish(tmp, meta)
    return out


def check_rope_methods(metas, paths) -> None:
    """Checkpoints extended with different RoPE methods (``rope_scaling`` in their metadata) are different
    models at long context: refused, like a different architecture."""
    ref = metas[0].get("rope_scaling")
    for meta, path in zip(metas[1:], paths[1:]):
        if meta.get("rope_scaling") != ref:
            raise CheckpointMismatch(f"{path} was trained with RoPE scaling {meta.get('rope_scaling')!r} and {paths[0]} "
                                     f"with {ref!r}; only checkpoints of one RoPE method can be merged")


def checkpoint_kind(paths: Sequence[str], labels: Optional[Sequence[str]] = None) -> str:
    """"hf" or "megatron" for directories that must all be of one kind (refused otherwise)."""
    for p, label in zip(paths, labels or paths):
        if not os.path.isdir(p):
            raise FileNotFoundError(f"input {label} is not a directory")
    kinds = {"hf" if os.path.isfile(os.path.join(p, "config.json")) else "megatron" for p in paths}
    if len(kinds) > 1:
        raise CheckpointMismatch("the inputs mix Hugging Face and Megatron checkpoints; convert them to one kind "
                                 "first (instella convert)")
    return kinds.pop()


def merge(paths: Sequence[str], out: str, weights: Optional[Sequence[float]] = None,
          dtype: Optional[torch.dtype] = None, overwrite: bool = False, *, spec: Optional[MergeSpec] = None,
          record_extra: Optional[dict] = None, log: Optional[Callable[[str], None]] = None, **kwargs) -> str:
    """Merge ``paths`` into ``out``: the (weighted) mean, or the method of ``spec`` (whose inputs win)."""
    if spec is None:
        weights = normalise_weights(weights, len(paths))
        spec = MergeSpec("weighted" if len(set(weights)) > 1 else "uniform", list(paths), weights=weights).check()
    if spec.method == "greedy-soup":
        raise MergeConfigError("greedy soup evaluates its candidates: use instella merge --method greedy-soup "
                               "--heldout DATA (merge_soup.greedy_soup)")
    all_paths = list(spec.inputs) + ([spec.base] if spec.base else [])
    if spec.base and os.path.realpath(spec.base) in {os.path.realpath(p) for p in spec.inputs}:
        raise MergeConfigError(f"the base {spec.base} is also an input; the task vector of the base is zero")
    kind = checkpoint_kind(all_paths, _labels(spec))
    check_output(out, overwrite, inputs=all_paths)
    dtype = dtype or (DTYPES[spec.dtype] if spec.dtype else None)
    if kind == "hf":
        return merge_hf(spec, out, dtype, overwrite, record_extra=record_extra, log=log, **kwargs)
    return merge_megatron(spec, out, dtype, overwrite, record_extra=record_extra, log=log)

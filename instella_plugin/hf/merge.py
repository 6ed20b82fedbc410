"""Weight ensembling: the element-wise (weighted) mean of N checkpoints, one tensor at a time.

Inputs are all Megatron checkpoints (save or iter_N directories) or all Hugging Face directories of
one format. Before anything is written the inputs must agree: the same architecture (the first
differing configuration field is named), the same tensor names (every missing and extra name is
listed, per input) and shapes (the first mismatching tensor is named). The mean is accumulated in
fp32 whatever the storage dtype (``acc += w_i * x_i``, then ``acc / sum(w)``; uniform weights are
all 1, so the result is ``(x_1 + ... + x_N) / N`` in fp32) and cast once to the output dtype.

The output is written atomically with a record of its inputs and weights (``instella_merge.json``,
and under ``merge`` in a Megatron output's ``instella_meta.json``). A merged Megatron checkpoint holds
weights only: no optimizer, RNG or scheduler state (``contents: ["model"]``).
"""
import datetime
import math
import os
import shutil
from typing import Callable, List, Optional, Sequence

import torch

from instella_plugin.checkpoint_layout import iteration_dir, publish
from instella_plugin.hf import formats
from instella_plugin.hf.convert import open_megatron, weights_only_meta
from instella_plugin.hf.formats import CheckpointMismatch
from instella_plugin.hf.megatron_io import add_scaled_, stacked_layout, write_dist_checkpoint
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


def mean_tensor(read: Callable[[int], torch.Tensor], weights: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """sum_i w_i * read(i) in fp32, divided by sum(w), cast once to ``dtype``; one input in memory at a time."""
    acc = None
    for i, w in enumerate(weights):
        x = read(i)
        if not x.is_floating_point():
            raise CheckpointMismatch("a non-floating-point tensor cannot be averaged")
        if acc is None:
            acc = x.to(torch.float32, copy=True)
            if w != 1.0:
                acc.mul_(w)
        else:
            add_scaled_(acc, x, w)
        del x
    acc.div_(sum(weights))
    return acc if dtype == torch.float32 else acc.to(dtype)


def _record(paths, weights, dtype, kind, extra=None) -> dict:
    total = sum(weights)
    return {"inputs": [os.path.abspath(p) for p in paths], "weights": list(weights),
            "normalised_weights": [w / total for w in weights], "kind": kind, "dtype": str(dtype),
            "accumulation": "float32", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            **(extra or {})}


def merge_hf(paths, out, weights, dtype=None, overwrite=False, max_shard_bytes=5 * 1024 ** 3) -> str:
    cks = [formats.HFCheckpoint(p) for p in paths]  # each checked against its own config.json
    fmts = {c.format for c in cks}
    if len(fmts) > 1:
        raise CheckpointMismatch(f"the inputs mix Hugging Face formats {sorted(fmts)}; convert them to one format")
    check_architectures([c.cfg for c in cks], paths)
    check_tensors([{n: c.files.shape(n) for n in c.files.names()} for c in cks], paths)
    ref = cks[0].files
    plan = [(n, ref.shape(n), dtype or ref.dtype(n)) for n in ref.names()]
    with atomic_output(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes)
        for name, _, dt in plan:
            writer.write(name, mean_tensor(lambda i: cks[i].files.get(name), weights, dt))
        writer.finish()
        for f in os.listdir(paths[0]):  # config, tokenizer and generation files of the first input
            src = os.path.join(paths[0], f)
            if os.path.isfile(src) and not f.endswith(".safetensors") and f not in (
                    "model.safetensors.index.json", RECORD):
                shutil.copyfile(src, os.path.join(tmp, f))
        write_json(os.path.join(tmp, RECORD), _record(paths, weights, dtype or ref.dtype(plan[0][0]), "hf",
                                                      {"format": cks[0].format}))
    return out


def merge_megatron(paths, out, weights, dtype=None, overwrite=False) -> str:
    opened = [open_megatron(p, flag="--inputs") for p in paths]  # each checked against its own stored configuration
    cfgs = [o[2] for o in opened]
    check_architectures(cfgs, paths)
    cks = [o[3] for o in opened]
    metas = [o[1] for o in opened]
    cfg = cfgs[0]
    dtype = dtype or cks[0].dtype("embedding.word_embeddings.weight")
    layout = stacked_layout(cfg)
    stacked = [k for k in layout if k.startswith("decoder.layers.")]

    def produce(key, layer):
        name = key if layer is None else f"decoder.layers.{layer}.{key[len('decoder.layers.'):]}"
        acc = torch.zeros(cks[0].param_shape(name), dtype=torch.float32)
        for ck, w in zip(cks, weights):
            ck.accumulate_param(acc, name, w)  # chunk by chunk: no copy of the input tensor
        acc.div_(sum(weights))
        return acc if dtype == torch.float32 else acc.to(dtype)

    iterations = {m.get("iteration") for m in metas}
    iteration = iterations.pop() if len(iterations) == 1 and None not in iterations else 0
    record = _record(paths, weights, dtype, "megatron", {"iterations": [m.get("iteration") for m in metas]})
    with atomic_output(out, overwrite) as tmp:
        it_dir = iteration_dir(tmp, iteration)
        os.makedirs(it_dir)
        write_dist_checkpoint(it_dir, layout, {k: dtype for k in layout}, stacked, produce,
                              common={"iteration": iteration, "consumed_samples": 0},
                              objects={k: cks[0].read_object(k) for k in cks[0].objects})
        inherited = {k: metas[0][k] for k in ("spec", "tokenizer") if k in metas[0]}
        meta = weights_only_meta(cfg, iteration, rope=float(metas[0].get("rotary_base", cfg.rotary_base)),
                                 seq_length=int(metas[0].get("seq_length", cfg.seq_length)), merge=record, **inherited)
        write_json(os.path.join(tmp, RECORD), record)
        publish(tmp, meta)
    return out


def merge(paths: Sequence[str], out: str, weights: Optional[Sequence[float]] = None,
          dtype: Optional[torch.dtype] = None, overwrite: bool = False, **kwargs) -> str:
    paths = list(paths)
    weights = normalise_weights(weights, len(paths))
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"input {p} is not a directory")
    kinds = {"hf" if os.path.isfile(os.path.join(p, "config.json")) else "megatron" for p in paths}
    if len(kinds) > 1:
        raise CheckpointMismatch("the inputs mix Hugging Face and Megatron checkpoints; convert them to one kind "
                                 "first (instella convert)")
    check_output(out, overwrite, inputs=paths)
    if kinds == {"hf"}:
        return merge_hf(paths, out, weights, dtype, overwrite, **kwargs)
    return merge_megatron(paths, out, weights, dtype, overwrite)

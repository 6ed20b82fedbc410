"""Megatron dist checkpoint <-> Hugging Face directory, one tensor in memory at a time.

``megatron_to_hf``: the model configuration, RoPE theta, RoPE method (``--rope-scaling``, written as
``rope_parameters``: ``rope_parameters.py``) and context length come from the checkpoint's
``instella_meta.json`` (or ``config`` for a checkpoint without one); every stored shape is checked
against it before the output is created; tensors are read region by region (any TP/PP/VPP layout,
no process group) and written to sharded safetensors in ``instella`` or ``olmoe`` format.

``hf_to_megatron``: an HF directory (either format) becomes a weights-only save directory
(``iter_0000000`` + tracker) in the trainer's layout, which ``--load`` reads at any TP/PP size; a RoPE
method in config.json is recorded in its metadata as the trainer records ``--rope-scaling``.

Both write into a temp directory that replaces ``out`` only when complete (``outputs.atomic_output``).
"""
import datetime
import json
import os
from typing import Callable, Optional

import torch

from instella_plugin.checkpoint_check import check_readable
from instella_plugin.checkpoint_layout import (DIST_METADATA, META, CheckpointError, CheckpointMeta, iteration_dir,
                                               publish, read_meta, resolve_checkpoint_dir)
from instella_plugin.hf import formats
from instella_plugin.hf.formats import CheckpointMismatch
from instella_plugin.hf.megatron_io import (MegatronCheckpoint, extra_state_objects, param_names, stacked_layout,
                                            write_dist_checkpoint)
from instella_plugin.hf.outputs import atomic_output, check_output, write_json
from instella_plugin.hf.safetensors_io import ShardedWriter
from instella_plugin.hf.tokenizer_files import tokenizer_source, write_tokenizer_files
from instella_plugin.model.config import InstellaConfig, get_preset
from instella_plugin.model.weight_map import hf_from_megatron_shards, megatron_param_from_hf
from instella_plugin.rope.methods import RopeScaling

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
RECORD = "instella_conversion.json"


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def load_config_override(spec: Optional[str]) -> Optional[InstellaConfig]:
    """--config: a preset name or a JSON file holding ``InstellaConfig.to_dict()``."""
    if spec is None:
        return None
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            data = json.load(f)
        return InstellaConfig.from_dict(data.get("model", data))
    return get_preset(spec)


def open_megatron(path: str, config: Optional[InstellaConfig] = None, flag: str = "--input"):
    """(iteration dir, stored meta dict, plugin config, reader) for a save directory or an iter_N directory.

    An iteration with a missing or truncated file is refused naming the file and the intact
    iterations beside it (``flag``: the option that would load one of them)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, DIST_METADATA)):
        ckpt_dir = path
    else:
        try:
            ckpt_dir = resolve_checkpoint_dir(path)
        except CheckpointError as e:
            raise CheckpointMismatch(str(e)) from e
    check_readable(ckpt_dir, flag)
    meta = read_meta(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, META)) else {}
    if config is None:
        if not meta.get("model"):
            raise CheckpointMismatch(f"{ckpt_dir} has no {META} with the model configuration; pass --config "
                                     "PRESET_OR_JSON to say which model it holds")
        config = InstellaConfig.from_dict(meta["model"])
    ckpt = MegatronCheckpoint(ckpt_dir, config.num_layers)
    check_megatron_shapes(ckpt, config)
    return ckpt_dir, meta, config, ckpt


def check_megatron_shapes(ckpt: MegatronCheckpoint, cfg: InstellaConfig) -> None:
    """Every parameter of ``cfg`` stored with its shape and no unknown model tensor; all problems at once."""
    layout = stacked_layout(cfg)
    expected = {}
    for name in param_names(cfg.num_layers):
        key = name if not name.startswith("decoder.layers.") else "decoder.layers." + name.split(".", 3)[3]
        expected[name] = layout[key][1:] if key.startswith("decoder.layers.") else layout[key]
    missing, first_bad = [], None
    for name, shape in expected.items():
        try:
            got = ckpt.param_shape(name)
        except ValueError:
            missing.append(name)
            continue
        if first_bad is None and tuple(got) != tuple(shape):
            first_bad = f"first mismatching tensor: {name} has shape {tuple(got)}, the configuration needs {tuple(shape)}"
    known = set(layout) | set(expected) | {n + s for n in expected for s in ("_w", "_v")}
    extra = sorted(k for k in ckpt.tensors if k not in known)
    problems = [p for p in (first_bad, missing and f"missing tensors {missing}",
                            extra and f"tensors with no Instella counterpart {extra}") if p]
    if problems:
        raise CheckpointMismatch(
            f"{ckpt.dir}: the weights do not match the model configuration ({cfg.preset}: {cfg.num_layers} layers, "
            f"hidden {cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, vocab {cfg.padded_vocab_size}):\n  - "
            + "\n  - ".join(problems) + "\n  use the configuration the checkpoint was trained with (--config)")


def megatron_to_hf(src: str, out: str, *, fmt: str = "instella", dtype: Optional[torch.dtype] = None,
                   overwrite: bool = False, config: Optional[InstellaConfig] = None, tokenizer: Optional[str] = None,
                   max_shard_bytes: int = 5 * 1024 ** 3, log: Callable[[str], None] = lambda s: None) -> str:
    if fmt not in formats.FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose from {', '.join(formats.FORMATS)}")
    check_output(out, overwrite, inputs=[src])
    ckpt_dir, meta, cfg, ckpt = open_megatron(src, config)
    tokenizer = tokenizer or (meta.get("tokenizer") if meta.get("tokenizer") not in (None, "instella") else None)
    tokenizer_source(tokenizer)  # fail now, not after the weights
    dtype = dtype or ckpt.dtype("embedding.word_embeddings.weight")
    rope = float(meta.get("rotary_base", cfg.rotary_base))
    max_positions = int(meta.get("seq_length", cfg.seq_length))
    try:  # the --rope-scaling the weights were trained with
        rope_scaling = RopeScaling.from_meta(meta.get("rope_scaling"))
    except TypeError as e:
        raise CheckpointMismatch(f"{ckpt_dir}: {META} rope_scaling {meta.get('rope_scaling')!r} is not a RoPE "
                                 f"method record ({e}); fix or remove it") from e
    with atomic_output(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, formats.export_plan(cfg, fmt, dtype), max_shard_bytes)
        for name in param_names(cfg.num_layers):
            layer = int(name.split(".")[2]) + 1 if name.startswith("decoder.layers.") else 0
            for hf_name, t in hf_from_megatron_shards(name, layer, [ckpt.read_param(name)], cfg).items():
                writer.write(formats.file_name(hf_name, fmt), t.to(dtype))
                if fmt == "olmoe" and hf_name.endswith("mlp.down_proj.weight"):
                    writer.write(hf_name.rsplit(".", 3)[0] + "." + formats.ROUTER,
                                 torch.zeros(1, cfg.hidden_size, dtype=dtype))
            log(f"  {name}")
        files = writer.finish()
        write_json(os.path.join(tmp, "config.json"),
                   formats.config_json(cfg, fmt, rope_theta=rope, max_positions=max_positions, dtype=dtype,
                                      rope_scaling=rope_scaling))
        write_tokenizer_files(tmp, tokenizer, max_positions)
        write_json(os.path.join(tmp, RECORD), {
            "source": os.path.abspath(ckpt_dir), "iteration": meta.get("iteration"), "format": fmt,
            "dtype": str(dtype), "model": cfg.to_dict(), "files": files,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    return out


def weights_only_meta(cfg: InstellaConfig, iteration: int, *, rope: float, seq_length: int, **extra) -> CheckpointMeta:
    """The record of a weights-only checkpoint written outside training (converted or merged)."""
    return CheckpointMeta.weights_only(cfg.to_dict(), iteration, **{
        "spec": "instella", "rotary_base": rope, "seq_length": seq_length, "tokenizer": "instella", "args": {},
        **extra})


def hf_to_megatron(src: str, out: str, *, dtype: Optional[torch.dtype] = None, overwrite: bool = False,
                   config: Optional[InstellaConfig] = None, iteration: int = 0) -> str:
    check_output(out, overwrite, inputs=[src])
    hf = formats.HFCheckpoint(src, config)
    cfg = hf.cfg
    dtype = dtype or hf.dtype()
    layout = stacked_layout(cfg)
    stacked = [k for k in layout if k.startswith("decoder.layers.")]

    def produce(key, layer):
        name = key if layer is None else f"decoder.layers.{layer}.{key[len('decoder.layers.'):]}"
        return megatron_param_from_hf(name, (layer or 0) + 1, hf.get, cfg, 0, 1)

    with atomic_output(out, overwrite) as tmp:
        it_dir = iteration_dir(tmp, iteration)
        os.makedirs(it_dir)
        write_dist_checkpoint(it_dir, layout, {k: dtype for k in layout}, stacked, produce,
                              common={"iteration": iteration, "consumed_samples": 0},
                              objects=extra_state_objects(cfg.num_layers))
        scaling = {"rope_scaling": hf.rope_scaling.to_meta()} if hf.rope_scaling.scales else {}
        publish(tmp, weights_only_meta(
            cfg, iteration, rope=cfg.rotary_base, seq_length=cfg.seq_length, **scaling,
            converted_from={"path": os.path.abspath(src), "format": hf.format, "dtype": str(dtype)}))
    return out

"""The run configuration: parsed once at the edge, frozen, read by every later layer and written by none.

``build_run_config`` turns the parsed command line into a ``RunConfig`` in one pass:
flags -> the plugin's recipe values (for flags not given explicitly) -> the model config -> the data
plan (resolved blend) -> values derived from the data (``train_iters: epoch``) -> the schedule and
batch arithmetic -> the parallel layout -> checks. A plugin contributes through return values only.

``RunConfig.flags`` holds every flag's *resolved* value under Megatron-LM's names (what the run
really uses: recipe defaults applied, the model's shape, the derived iteration counts); ``model``,
``layout`` and ``data`` are the typed views the trainer builds from.
"""
import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch

from instella_plugin.data.indexed import IndexedDataError, check_pair
from instella_plugin.model.config import InstellaConfig
from instella_plugin.training.layout import LayoutError, ParallelLayout
from instella_plugin.training.recipes import recipe_flags

# Flags that mirror the model configuration (the model config is their authority once built).
MODEL_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "seq_length", "rotary_base", "padded_vocab_size", "vocab_size", "norm_epsilon")


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


class Settings:
    """A read-only namespace of flag values (``flags.lr``); ``replace`` returns a new one."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", MappingProxyType({k: _freeze(v) for k, v in values.items()}))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"the run configuration is frozen: cannot set {name!r} (return values from the "
                             "plugin hook instead)")

    def __delattr__(self, name):
        raise AttributeError(f"the run configuration is frozen: cannot delete {name!r}")

    def __contains__(self, name) -> bool:
        return name in self._values

    def replace(self, **values) -> "Settings":
        unknown = sorted(set(values) - set(self._values))
        if unknown:
            raise KeyError(f"unknown setting(s) {unknown}")
        return Settings({**self._values, **values})

    def as_dict(self) -> dict:
        return dict(self._values)


@dataclass(frozen=True)
class DataPlan:
    """What the run reads: megatron blends per split (prefixes, weights) or a plugin's resolved blend."""

    kind: str = "gpt"  # gpt: token documents; sft: chats; dpo: preference pairs
    blend: Optional[Tuple] = None  # (prefixes, weights or None) split by --split
    blend_per_split: Optional[Tuple] = None  # [train, valid, test] (prefixes, weights) or None each
    mock: bool = False
    named: Optional[Tuple[str, str]] = None  # a plugin's (blend name or path, data root), resolved by its datasets
    source: Any = None  # the plugin's resolved blend, once resolved

    @property
    def has_data(self) -> bool:
        return bool(self.mock or self.blend or self.blend_per_split or self.named)


@dataclass(frozen=True)
class RunConfig:
    flags: Settings
    explicit: frozenset
    model: InstellaConfig
    layout: ParallelLayout
    data: DataPlan
    recipe: Optional[Mapping] = None
    plugin_values: Mapping = field(default_factory=lambda: MappingProxyType({}))  # e.g. the RoPE schedule


def split_blend(values: Sequence[str]):
    """Megatron-LM's ``--data-path`` list: ``P1 P2`` or ``W1 P1 W2 P2`` -> (prefixes, weights or None)."""
    values = list(values)
    try:
        weights = [float(v) for v in values[0::2]]
        return tuple(values[1::2]), tuple(weights)
    except ValueError:
        return tuple(values), None


def build_run_config(namespace, explicit, plugin, world_size: int, check_schedule: bool = True) -> RunConfig:
    """The frozen run configuration; ``SystemExit`` naming the problem and the fix on bad input.

    ``check_schedule=False`` leaves the schedule's own checks (iterations and LR given, warmup shorter
    than decay) to a host trainer that makes them itself (Megatron-LM's ``validate_args``)."""
    flags = Settings(vars(namespace))
    explicit = frozenset(explicit)
    try:
        recipe = plugin.recipe(flags)
        flags = flags.replace(**_recipe_values(recipe, flags, explicit))
        given = explicit | set(recipe_flags(recipe)) if recipe else explicit  # set by the user or the recipe
        model = plugin.model_config(flags, given)
        flags = flags.replace(**{k: getattr(model, k) for k in MODEL_FLAGS},
                              max_position_embeddings=flags.max_position_embeddings or model.seq_length)
        data = plugin.data_plan(flags, model)
        flags = flags.replace(**plugin.derived_values(flags, model, data))
        flags = _resolve_schedule(flags, world_size, check_schedule)
        layout = ParallelLayout(world_size, flags.tensor_model_parallel_size, flags.pipeline_model_parallel_size,
                                flags.context_parallel_size, flags.micro_batch_size, flags.global_batch_size,
                                layers_per_virtual_stage=flags.num_layers_per_virtual_pipeline_stage,
                                num_layers=model.num_layers).check()
        model.validate(layout.tp, layout.pp, layout.virtual_pipeline_size, layout.cp)
    except (LayoutError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    run = RunConfig(flags=flags, explicit=explicit, model=model, layout=layout, data=data, recipe=recipe,
                    plugin_values=MappingProxyType(dict(plugin.plugin_values(flags, model))))
    _check_run(run)
    plugin.check_config(run)
    return run


def _recipe_values(recipe, flags, explicit) -> dict:
    if not recipe:
        return {}
    values = {}
    for key, value in recipe_flags(recipe).items():
        if key not in flags:
            raise ValueError(f"recipe {recipe['name']} sets unknown setting {key!r}")
        if key not in explicit:
            values[key] = value
    return values


def _resolve_schedule(flags: Settings, world_size: int, check: bool = True) -> Settings:
    """Defaults that follow from other flags: the global batch, warmup from a fraction, decay length."""
    if check:
        _check_schedule(flags)
    values = {}
    if flags.global_batch_size is None:
        model_parallel = flags.tensor_model_parallel_size * flags.pipeline_model_parallel_size * \
            flags.context_parallel_size
        values["global_batch_size"] = flags.micro_batch_size * max(world_size // model_parallel, 1)
    warmup = flags.lr_warmup_iters
    if flags.lr_warmup_fraction is not None and flags.train_iters is not None:
        warmup = values["lr_warmup_iters"] = int(math.ceil(flags.lr_warmup_fraction * flags.train_iters))
    decay = flags.lr_decay_iters
    if decay is None:
        decay = values["lr_decay_iters"] = flags.train_iters
    if check and warmup >= decay:
        raise ValueError(f"--lr-warmup-iters {warmup} must be smaller than --lr-decay-iters {decay} (defaults to "
                         "--train-iters)")
    if flags.sequence_parallel and flags.tensor_model_parallel_size == 1:
        values["sequence_parallel"] = False
    return flags.replace(**values)


def _check_schedule(flags: Settings) -> None:
    if flags.train_iters is None:
        raise ValueError("--train-iters is required (or a recipe that sets it)")
    if flags.lr is None:
        raise ValueError("--lr is required (or a recipe that sets it)")
    for flag in ("min_lr", "lr_warmup_init"):
        value = getattr(flags, flag)
        if value is not None and value > flags.lr:
            raise ValueError(f"--{flag.replace('_', '-')} {value:g} is above --lr {flags.lr:g} (a recipe may have "
                             "set one of them); give both")


def _check_run(run: RunConfig) -> None:
    """Checks before anything is launched or built: the device, and each --data-path pair valid and not empty."""
    flags = run.flags
    if flags.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU; use --device cpu or auto")
    own = [] if run.data.named else [run.data.blend, *(run.data.blend_per_split or ())]
    for prefixes, weights in [b for b in own if b]:
        missing = [p for p in prefixes if not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx"))]
        if missing:
            raise SystemExit("error: data files not found (each prefix needs PREFIX.bin and PREFIX.idx):\n  "
                             + "\n  ".join(missing) + "\nprepare them with `instella data prepare`")
        for prefix, weight in zip(prefixes, weights or [1.0] * len(prefixes)):
            try:
                pair = check_pair(prefix)
            except IndexedDataError as e:
                raise SystemExit(f"error: data: {e}") from None
            if weight > 0 and pair.tokens == 0:
                raise SystemExit(f"error: data: {prefix} holds no tokens but has weight {weight:g}; prepare it again "
                                 "or drop it from --data-path")
    if not run.data.has_data:
        raise SystemExit("error: no training data: pass --data-path, --per-split-data-args-path or --mock-data")

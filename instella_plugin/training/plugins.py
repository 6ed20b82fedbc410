"""The plugin seam of ``pretrain_gpt.py``: what a plugin supplies, the stock GPT default, and loading.

A plugin is an object from the ``megatron_plugins`` entry-point group (``--plugin NAME``). It adds its
flags; while the frozen run configuration is built (``run_config.build_run_config``) it returns its
recipe, the model configuration, the data plan and derived values; afterwards every hook receives
the frozen ``RunConfig`` and returns values (layer spec and model, datasets, the forward step, i.e.
the training objective, the RoPE theta per iteration, checkpoint metadata). ``GPTPlugin`` is the stock
megatron-core GPT (megatron's own local layer spec and init, every Megatron-LM model flag honoured),
used without ``--plugin``; it is the baseline that benchmarks compare against. The same plugin object
serves the upstream Megatron-LM host through ``patches/``.
"""
import importlib
import json
from importlib.metadata import entry_points
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from instella_plugin.data.tokenizer import VOCAB_SIZE, load_tokenizer, vocab_size_of
from instella_plugin.model.config import InstellaConfig
from instella_plugin.training import checkpointing
from instella_plugin.training.datasets import build_gpt_datasets
from instella_plugin.training.forward_step import forward_step
from instella_plugin.training.loop import pretrain
from instella_plugin.training.run_config import DataPlan, split_blend

ENTRY_POINT_GROUP = "megatron_plugins"


class GPTPlugin:
    """Stock megatron-core GPT: model shape from Megatron-LM flags, megatron's local spec and init."""

    name = "gpt"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--qk-layernorm", action="store_true", help="megatron's per-head QK layernorm")

    # ---- configuration: called once while the run config is built; return values, set nothing ------
    def recipe(self, flags) -> Optional[dict]:
        """A mapping of flag values that fill the flags not given explicitly (or None)."""
        return None

    def model_config(self, flags, given: frozenset) -> InstellaConfig:
        """The model's shape; ``given`` names the flags the user or the recipe set."""
        for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if getattr(flags, flag) is None:
                raise ValueError(f"--{flag.replace('_', '-')} is required without a plugin")
        if flags.use_checkpoint_args:
            return checkpoint_model(flags)
        h, heads = flags.hidden_size, flags.num_attention_heads
        vocab = flags.vocab_size
        if vocab is None:
            if flags.tokenizer_type == "NullTokenizer":
                raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
            vocab = vocab_size_of(load_tokenizer(flags.tokenizer_model)) if flags.tokenizer_model else VOCAB_SIZE
        padded = flags.padded_vocab_size or _pad_vocab(vocab, flags.make_vocab_size_divisible_by,
                                                       flags.tensor_model_parallel_size)
        ffn = flags.ffn_hidden_size or (int(4 * h * 2 / 3 / 64) * 64 if flags.swiglu else 4 * h)  # Megatron-LM's
        groups = flags.num_query_groups if flags.group_query_attention and flags.num_query_groups else heads
        return InstellaConfig(
            num_layers=flags.num_layers, hidden_size=h, num_attention_heads=heads, num_query_groups=groups,
            ffn_hidden_size=ffn, vocab_size=vocab, padded_vocab_size=padded, seq_length=flags.seq_length,
            rotary_base=flags.rotary_base or 10000.0, norm_epsilon=flags.norm_epsilon, preset="custom")

    def data_plan(self, flags, model) -> DataPlan:
        """Megatron-LM's data flags: ``--data-path`` (split by ``--split``), per-split JSON, mock data."""
        per_split = None
        if flags.per_split_data_args_path:
            with open(flags.per_split_data_args_path, encoding="utf-8") as f:
                raw = json.load(f)
            per_split = tuple(split_blend(raw[s]) if raw.get(s) else None for s in ("train", "valid", "test"))
        blend = split_blend(flags.data_path) if flags.data_path and per_split is None else None
        return DataPlan(kind="gpt", blend=blend, blend_per_split=per_split, mock=flags.mock_data)

    def derived_values(self, flags, model, data) -> dict:
        """Flag values that follow from the model and the data (e.g. iterations for an epoch)."""
        return {"wd_exempt_1d": True} if flags.wd_exempt_1d is None else {}  # megatron's default

    def plugin_values(self, flags, model) -> dict:
        """Values of the plugin's own kind that later hooks read from ``run.plugin_values``."""
        return {}

    def check_config(self, run) -> None:
        """Refuse settings this plugin cannot honour (the whole run config is built)."""
        flags = run.flags
        refused = {"spec": "--spec names a plugin's layer spec; the stock GPT builds megatron's local spec",
                   "transformer_impl": "--transformer-impl transformer_engine needs a plugin's TE spec "
                                       "(e.g. --plugin instella); the stock GPT builds megatron's local spec"}
        for flag, why in refused.items():
            if getattr(flags, flag) not in (None, "local"):
                raise SystemExit(f"error: {why}")
        if flags.context_parallel_size > 1 or "cp_comm_type" in run.explicit:
            raise SystemExit("error: --context-parallel-size > 1 / --cp-comm-type need a plugin that slices batches "
                             "per context-parallel rank (e.g. --plugin instella)")

    # ---- model ----------------------------------------------------------------------------------
    def transformer_config_overrides(self, run) -> dict:
        flags = run.flags
        return dict(perform_initialization=True, init_method_std=0.02, qk_layernorm=bool(flags.qk_layernorm),
                    gated_linear_unit=bool(flags.swiglu),
                    activation_func=torch.nn.functional.silu if flags.swiglu else torch.nn.functional.gelu,
                    add_bias_linear=not flags.disable_bias_linear, normalization=flags.normalization)

    def build_model(self, run, transformer_config):
        """This rank's model chunks (uninitialised weights are fine when a checkpoint will be loaded)."""
        flags = run.flags
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        chunks = []
        for vp_stage in range(vpp or 1):
            stage = vp_stage if vpp else None
            spec = get_gpt_layer_local_spec(qk_layernorm=bool(flags.qk_layernorm), normalization=flags.normalization)
            chunks.append(GPTModel(
                config=transformer_config, transformer_layer_spec=spec, vocab_size=run.model.padded_vocab_size,
                max_sequence_length=flags.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=not flags.untie_embeddings_and_output_weights,
                position_embedding_type=flags.position_embedding_type, rotary_base=run.model.rotary_base,
                vp_stage=stage))
        return chunks

    # ---- data -----------------------------------------------------------------------------------
    def build_datasets(self, run, num_samples):
        """(train, valid, test) datasets of dict samples; ``num_samples`` is [train, valid, test]."""
        return build_gpt_datasets(run, num_samples)

    def batch_hook(self, run, batch):
        """Per micro-batch adjustments (packed documents, context-parallel slicing)."""
        return batch

    # ---- objective --------------------------------------------------------------------------------
    def check_start(self, run, resumed_own_run: bool) -> None:
        """Refuse how the run starts, before anything is built (called once ``--load`` is resolved)."""

    def forward_step(self, run, transformer_config, model_chunks, *, resumed_own_run: bool, device):
        """megatron's ``forward_step_func`` for this run, made once the model holds its starting weights:
        language modelling (``training.forward_step``) by default. A step object may say how many
        sequences one sample holds (``sequences_per_sample``, for tokens/s)."""
        return forward_step

    def train(self, run) -> dict:
        """Run the outer loop that drives ``Trainer`` for this run: ``loop.pretrain`` (pre-training and
        fine-tuning) unless the plugin's objective needs its own (GRPO alternates rollouts and updates)."""
        return pretrain(run, self)

    # ---- RoPE, checkpoints ------------------------------------------------------------------------
    def rope_theta(self, run, iteration: int) -> Optional[float]:
        """The RoPE base in force at ``iteration``, or None when it never changes."""
        return None

    def apply_rope_theta(self, model_chunks, theta: float) -> None:
        """Make every rotary table use ``theta`` (called when ``rope_theta`` changes)."""

    def checkpoint_meta(self, run, iteration: int = 0) -> dict:
        return {}

    def downstream_eval(self, run, model_chunks, iteration: int) -> dict:
        """Downstream task scores ({"task/metric": value}) on the live model at an eval interval; none here."""
        return {}

    def check_resume(self, run, meta: dict) -> None:
        """Refuse a resume whose stored settings contradict the request (called before loading)."""


def checkpoint_model(flags) -> InstellaConfig:
    """``--use-checkpoint-args``: the model configuration stored with the ``--load`` checkpoint."""
    if not flags.load:
        raise ValueError("--use-checkpoint-args needs --load (the checkpoint whose model configuration to use)")
    try:
        return InstellaConfig.from_dict(checkpointing.read_meta(flags.load).get("model"))
    except (checkpointing.CheckpointError, TypeError) as e:
        raise ValueError(f"--use-checkpoint-args: {e}") from None


def _pad_vocab(vocab: int, multiple: int, tp: int) -> int:
    step = multiple * tp
    return ((vocab + step - 1) // step) * step


def installed_plugins() -> dict:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.setdefault("instella", "instella_plugin.plugin:InstellaPlugin")  # also when run from a checkout
    return found


def load_plugin(name: Optional[str]):
    """The plugin object for ``--plugin NAME`` (``GPTPlugin`` without one)."""
    if not name:
        return GPTPlugin()
    plugins = installed_plugins()
    if name not in plugins:
        raise SystemExit(f"error: unknown plugin {name!r}; installed plugins: {', '.join(sorted(plugins))} "
                         f"(plugins register in the {ENTRY_POINT_GROUP!r} entry-point group)")
    target = plugins[name]
    if isinstance(target, str):
        module, attr = target.split(":")
        obj = getattr(importlib.import_module(module), attr)
    else:
        obj = target.load()
    return obj() if isinstance(obj, type) else obj

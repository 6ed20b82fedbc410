"""The plugin seam of ``pretrain_gpt.py``: what a plugin supplies, the stock GPT default, and loading.

A plugin is an object from the ``megatron_plugins`` entry-point group (``--plugin NAME``). It adds its
flags, fills defaults (recipes), and supplies the model configuration, layer spec, datasets, the
forward step (the training objective), the RoPE theta per iteration, and what goes into checkpoint
metadata. ``GPTPlugin`` is the stock
megatron-core GPT (megatron's own local layer spec and init), used without ``--plugin``; it is the
baseline that benchmarks compare against. The same plugin object serves the upstream Megatron-LM
host through ``patches/``.
"""
from importlib.metadata import entry_points
from typing import Optional

ENTRY_POINT_GROUP = "megatron_plugins"


class GPTPlugin:
    """Stock megatron-core GPT: model shape from Megatron-LM flags, megatron's local spec and init."""

    name = "gpt"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--qk-layernorm", action="store_true", help="megatron's per-head QK layernorm")

    def finalize_args(self, args) -> None:
        for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if getattr(args, flag) is None:
                raise SystemExit(f"error: --{flag.replace('_', '-')} is required without a plugin")

    # ---- model ----------------------------------------------------------------------------------
    def model_config(self, args):
        from instella_plugin.model.config import InstellaConfig

        heads = args.num_attention_heads
        vocab = args.vocab_size or 50280
        padded = args.padded_vocab_size or _pad_vocab(vocab, args.make_vocab_size_divisible_by,
                                                      args.tensor_model_parallel_size)
        return InstellaConfig(
            num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=heads,
            num_query_groups=args.num_query_groups if args.group_query_attention and args.num_query_groups else heads,
            ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size, vocab_size=vocab,
            padded_vocab_size=padded, seq_length=args.seq_length, rotary_base=args.rotary_base or 10000.0,
            norm_epsilon=args.norm_epsilon, preset="custom")

    def transformer_config_overrides(self, args) -> dict:
        return dict(perform_initialization=True, init_method_std=0.02, qk_layernorm=bool(args.qk_layernorm))

    def build_model(self, args, cfg, transformer_config):
        """This rank's model chunks (uninitialised weights are fine when a checkpoint will be loaded)."""
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        chunks = []
        for vp_stage in range(vpp or 1):
            stage = vp_stage if vpp else None
            spec = get_gpt_layer_local_spec(qk_layernorm=bool(args.qk_layernorm), normalization=args.normalization)
            chunks.append(GPTModel(
                config=transformer_config, transformer_layer_spec=spec, vocab_size=cfg.padded_vocab_size,
                max_sequence_length=cfg.seq_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                position_embedding_type=args.position_embedding_type, rotary_base=cfg.rotary_base, vp_stage=stage))
        return chunks

    # ---- data -----------------------------------------------------------------------------------
    def build_datasets(self, args, cfg, num_samples):
        """(train, valid, test) datasets of dict samples; ``num_samples`` is [train, valid, test]."""
        from instella_plugin.training.datasets import build_gpt_datasets

        return build_gpt_datasets(args, cfg, num_samples)

    def batch_hook(self, args, batch):
        """Per micro-batch adjustments (packed documents, context-parallel slicing)."""
        return batch

    # ---- objective --------------------------------------------------------------------------------
    def check_start(self, args, resumed_own_run: bool) -> None:
        """Refuse how the run starts, before anything is built (called once ``--load`` is resolved)."""

    def forward_step(self, args, cfg, transformer_config, model_chunks, *, resumed_own_run: bool, device):
        """megatron's ``forward_step_func`` for this run, made once the model holds its starting weights:
        language modelling (``training.forward_step``) by default. A step object may say how many
        sequences one sample holds (``sequences_per_sample``, for tokens/s)."""
        from instella_plugin.training.forward_step import forward_step

        return forward_step

    # ---- RoPE, checkpoints ------------------------------------------------------------------------
    def rope_theta(self, args, iteration: int) -> Optional[float]:
        """The RoPE base in force at ``iteration``, or None when it never changes."""
        return None

    def apply_rope_theta(self, model_chunks, theta: float) -> None:
        """Make every rotary table use ``theta`` (called when ``rope_theta`` changes)."""

    def checkpoint_meta(self, args, iteration: int = 0) -> dict:
        return {}

    def check_resume(self, args, meta: dict) -> None:
        """Refuse a resume whose stored settings contradict the request (called before loading)."""


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
        import importlib

        module, attr = target.split(":")
        obj = getattr(importlib.import_module(module), attr)
    else:
        obj = target.load()
    return obj() if isinstance(obj, type) else obj

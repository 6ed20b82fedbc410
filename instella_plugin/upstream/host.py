"""The Megatron-LM host of a ``megatron_plugins`` plugin: what upstream ``pretrain_gpt.py --plugin NAME`` calls.

The patch series in ``patches/`` makes Megatron-LM's ``pretrain_gpt.py`` create a ``PluginHost`` before
it imports ``megatron.training`` and take four things from it: the extra-arguments provider, the GPT
builder, the dataset provider and the forward step. The plugin object is the one our own
``pretrain_gpt.py`` loads (``instella_plugin.training.plugins.load_plugin``); this module only adapts
Megatron-LM's calling conventions to the plugin seam (``GPTPlugin``):

- arguments: the plugin's flags join Megatron-LM's parser; after parsing, ``finalize`` translates
  Megatron-LM's namespace into the plugin's frozen ``RunConfig`` (``run_config_from_megatron_args``:
  explicit flags, recipe values, model, data plan, layout) and writes back to Megatron-LM's namespace
  the settings that config resolved, which Megatron-LM's own loop reads (run from the
  ``plugin_finalize_args`` run-time patch, before Megatron-LM's ``validate_args``);
- model: ``plugin.build_model`` builds every virtual-pipeline chunk of this rank once, with the
  plugin's TransformerConfig; Megatron-LM's ``model_provider`` receives them one stage at a time;
- data: ``plugin.build_datasets`` (blend resolution, SFT, mock data) on every rank;
- per iteration: the forward step applies ``plugin.rope_theta(run, iteration)`` before the first
  micro-batch of each iteration (Megatron-LM sets ``args.curr_iteration``); with packed documents or
  context parallelism it also runs the plugin's ``batch_hook`` (see ``_forward_with_batch_hook``).
Run-time patches (``registry``) carry the rest; ``patches/README.md`` lists everything.
"""
import argparse
import functools
import os
from typing import Optional, Sequence

import torch

from instella_plugin import cpu_mode
from instella_plugin.checkpoint_layout import META, CheckpointError, CheckpointMeta, publish, read_meta
from instella_plugin.training.arguments import build_parser, explicit_dests
from instella_plugin.training.checkpointing import parallel_layout
from instella_plugin.training.plugins import load_plugin
from instella_plugin.training.run_config import build_run_config
from instella_plugin.upstream import cpu, registry, runtime


def _peek(argv: Sequence[str], flag: str, default=None):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(flag, default=default)
    known, _ = pre.parse_known_args(list(argv))
    return getattr(known, flag.lstrip("-").replace("-", "_"))


def wants_plugin(argv: Sequence[str]) -> bool:
    return any(a == "--plugin" or a.startswith("--plugin=") for a in argv)


class _SkipExisting:
    """A parser (or group) proxy that skips options Megatron-LM already defines under the same name.

    Plugins use Megatron-LM's flag names for what they share with it, so an existing option means the
    same setting; the host's parser keeps its own definition.
    """

    def __init__(self, target, parser):
        self._target, self._parser = target, parser

    def add_argument(self, *names, **kwargs):
        if any(n in self._parser._option_string_actions for n in names if n.startswith("-")):
            return None
        return self._target.add_argument(*names, **kwargs)

    def add_argument_group(self, *a, **k):
        return _SkipExisting(self._parser.add_argument_group(*a, **k), self._parser)

    def __getattr__(self, name):
        return getattr(self._target, name)


def _default_groups(pg_collection) -> bool:
    """Whether a ProcessGroupCollection is megatron's global one (the plugin builds with parallel_state)."""
    from megatron.core import parallel_state as ps

    return (getattr(pg_collection, "tp", None) is ps.get_tensor_model_parallel_group()
            and getattr(pg_collection, "pp", None) is ps.get_pipeline_model_parallel_group())


def _uses_batch_hook(args) -> bool:
    """Packed documents and context parallelism go through the plugin's batch hook (see forward step)."""
    return bool(getattr(args, "packed_documents", False)) or args.context_parallel_size > 1


def _check_batch_hook_layout(args) -> None:
    if getattr(args, "packed_documents", False) and args.pipeline_model_parallel_size > 1:
        raise SystemExit("error: --packed-documents with --pipeline-model-parallel-size > 1 on Megatron-LM: its "
                         "get_batch_on_this_tp_rank hands later pipeline stages no tokens, so they cannot find the "
                         "document boundaries; use PP=1 here, or instella's pretrain_gpt.py (every stage reads the batch)")


class PluginHost:
    """Adapter between Megatron-LM's training entry and one plugin object."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)
        self.name = _peek(self.argv, "--plugin")
        if not self.name:
            raise SystemExit("error: --plugin needs a NAME (a plugin of the 'megatron_plugins' entry-point group)")
        self.device = _peek(self.argv, "--device", "auto")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SystemExit(f"error: --device {self.device!r}: choose auto, cpu or cuda")
        self.plugin = load_plugin(self.name)
        self.parser = None
        self.run = self.cfg = None
        self._chunks = None
        self._theta = {}
        self.cpu = self._start_cpu_mode()
        runtime.install_host(self)

    # ---- CPU mode ---------------------------------------------------------------------------------
    def _start_cpu_mode(self) -> bool:
        """Before Megatron-LM's training code is imported: the CPU mode, when asked for or without a GPU."""
        if self.device == "cuda" or (self.device == "auto" and cpu_mode.gpu_available()):
            if self.device == "cuda" and not cpu_mode.gpu_available():
                raise SystemExit("error: --device cuda but torch sees no GPU; use --device cpu or auto")
            return False
        cpu_mode.enable(force=self.device == "cpu")
        cpu.before_import()
        return True

    # ---- what pretrain_gpt.py takes ---------------------------------------------------------------
    def hooks(self, *, datasets, builder, forward_step, extra_args_provider):
        """The four entry points of upstream ``pretrain_gpt.py``, with the plugin's in place."""
        registry.apply(phase="startup")
        if self.cpu:
            registry.apply(phase="cpu")
        del builder  # the plugin builds the model
        provider = functools.partial(self.datasets_provider)
        provider.is_distributed = True  # every rank calls it (megatron's blended builder decides who builds)
        return dict(datasets=provider, builder=self.gpt_builder, forward_step=self.wrap_forward_step(forward_step),
                    extra_args_provider=self.extra_args_provider(extra_args_provider))

    def extra_args_provider(self, chained=None):
        def provider(parser):
            if chained is not None:
                parser = chained(parser)
            g = parser.add_argument_group("plugin (instella-megatron patches/)")
            g.add_argument("--plugin", help="a plugin of the 'megatron_plugins' entry-point group")
            g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                           help="auto: the GPU when torch sees one, else the CPU mode with gloo")
            self.plugin.add_arguments(_SkipExisting(parser, parser))
            self.parser = parser
            return parser
        return provider

    # ---- arguments --------------------------------------------------------------------------------
    def finalize(self, args) -> None:
        """The plugin's run config from Megatron-LM's parsed args (before its ``validate_args``), then the
        Megatron-LM settings that config implies written back to Megatron-LM's namespace, which its
        loop reads."""
        if self.parser is None:
            raise RuntimeError("PluginHost.finalize before the extra-arguments provider ran")
        explicit = explicit_dests(self.parser, self.argv)
        if getattr(args, "use_legacy_models", False):
            raise SystemExit("error: --use-legacy-models with --plugin: plugins build megatron-core models")
        if self.cpu:
            for key, value in cpu.cpu_safe_args().items():
                if key in explicit and getattr(args, key) != value:
                    raise SystemExit(f"error: --{key.replace('_', '-')} {getattr(args, key)} in the CPU mode, which "
                                     f"needs {value}; drop the flag or run on a GPU")
                setattr(args, key, value)
        self.run = run_config_from_megatron_args(args, explicit, self.plugin)
        _check_batch_hook_layout(self.run.flags)
        own_loop = {"dpo": "a reference model in the forward step",
                    "grpo": "rollouts between updates, an outer loop of its own"}
        if self.run.data.kind in own_loop:
            raise SystemExit(f"error: --dataset-type {self.run.data.kind} ({own_loop[self.run.data.kind]}) runs in "
                             "instella's pretrain_gpt.py, not on Megatron-LM's loop")
        self.cfg = self.run.model
        self._check_resume(args)
        _write_back(args, self.run, self.transformer_config(args))
        self._allow_plugin_types_in_checkpoints(args)

    def _check_resume(self, args) -> None:
        """The plugin's resume checks (RoPE theta, model shape), as our trainer runs them, against the
        ``instella_meta.json`` of the checkpoint ``--load`` names, when it has one (ours do, and
        Megatron-LM's written through this host); before Megatron-LM builds or loads anything."""
        if not args.load:
            return
        try:
            meta = read_meta(args.load)
        except (CheckpointError, FileNotFoundError):
            return  # no checkpoint yet, or none with our metadata: nothing to check here
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --load {args.load}: unreadable {META}: {e}")
        self.plugin.check_resume(self.run, meta)

    def _allow_plugin_types_in_checkpoints(self, args) -> None:
        """Megatron-LM pickles ``args`` into every checkpoint and loads it with ``weights_only``; the
        plugin's own value types there (e.g. a RoPE schedule) join torch's safe globals."""
        root = type(self.plugin).__module__.split(".")[0]
        found, todo = set(), list(vars(args).values())
        while todo:
            value = todo.pop()
            if isinstance(value, (list, tuple, set, frozenset)):
                todo.extend(value)
            elif isinstance(value, dict):
                todo.extend(value.values())
            elif type(value).__module__.split(".")[0] == root:
                found.add(type(value))
                todo.extend(getattr(value, "__dict__", {}).values())
        if found:
            torch.serialization.add_safe_globals(sorted(found, key=lambda t: t.__qualname__))

    def transformer_config(self, args):
        """The plugin's TransformerConfig, with the fields Megatron-LM's loop sets from its own flags."""
        dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)
        return self.cfg.transformer_config(
            tensor_parallel=args.tensor_model_parallel_size, pipeline_parallel=args.pipeline_model_parallel_size,
            virtual_pipeline=getattr(args, "virtual_pipeline_model_parallel_size", None),
            context_parallel=args.context_parallel_size,
            sequence_parallel=args.sequence_parallel, params_dtype=dtype, cpu=self.cpu,
            recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers, deallocate_pipeline_outputs=True,
            calculate_per_token_loss=True,  # the plugin's loss: per-token mean over the global batch
            **self.plugin.transformer_config_overrides(self.run))

    # ---- model, data, per-iteration hooks ---------------------------------------------------------
    def gpt_builder(self, args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        """Megatron-LM's builder signature; the plugin builds all of this rank's chunks on the first call."""
        if pg_collection is not None and not _default_groups(pg_collection):
            raise SystemExit("error: --plugin does not build models for a separate process-group collection "
                             "(RL inference models)")
        if self.cfg is None:
            raise SystemExit("error: the plugin's arguments were never finalized (--yaml-cfg skips Megatron-LM's "
                             "validate_args, where the plugin host runs); drop --yaml-cfg with --plugin")
        if self._chunks is None:
            self._chunks = self.plugin.build_model(self.run, self.transformer_config(args))
        chunk = self._chunks[vp_stage or 0]
        if (chunk.pre_process, chunk.post_process) != (pre_process, post_process):
            raise RuntimeError(f"plugin chunk {vp_stage}: pre/post process {chunk.pre_process}/{chunk.post_process} "
                               f"but Megatron-LM expects {pre_process}/{post_process}")
        return chunk

    def datasets_provider(self, train_val_test_num_samples, vp_stage=None):
        return self.plugin.build_datasets(self.run, list(train_val_test_num_samples))

    def wrap_forward_step(self, forward_step):
        loss_func = getattr(forward_step, "__globals__", {}).get("loss_func")

        @functools.wraps(forward_step)
        def step(data_iterator, model, *a, **kw):
            from megatron.training import get_args

            args = get_args()
            self.apply_rope(model, args)
            if not _uses_batch_hook(self.run.flags):
                return forward_step(data_iterator, model, *a, **kw)
            if loss_func is None or a or kw:
                raise SystemExit("error: --packed-documents / --context-parallel-size > 1 with --plugin need upstream "
                                 "pretrain_gpt.py's loss_func and plain forward step (tag core_v0.16.1)")
            return self._forward_with_batch_hook(data_iterator, model, args, loss_func)
        return step

    def _forward_with_batch_hook(self, data_iterator, model, args, loss_func):
        """Upstream's forward step with the plugin's batch hook where upstream slices for CP: this rank's
        full-sequence batch (Megatron-LM's TP broadcast) -> ``plugin.batch_hook`` (document boundaries
        from the whole sequence, then this CP rank's share) -> the model -> upstream's ``loss_func``."""
        from megatron.core.utils import get_attr_wrapped_model
        from megatron.training.utils import get_batch_on_this_tp_rank, is_first_or_last_pipeline_stage

        batch = dict(tokens=None, labels=None, loss_mask=None, position_ids=None)
        if is_first_or_last_pipeline_stage(get_attr_wrapped_model(model, "vp_stage")):
            batch = get_batch_on_this_tp_rank(data_iterator)
            for key in ("cu_seqlens", "max_seqlen", "local_cp_size"):  # never set by the plugin's datasets
                batch.pop(key, None)
            batch = self.plugin.batch_hook(self.run, batch)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                       loss_mask=batch["loss_mask"], packed_seq_params=batch.get("packed_seq_params"))
        return output, functools.partial(loss_func, batch["loss_mask"], model=model)

    def apply_rope(self, model, args) -> None:
        theta = self.plugin.rope_theta(self.run, int(getattr(args, "curr_iteration", 0) or 0))
        if theta is not None and self._theta.get(id(model)) != theta:
            self.plugin.apply_rope_theta([model], theta)
            self._theta[id(model)] = theta

    def current_theta(self):
        return next(iter(self._theta.values()), None)

    def write_checkpoint_meta(self, iteration: int, release: bool = False) -> Optional[str]:
        """``instella_meta.json`` in the iteration directory upstream just wrote, then the tracker again
        (rank 0; ``checkpoint_layout.publish``)."""
        from megatron.training import get_args

        args = get_args()
        if getattr(args, "async_save", False) or torch.distributed.get_rank() != 0:
            return None  # an async save completes later; its directory may not exist yet
        meta = CheckpointMeta(
            int(iteration), int(getattr(args, "consumed_train_samples", 0)),
            contents=("model",),  # optimizer and RNG state are in Megatron-LM's layout, not ours
            layout=parallel_layout(), model=self.cfg.to_dict(),
            extra={"host": "megatron-lm", **self.plugin.checkpoint_meta(self.run, iteration)})
        try:
            folder = publish(args.save, meta, release=release)
        except CheckpointError:
            return None  # upstream wrote no directory (nothing persistent was saved)
        return os.path.join(folder, META)

    def log_path(self, args) -> Optional[str]:
        return os.path.join(args.save, "train_log.jsonl") if getattr(args, "save", None) else None


def run_config_from_megatron_args(args, explicit, plugin):
    """Megatron-LM's parsed namespace -> the plugin's frozen ``RunConfig``: the one translation.

    Our trainer's flags take Megatron-LM's names, so each takes the value of Megatron-LM's flag of the
    same name; the few Megatron-LM lacks keep our defaults. Megatron-LM's ``--cp-comm-type`` is a list
    (one type per layer); the plugin takes one type, and the local backend's only one is a2a."""
    ours = vars(build_parser(plugin).parse_args([]))
    values = {k: getattr(args, k) for k in ours if hasattr(args, k)}
    cp_types = list(args.cp_comm_type) if isinstance(args.cp_comm_type, (list, tuple)) else [args.cp_comm_type]
    if "cp_comm_type" not in explicit and getattr(args, "transformer_impl", "local") == "local":
        cp_types = ["a2a"]
    if len(set(cp_types)) != 1:
        raise SystemExit(f"error: --cp-comm-type {' '.join(cp_types)}: with --plugin give one type for all layers")
    values["cp_comm_type"] = cp_types[0]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Megatron-LM checks its own schedule (and may count samples instead of iterations)
    return build_run_config(argparse.Namespace(**{**ours, **values}), explicit, plugin, world, check_schedule=False)


def _write_back(args, run, tcfg) -> None:
    """The run config's resolved values into Megatron-LM's namespace (its loop, FLOP counts and checks
    read them): recipe values, the model's shape and architecture, derived iteration counts."""
    for key, value in run.flags.as_dict().items():
        if hasattr(args, key) and key != "cp_comm_type" and getattr(args, key) != value:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    args.cp_comm_type = [run.flags.cp_comm_type]  # Megatron-LM's form: one type per layer, or one for all
    args.calculate_per_token_loss = True
    args.create_attention_mask_in_dataloader = False  # causal mask type in the spec; datasets make none
    if args.tokenizer_type is None and not args.tokenizer_model:
        # pre-tokenized data: Megatron-LM needs only the vocabulary size (padded_vocab_size is set)
        args.tokenizer_type = "NullTokenizer"
    args.swiglu = bool(tcfg.gated_linear_unit)
    args.normalization = tcfg.normalization
    args.norm_epsilon = tcfg.layernorm_epsilon
    args.add_bias_linear = tcfg.add_bias_linear
    args.hidden_dropout, args.attention_dropout = tcfg.hidden_dropout, tcfg.attention_dropout
    args.kv_channels = tcfg.kv_channels
    args.group_query_attention = tcfg.num_query_groups != tcfg.num_attention_heads
    args.position_embedding_type = "rope"

"""The ``instella`` plugin for ``pretrain_gpt.py``: Instella's model, recipes, blends and RoPE schedule.

Loaded by ``--plugin instella`` through the ``megatron_plugins`` entry-point group (the same object
serves upstream Megatron-LM through ``patches/``). Precedence of settings: explicit flags, then the
recipe (``--instella-recipe``), then the model preset, then Megatron's defaults.
"""
import argparse
import math
import os

import yaml

from instella_plugin.training.plugins import GPTPlugin

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
# Recipe keys that are not flags.
_RECIPE_ONLY = {"description", "seeds", "rope_phases"}
_MODEL_FLAGS = {"num_layers": "num_layers", "hidden_size": "hidden_size",
                "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
                "ffn_hidden_size": "ffn_hidden_size", "seq_length": "seq_length", "rotary_base": "rotary_base",
                "padded_vocab_size": "padded_vocab_size", "vocab_size": "vocab_size", "norm_epsilon": "norm_epsilon"}


def known_recipes():
    return sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict:
    path = name_or_path if os.path.isfile(name_or_path) else os.path.join(RECIPE_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        raise SystemExit(f"error: unknown recipe {name_or_path!r}; known recipes: {', '.join(known_recipes())} "
                         "(or pass a YAML path)")
    with open(path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    recipe["name"] = os.path.splitext(os.path.basename(path))[0]
    return recipe


def iterations_for_tokens(tokens: float, global_batch: int, seq_length: int) -> int:
    """Whole optimizer steps in one pass over ``tokens`` (the stage-1 epoch)."""
    return int(tokens // (global_batch * seq_length))


class InstellaPlugin(GPTPlugin):
    name = "instella"

    def add_arguments(self, parser) -> None:
        g = parser.add_argument_group("instella")
        g.add_argument("--instella-recipe", help=f"a recipe name ({', '.join(known_recipes())}) or YAML path")
        g.add_argument("--model-preset", help="instella-3b, instella-1b, instella-tiny, instella-test")
        g.add_argument("--data-blend", help="a blend name or YAML path (instella data blend)")
        g.add_argument("--data-root", help="directory the blend's source prefixes are relative to")
        g.add_argument("--dataset-type", default="gpt", choices=["gpt", "sft", "dpo"],
                       help="gpt: token documents; sft: chats; dpo: preference pairs (chosen, rejected)")
        g.add_argument("--dpo-beta", type=float, default=5.0, help="DPO beta (Instella: 5, length-normalised)")
        g.add_argument("--dpo-loss", default="dpo_norm", choices=["dpo_norm", "dpo"],
                       help="dpo_norm: log-likelihoods averaged over response tokens (Instella); dpo: summed")
        g.add_argument("--sft-pack", action="store_true", help="pack SFT chats instead of padding each")
        g.add_argument("--decay-all-params", action="store_true", help="weight decay on every parameter (Instella)")
        g.add_argument("--rope-schedule", help="constant:THETA | geometric:THETA0:THETA1:START:END | stepwise")
        g.add_argument("--override-rope-theta", action="store_true",
                       help="accept a RoPE theta that differs from the checkpoint's on resume")
        g.add_argument("--fused-output-loss", action=argparse.BooleanOptionalAction, default=True,
                       help="output layer + cross-entropy chunked over tokens, never holding the whole logits")
        g.add_argument("--packed-documents", action="store_true",
                       help="mask attention between the documents of a packed sequence (positions run on)")

    # ---- arguments ---------------------------------------------------------------------------------
    def finalize_args(self, args) -> None:
        if args.instella_recipe:
            recipe = load_recipe(args.instella_recipe)
            args.recipe = recipe
            for key, value in recipe.items():
                if key in _RECIPE_ONLY or key == "name":
                    continue
                if not hasattr(args, key):
                    raise SystemExit(f"error: recipe {recipe['name']} sets unknown setting {key!r}")
                if key not in args.explicit:
                    setattr(args, key, value)
        else:
            args.recipe = None
        if args.use_checkpoint_args and args.load:
            from instella_plugin.training import checkpointing

            try:
                meta = checkpointing.read_meta(args.load)
            except checkpointing.CheckpointError as e:
                raise SystemExit(f"error: --use-checkpoint-args: {e}")
            args.checkpoint_model = meta.get("model")
        try:
            cfg = self.model_config(args)
            cfg.validate(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, None,
                         args.context_parallel_size)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        for flag in _MODEL_FLAGS:
            setattr(args, flag, getattr(cfg, flag))
        args.max_position_embeddings = args.max_position_embeddings or cfg.seq_length
        from instella_plugin.rope.schedule import RopeSchedule

        try:
            args.rope = RopeSchedule.parse(args.rope_schedule, args.rotary_base)
        except ValueError as e:
            raise SystemExit(f"error: --rope-schedule: {e}")
        if args.dataset_type == "dpo":
            from instella_plugin.training.dpo import check_layout

            check_layout(args)
        if args.context_parallel_size > 1:
            from instella_plugin.model.context_parallel import check_cp_layout

            if args.cp_comm_type != "a2a" and args.transformer_impl == "local":
                raise SystemExit(f"error: --cp-comm-type {args.cp_comm_type} needs Transformer Engine; the local "
                                 "backend implements a2a (Ulysses) context parallelism")
            try:
                check_cp_layout(cfg.seq_length, args.context_parallel_size,
                                cfg.num_attention_heads // args.tensor_model_parallel_size,
                                cfg.num_query_groups // args.tensor_model_parallel_size)
            except ValueError as e:
                raise SystemExit(f"error: {e}")
        if args.mock_data:  # --mock-data replaces the recipe's blend (dry runs of a recipe)
            args.data_blend = None
        args.has_plugin_data = bool(args.data_blend)
        if args.data_blend and not args.data_root:
            raise SystemExit("error: --data-blend needs --data-root (the directory its prefixes are relative to)")
        self._derive_iterations(args)

    def _derive_iterations(self, args) -> None:
        wants = [k for k in ("train_iters", "lr_decay_iters") if isinstance(getattr(args, k), str)]
        if not wants:
            return
        if not args.data_blend:
            raise SystemExit(f"error: {wants[0]} = {getattr(args, wants[0])!r} needs --data-blend to count tokens")
        from instella_plugin.data.blends import BlendError, resolve_blend

        try:
            blend = resolve_blend(args.data_blend, args.data_root)
        except (BlendError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        for key in wants:
            spec = getattr(args, key)
            epochs = 1.0 if spec == "epoch" else float(spec.split(":", 1)[1])
            rows = blend.split_rows("train")
            if blend.kind == "sft":
                iters = int(math.ceil(epochs * sum(r.documents for r in rows) / args.global_batch_size))
            else:
                iters = iterations_for_tokens(epochs * sum(r.epoch_tokens for r in rows),
                                              args.global_batch_size, args.seq_length)
            setattr(args, key, max(iters, 1))

    # ---- model ---------------------------------------------------------------------------------------
    def model_config(self, args):
        from instella_plugin.model.config import InstellaConfig, get_preset

        if getattr(args, "checkpoint_model", None):
            cfg = InstellaConfig.from_dict(args.checkpoint_model)
        else:
            cfg = get_preset(args.model_preset or "instella-3b")
        overrides = {k: getattr(args, k) for k in _MODEL_FLAGS
                     if k in args.explicit or (args.recipe and k in args.recipe and getattr(args, k) is not None)}
        return cfg.replace(**overrides) if overrides else cfg

    def transformer_config_overrides(self, args) -> dict:
        return {}

    def spec_name(self, args) -> str:
        if args.spec:
            return args.spec[0]
        return "instella-te" if args.transformer_impl == "transformer_engine" else "instella"

    def build_model(self, args, cfg, transformer_config):
        from instella_plugin.model.build import build_gpt_chunks

        return build_gpt_chunks(cfg, transformer_config, self.spec_name(args), init_seed=args.seed,
                                fused_output_loss=getattr(args, "fused_output_loss", True))

    # ---- data ----------------------------------------------------------------------------------------
    def build_datasets(self, args, cfg, num_samples):
        from instella_plugin.data.blends import BlendError, resolve_blend
        from instella_plugin.training.datasets import build_gpt_datasets

        blend = None
        if args.data_blend:
            try:
                blend = resolve_blend(args.data_blend, args.data_root)
            except (BlendError, ValueError) as e:
                raise SystemExit(f"error: {e}")
        if args.dataset_type in ("sft", "dpo"):
            return self._sft_datasets(args, cfg, blend, num_samples)
        if blend is not None:
            if blend.kind == "sft":
                raise SystemExit(f"error: blend {blend.name} holds chat data; add --dataset-type sft (chats) or "
                                 "dpo (preference pairs)")
            args.blend_per_split = blend.blend_per_split
        return build_gpt_datasets(args, cfg, num_samples)

    def _sft_datasets(self, args, cfg, blend, num_samples):
        from instella_plugin.data.sft import PreferenceDataset, SFTDataset
        from instella_plugin.training.datasets import WeightedSamples, _split_blend

        def store(prefix):
            try:
                if args.dataset_type == "dpo":
                    return PreferenceDataset(prefix, cfg.seq_length, pad_id=1)
                return SFTDataset(prefix, cfg.seq_length, pad_id=1, pack=args.sft_pack)
            except ValueError as e:  # an SFT store given to DPO or the other way round
                raise SystemExit(f"error: --dataset-type {args.dataset_type}: {e}")

        out = []
        for i, split in enumerate(("train", "valid", "test")):
            if blend is not None:
                b = blend.blend_for(split)
            else:
                b = _split_blend(args.data_path) if (args.data_path and split == "train") else None
            if b is None or not num_samples[i]:
                out.append(None)
                continue
            sets = [store(p) for p in b[0]]
            out.append(WeightedSamples(sets, b[1], num_samples[i]))
        return tuple(out)

    def batch_hook(self, args, batch):
        """Document boundaries for packed sequences, then this context-parallel rank's slice."""
        if args.packed_documents:
            from instella_plugin.model.packed_attention import packed_seq_params_from_tokens

            batch["packed_seq_params"] = packed_seq_params_from_tokens(batch["tokens"], 0)
        if args.context_parallel_size > 1:
            from instella_plugin.model.context_parallel import batch_for_cp_rank

            batch = batch_for_cp_rank(batch)
        return batch

    # ---- objective -----------------------------------------------------------------------------------
    def check_start(self, args, resumed_own_run: bool) -> None:
        if args.dataset_type == "dpo" and resumed_own_run and not args.pretrained_checkpoint:
            from instella_plugin.training.dpo import NO_REFERENCE

            raise SystemExit(NO_REFERENCE)

    def forward_step(self, args, cfg, transformer_config, model_chunks, *, resumed_own_run: bool, device):
        if args.dataset_type != "dpo":
            return super().forward_step(args, cfg, transformer_config, model_chunks,
                                        resumed_own_run=resumed_own_run, device=device)
        from instella_plugin.training import dpo

        reference = dpo.build_reference(self, args, cfg, transformer_config, model_chunks, resumed_own_run, device)
        return dpo.DPOStep(reference, args.dpo_beta, normalise=args.dpo_loss == "dpo_norm")

    # ---- RoPE, checkpoints ---------------------------------------------------------------------------
    def rope_theta(self, args, iteration: int):
        return args.rope.theta_at(iteration)

    def apply_rope_theta(self, model_chunks, theta: float) -> None:
        from instella_plugin.rope.apply import set_rotary_base

        set_rotary_base(model_chunks, theta)

    def checkpoint_meta(self, args, iteration: int = 0) -> dict:
        from instella_plugin.rope.apply import rope_meta

        meta = {"spec": self.spec_name(args), "rotary_base": float(args.rotary_base), "seq_length": args.seq_length,
                "tokenizer": args.tokenizer_model or "instella",
                "recipe": args.recipe["name"] if args.recipe else None}
        meta.update(rope_meta(args.rope.theta_at(max(iteration - 1, 0)), max(iteration - 1, 0), args.rope.describe()))
        return meta

    def check_resume(self, args, meta: dict) -> None:
        from instella_plugin.rope.apply import theta_on_resume

        try:
            theta_on_resume(meta, args.rope, meta.get("iteration", 0), args.override_rope_theta)
        except ValueError as e:
            raise SystemExit(f"error: --load {args.load}: {e}")
        saved = meta.get("model")
        if saved and not args.use_checkpoint_args:
            cfg = self.model_config(args)
            shape_keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                          "ffn_hidden_size", "padded_vocab_size")
            diff = [f"{k}: checkpoint {saved.get(k)} vs requested {getattr(cfg, k)}" for k in shape_keys
                    if saved.get(k) != getattr(cfg, k)]
            if diff:
                raise SystemExit(f"error: --load {args.load} holds a different model:\n  " + "\n  ".join(diff)
                                 + "\npass --use-checkpoint-args to take the checkpoint's configuration")

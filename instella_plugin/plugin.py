"""The ``instella`` plugin for ``pretrain_gpt.py``: Instella's model, recipes, blends and RoPE schedule.

Loaded by ``--plugin instella`` through the ``megatron_plugins`` entry-point group (the same object
serves upstream Megatron-LM through ``patches/``). Precedence of settings: explicit flags, then the
recipe (``--instella-recipe``), then the model preset, then Megatron's defaults. Every hook returns
values; the frozen run configuration (``training/run_config.py``) is built from them.
"""
import argparse
import dataclasses
import math
from functools import partial

from instella_plugin.data.blends import BlendError, resolve_blend
from instella_plugin.data.sft import PreferenceDataset, SFTDataset
from instella_plugin.data.tokenizer import load_tokenizer
from instella_plugin.evaluation.in_loop import InLoopEvaluation
from instella_plugin.model.build import build_gpt_chunks
from instella_plugin.model.config import InstellaConfig, get_preset
from instella_plugin.model.context_parallel import batch_for_cp_rank, check_cp_layout
from instella_plugin.model.document_segments import packed_seq_params_from_segments
from instella_plugin.model.packed_attention import packed_seq_params_from_tokens
from instella_plugin.rope.apply import rope_meta, set_rope_scaling, set_rotary_base, starting_theta, theta_on_resume
from instella_plugin.rope.methods import METHODS, RopeScaling, RopeScalingError
from instella_plugin.rope.schedule import RopeSchedule
from instella_plugin.rl import loop as grpo_loop
from instella_plugin.rl.objective import GRPOStep
from instella_plugin.rl.prompts import PromptDataError, check_rows, read_rows
from instella_plugin.rl.settings import GRPOSettings, add_grpo_arguments
from instella_plugin.training import dpo
from instella_plugin.training.datasets import WeightedSamples
from instella_plugin.training.plugins import GPTPlugin, checkpoint_model
from instella_plugin.training.recipes import RecipeError, known_recipes, load_recipe
from instella_plugin.training.run_config import MODEL_FLAGS, DataPlan

# Megatron-LM model flags whose value must agree with Instella's architecture (flag: (Instella's value, why)).
_FIXED_BY_MODEL = {
    "normalization": ("RMSNorm", "Instella uses RMSNorm"),
    "position_embedding_type": ("rope", "Instella uses rotary position embeddings"),
}
# Megatron-LM switches that describe Instella's architecture (SwiGLU, no linear biases, untied output
# layer): the run's settings always say so, whether or not they were given (they can only be switched on).
_SWITCHES_OF_MODEL = {"swiglu": True, "disable_bias_linear": True, "untie_embeddings_and_output_weights": True}
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "padded_vocab_size")


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
        g.add_argument("--dataset-type", default="gpt", choices=["gpt", "sft", "dpo", "grpo"],
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
        g.add_argument("--rope-scaling", default="base-law", choices=METHODS,
                       help="RoPE context extension: base-law (the recipe's theta, Instella-Long), linear "
                            "(position interpolation), ntk (NTK-aware base), yarn")
        g.add_argument("--rope-scaling-factor", type=float,
                       help="extension factor (default: --seq-length / --rope-original-context)")
        g.add_argument("--rope-original-context", type=int, default=4096,
                       help="context the starting model was trained at (4096)")
        g.add_argument("--yarn-beta-fast", type=float, default=32.0, help="YaRN beta_fast (32)")
        g.add_argument("--yarn-beta-slow", type=float, default=1.0, help="YaRN beta_slow (1)")
        g.add_argument("--sft-loss-reduction", default="token-mean", choices=["token-mean", "sum"],
                       help="token-mean: loss averaged over the batch's tokens; sum: each sequence's token losses "
                            "summed, averaged over the batch's sequences (Instella-Math SFT 2, reduce_loss: sum)")
        add_grpo_arguments(parser)
        g.add_argument("--eval-tasks", help="downstream tasks (names, YAML paths or a suite) scored on the live "
                                            "model at each --eval-interval (docs/evaluation.md)")
        g.add_argument("--eval-tasks-data", help="local task data directory for --eval-tasks")
        g.add_argument("--eval-tasks-limit", type=int, help="first N examples of each --eval-tasks task")

    # ---- configuration -------------------------------------------------------------------------------
    def recipe(self, flags):
        if not flags.instella_recipe:
            return None
        try:
            return load_recipe(flags.instella_recipe)
        except RecipeError as e:
            raise SystemExit(f"error: {e}")

    def model_config(self, flags, given) -> InstellaConfig:
        """The preset (or, with ``--use-checkpoint-args``, the checkpoint's model) with the model flags
        the user or the recipe set; a RoPE theta nobody set comes from the starting checkpoint."""
        cfg = checkpoint_model(flags) if flags.use_checkpoint_args else get_preset(flags.model_preset or "instella-3b")
        overrides = {k: getattr(flags, k) for k in MODEL_FLAGS if k in given and getattr(flags, k) is not None}
        if "rotary_base" not in overrides:
            theta = starting_theta(flags.load or flags.pretrained_checkpoint)
            if theta is not None:
                overrides["rotary_base"] = theta
        return cfg.replace(**overrides) if overrides else cfg

    def data_plan(self, flags, model) -> DataPlan:
        """A named blend (resolved when the datasets are built, or now when iterations are counted from
        it), else Megatron-LM's data flags. ``--mock-data`` replaces a recipe's blend (dry runs). GRPO reads
        one prompt file (``--data-path FILE.jsonl|.parquet``), kept as the plan's named source."""
        if flags.dataset_type == "grpo":
            if not flags.data_path or len(flags.data_path) != 1:
                raise SystemExit("error: --dataset-type grpo needs --data-path FILE: one JSONL or Parquet file of "
                                 "prompts and ground-truth answers")
            return DataPlan(kind="grpo", named=(flags.data_path[0], ""))
        if flags.data_blend and not flags.mock_data:
            if not flags.data_root:
                raise SystemExit("error: --data-blend needs --data-root (the directory its prefixes are relative to)")
            return DataPlan(kind=flags.dataset_type, named=(flags.data_blend, flags.data_root))
        return dataclasses.replace(super().data_plan(flags, model), kind=flags.dataset_type)

    def derived_values(self, flags, model, data) -> dict:
        """Weight decay on every parameter (``--decay-all-params``) and iteration counts given as
        ``epoch`` / ``epoch:N`` (one or N passes over the blend); the architecture's switches set."""
        values = dict(_SWITCHES_OF_MODEL)
        if flags.wd_exempt_1d is None:
            values["wd_exempt_1d"] = not flags.decay_all_params
        for key in ("train_iters", "lr_decay_iters"):
            spec = getattr(flags, key)
            if not isinstance(spec, str):
                continue
            if not data.named:
                raise SystemExit(f"error: {key} = {spec!r} needs --data-blend to count tokens")
            blend = _resolve(data)
            epochs = 1.0 if spec == "epoch" else float(spec.split(":", 1)[1])
            rows = blend.split_rows("train")
            if blend.kind == "sft":
                iters = int(math.ceil(epochs * sum(r.documents for r in rows) / flags.global_batch_size))
            else:
                iters = iterations_for_tokens(epochs * sum(r.epoch_tokens for r in rows),
                                              flags.global_batch_size, model.seq_length)
            values[key] = max(iters, 1)
        return values

    def plugin_values(self, flags, model) -> dict:
        try:
            schedule = RopeSchedule.parse(flags.rope_schedule, model.rotary_base)
        except ValueError as e:
            raise SystemExit(f"error: --rope-schedule: {e}")
        try:
            scaling = RopeScaling.for_context(flags.rope_scaling, model.seq_length, flags.rope_original_context,
                                              flags.rope_scaling_factor, beta_fast=flags.yarn_beta_fast,
                                              beta_slow=flags.yarn_beta_slow)
            scaling.check_context(model.seq_length)
        except RopeScalingError as e:
            raise SystemExit(f"error: {e}")
        return {"rope": schedule, "rope_scaling": scaling}

    def check_config(self, run) -> None:
        flags = run.flags
        for flag, (value, why) in _FIXED_BY_MODEL.items():  # given explicitly (Megatron-LM's defaults differ)
            if flag in run.explicit and getattr(flags, flag) != value:
                raise SystemExit(f"error: --{flag.replace('_', '-')} {getattr(flags, flag)}: {why}; drop the flag "
                                 "(or train the stock GPT without --plugin)")
        if flags.group_query_attention and "num_query_groups" not in run.explicit:
            raise SystemExit("error: --group-query-attention needs --num-query-groups N (Instella's presets use one "
                             "KV group per head)")
        if "make_vocab_size_divisible_by" in run.explicit and "padded_vocab_size" not in run.explicit:
            raise SystemExit(f"error: --make-vocab-size-divisible-by {flags.make_vocab_size_divisible_by}: Instella "
                             f"pads its vocabulary to {run.model.padded_vocab_size} rows at every TP size; pass "
                             "--padded-vocab-size instead")
        if flags.dataset_type == "dpo":
            dpo.check_layout(run)
        try:
            run.plugin_values["rope_scaling"].check_spec(self.spec_name(run))
        except RopeScalingError as e:
            raise SystemExit(f"error: {e}")
        if flags.dataset_type == "grpo":
            grpo_loop.check_layout(run)
            try:
                self.grpo_settings(run).check(run.model.seq_length, run.layout.dp, flags.train_iters)
                check_rows(read_rows(run.data.named[0]), run.data.named[0], flags.grpo_prompt_key,
                           flags.grpo_answer_key)
            except (ValueError, PromptDataError) as e:
                raise SystemExit(f"error: {e}")
        if flags.eval_tasks:
            self._downstream_evaluation(run)  # tasks and data read now: a bad one stops the run before training
        if run.layout.cp > 1:
            if flags.cp_comm_type != "a2a" and flags.transformer_impl == "local":
                raise SystemExit(f"error: --cp-comm-type {flags.cp_comm_type} needs Transformer Engine; the local "
                                 "backend implements a2a (Ulysses) context parallelism")
            try:
                check_cp_layout(run.model.seq_length, run.layout.cp, run.model.num_attention_heads // run.layout.tp,
                                run.model.num_query_groups // run.layout.tp)
            except ValueError as e:
                raise SystemExit(f"error: {e}")

    # ---- model ---------------------------------------------------------------------------------------
    def transformer_config_overrides(self, run) -> dict:
        """YaRN's attention factor as the softmax scale (``rope.methods``)."""
        scale = run.plugin_values["rope_scaling"].softmax_scale(run.model.head_dim)
        return {} if scale is None else {"softmax_scale": scale}

    def spec_name(self, run) -> str:
        if run.flags.spec:
            return run.flags.spec[0]
        return "instella-te" if run.flags.transformer_impl == "transformer_engine" else "instella"

    def build_model(self, run, transformer_config):
        chunks = build_gpt_chunks(run.model, transformer_config, self.spec_name(run), init_seed=run.flags.seed,
                                  fused_output_loss=run.flags.fused_output_loss)
        scaling = run.plugin_values["rope_scaling"]
        if scaling.scales:
            set_rope_scaling(chunks, scaling, run.model.rotary_base)
        return chunks

    # ---- data ----------------------------------------------------------------------------------------
    def build_datasets(self, run, num_samples):
        if run.data.named:  # this call's data plan: the blend resolved (the run config stays as it is)
            blend = _resolve(run.data)
            if blend.kind == "sft" and run.data.kind == "gpt":
                raise SystemExit(f"error: blend {blend.name} holds chat data; add --dataset-type sft (chats) or "
                                 "dpo (preference pairs)")
            run = dataclasses.replace(run, data=dataclasses.replace(
                run.data, blend_per_split=tuple(blend.blend_per_split), source=blend))
        if run.data.kind in ("sft", "dpo"):
            return self._sft_datasets(run, num_samples)
        return super().build_datasets(run, num_samples)

    def _sft_datasets(self, run, num_samples):
        kind, seq = run.data.kind, run.model.seq_length

        def store(prefix):
            try:
                if kind == "dpo":
                    return PreferenceDataset(prefix, seq, pad_id=1)
                return SFTDataset(prefix, seq, pad_id=1, pack=run.flags.sft_pack)
            except ValueError as e:  # an SFT store given to DPO or the other way round
                raise SystemExit(f"error: --dataset-type {kind}: {e}")

        per_split = run.data.blend_per_split or (run.data.blend, None, None)
        out = []
        for blend, n in zip(per_split, num_samples):
            if blend is None or not n:
                out.append(None)
                continue
            out.append(WeightedSamples([store(p) for p in blend[0]], blend[1], n))
        return tuple(out)

    def batch_hook(self, run, batch):
        """Document boundaries for packed sequences (packed chats' segment ids, else EOS with
        ``--packed-documents``), then this context-parallel rank's slice."""
        segments = batch.pop("segment_ids", None)
        if segments is not None:
            batch["packed_seq_params"] = packed_seq_params_from_segments(segments)
        elif run.flags.packed_documents:
            batch["packed_seq_params"] = packed_seq_params_from_tokens(batch["tokens"], 0)
        if run.layout.cp > 1:
            batch = batch_for_cp_rank(batch)
        return batch

    # ---- objective -----------------------------------------------------------------------------------
    def check_start(self, run, resumed_own_run: bool) -> None:
        if run.data.kind == "dpo" and resumed_own_run and not run.flags.pretrained_checkpoint:
            raise SystemExit(dpo.NO_REFERENCE)
        if run.data.kind == "grpo" and resumed_own_run and not run.flags.pretrained_checkpoint:
            raise SystemExit(grpo_loop.NO_REFERENCE)

    def forward_step(self, run, transformer_config, model_chunks, *, resumed_own_run: bool, device):
        if run.data.kind == "grpo":  # the reference's log-probs are computed by the GRPO loop before updates
            return GRPOStep(run.flags.grpo_clip_eps, run.flags.grpo_kl_beta, run.flags.grpo_dual_clip)
        if run.data.kind != "dpo":
            step = super().forward_step(run, transformer_config, model_chunks,
                                        resumed_own_run=resumed_own_run, device=device)
            return partial(step, per_sequence=True) if run.flags.sft_loss_reduction == "sum" else step
        reference = dpo.build_reference(self, run, transformer_config, model_chunks, resumed_own_run, device)
        return dpo.DPOStep(reference, run.flags.dpo_beta, normalise=run.flags.dpo_loss == "dpo_norm")

    def grpo_settings(self, run) -> GRPOSettings:
        flags = run.flags
        return GRPOSettings(
            group_size=flags.grpo_group_size, prompts_per_step=flags.grpo_prompts_per_step,
            kl_beta=flags.grpo_kl_beta, clip_eps=flags.grpo_clip_eps, dual_clip=flags.grpo_dual_clip,
            temperature=flags.grpo_temperature,
            max_prompt_tokens=flags.grpo_max_prompt_tokens, max_response_tokens=flags.grpo_max_response_tokens,
            micro_batch_tokens=flags.grpo_micro_batch_tokens, prompt_key=flags.grpo_prompt_key,
            answer_key=flags.grpo_answer_key, chat_template=flags.grpo_chat_template,
            samples_interval=flags.grpo_samples_interval, rollout_engine=flags.grpo_rollout_engine,
            rollout_batch=flags.grpo_rollout_batch, global_batch_size=run.layout.global_batch_size)

    def train(self, run) -> dict:
        if run.data.kind == "grpo":
            return grpo_loop.grpo(run, self, self.grpo_settings(run))
        return super().train(run)

    # ---- RoPE, checkpoints ---------------------------------------------------------------------------
    def rope_theta(self, run, iteration: int):
        return run.plugin_values["rope"].theta_at(iteration)

    def apply_rope_theta(self, model_chunks, theta: float) -> None:
        set_rotary_base(model_chunks, theta)

    def _downstream_evaluation(self, run) -> InLoopEvaluation:
        flags = run.flags
        if getattr(self, "_downstream", None) is None:
            if run.layout.virtual_pipeline_size:
                raise SystemExit("error: --eval-tasks runs megatron-core inference, which takes one model chunk "
                                 "per rank: drop --num-layers-per-virtual-pipeline-stage or --eval-tasks")
            tokenizer = load_tokenizer(flags.tokenizer_model)
            if len(tokenizer) > run.model.padded_vocab_size:
                raise SystemExit(f"error: --eval-tasks: the tokenizer has {len(tokenizer)} ids but the model only "
                                 f"{run.model.padded_vocab_size} embedding rows; give --tokenizer-model the model's "
                                 "tokenizer or drop --eval-tasks")
            try:
                self._downstream = InLoopEvaluation(flags.eval_tasks, flags.eval_tasks_data, flags.eval_tasks_limit,
                                                    tokenizer, run.model.seq_length,
                                                    batch_size=max(run.layout.micro_batch_size, 4))
            except (ValueError, OSError) as e:
                raise SystemExit(f"error: --eval-tasks: {e}")
        return self._downstream

    def downstream_eval(self, run, model_chunks, iteration: int) -> dict:
        """--eval-tasks scores on the live model (weights shared with the trainer, no save/reload)."""
        return self._downstream_evaluation(run)(model_chunks) if run.flags.eval_tasks else {}

    def checkpoint_meta(self, run, iteration: int = 0) -> dict:
        rope, last = run.plugin_values["rope"], max(iteration - 1, 0)
        meta = {"spec": self.spec_name(run), "rotary_base": float(run.model.rotary_base),
                "seq_length": run.model.seq_length, "tokenizer": run.flags.tokenizer_model or "instella",
                "tokenizer_type": run.flags.tokenizer_type,
                "recipe": run.recipe["name"] if run.recipe else None}
        meta.update(rope_meta(rope.theta_at(last), last, rope.describe()))
        meta["rope_scaling"] = run.plugin_values["rope_scaling"].to_meta()
        if run.data.kind == "grpo":  # the step (data position, sampling seeds) and where the KL reference came from
            meta["grpo"] = {"step": iteration // self.grpo_settings(run).updates_per_step,
                            "reference": run.flags.pretrained_checkpoint or "the run's initial weights"}
        return meta

    def check_resume(self, run, meta: dict) -> None:
        flags = run.flags
        try:
            theta_on_resume(meta, run.plugin_values["rope"], meta.get("iteration", 0), flags.override_rope_theta)
        except ValueError as e:
            raise SystemExit(f"error: --load {flags.load}: {e}")
        scaling = run.plugin_values["rope_scaling"]
        if not scaling.same_as(meta.get("rope_scaling")) and not flags.override_rope_theta:
            raise SystemExit(f"error: --load {flags.load}: the checkpoint was trained with RoPE "
                             f"{RopeScaling.from_meta(meta.get('rope_scaling')).describe()} but this run asks for "
                             f"{scaling.describe()}; changing the RoPE method needs --override-rope-theta "
                             "(a new context-extension phase), otherwise keep the checkpoint's --rope-scaling")
        saved = meta.get("model")
        if saved and not flags.use_checkpoint_args:
            diff = [f"{k}: checkpoint {saved.get(k)} vs requested {getattr(run.model, k)}" for k in SHAPE_KEYS
                    if saved.get(k) != getattr(run.model, k)]
            if diff:
                raise SystemExit(f"error: --load {flags.load} holds a different model:\n  " + "\n  ".join(diff)
                                 + "\npass --use-checkpoint-args to take the checkpoint's configuration")


def _resolve(data: DataPlan):
    try:
        return resolve_blend(*data.named)
    except (BlendError, ValueError) as e:
        raise SystemExit(f"error: {e}")

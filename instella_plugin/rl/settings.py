"""GRPO settings: the flags (``--grpo-*``), their typed frozen view, and the checks made before anything
is built or generated.

Batch arithmetic (Megatron-LM's reading of the same names): a GRPO *step* samples
``--grpo-group-size`` rollouts for each of ``--grpo-prompts-per-step`` prompts; ``--global-batch-size``
counts the rollouts (sequences) of one optimizer update (a PPO mini-batch), so a step makes
``prompts * n / global_batch`` updates (one PPO epoch) and ``--train-iters`` counts updates. Instella-Math
stage 1: 128 prompts x 8 rollouts, mini-batch 32 prompts = 256 sequences, 4 updates a step, 1200 steps
= 4800 iterations.
"""
import argparse
from dataclasses import dataclass

from instella_plugin.flag_types import positive_float, positive_int


def add_grpo_arguments(parser) -> None:
    g = parser.add_argument_group("GRPO (--dataset-type grpo)")
    g.add_argument("--grpo-group-size", type=positive_int, default=8, help="rollouts per prompt (n)")
    g.add_argument("--grpo-prompts-per-step", type=positive_int, default=128, help="prompts per rollout step")
    g.add_argument("--grpo-kl-beta", type=float, default=0.001,
                   help="coefficient of the k3 KL loss to the frozen reference model (0 turns it off)")
    g.add_argument("--grpo-clip-eps", type=positive_float, default=0.2, help="PPO clip range of the ratio")
    g.add_argument("--grpo-dual-clip", type=float, default=3.0,
                   help="dual-clip bound c: a token with a negative advantage A loses at most -A * c (VERL's "
                        "clip_ratio_c, default 3; must be > 1; 0 turns it off)")
    g.add_argument("--grpo-temperature", type=positive_float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--grpo-max-prompt-tokens", type=positive_int, default=512,
                   help="longer prompts are filtered out (and counted)")
    g.add_argument("--grpo-max-response-tokens", type=positive_int, default=1024, help="rollout length limit")
    g.add_argument("--grpo-micro-batch-tokens", type=positive_int, default=17000,
                   help="token budget of one update micro-batch (padded rows x length)")
    g.add_argument("--grpo-prompt-key", default="prompt", help="prompt field of the JSONL/Parquet rows")
    g.add_argument("--grpo-answer-key", default="answer", help="ground-truth answer field of the rows")
    g.add_argument("--grpo-chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap each prompt as a user turn of Instella's chat template (off: the text as it is)")
    g.add_argument("--grpo-rollout-engine", default="megatron", choices=["megatron", "plain"],
                   help="megatron: megatron-core's inference engine on the live policy (KV cache); plain: a "
                        "forward pass over the whole sequence per token (no cache; a reference for tests)")
    g.add_argument("--grpo-rollout-batch", type=positive_int, default=64,
                   help="rollouts generated together (the engine's KV cache holds this many sequences)")
    g.add_argument("--grpo-samples-interval", type=positive_int, default=10,
                   help="write the step's rollouts (text, reward) to SAVE/grpo_rollouts.jsonl every N steps")


@dataclass(frozen=True)
class GRPOSettings:
    group_size: int
    prompts_per_step: int
    kl_beta: float
    clip_eps: float
    dual_clip: float  # 0: off
    temperature: float
    max_prompt_tokens: int
    max_response_tokens: int
    micro_batch_tokens: int
    prompt_key: str
    answer_key: str
    chat_template: bool
    samples_interval: int
    rollout_engine: str
    rollout_batch: int
    global_batch_size: int  # rollouts per optimizer update

    @property
    def minibatch_prompts(self) -> int:
        return self.global_batch_size // self.group_size

    @property
    def updates_per_step(self) -> int:
        return self.prompts_per_step // self.minibatch_prompts

    def check(self, seq_length: int, data_parallel: int, train_iters: int) -> None:
        """ValueError naming the problem and the fix; called when the run configuration is built."""
        n = self.group_size
        if n < 2:
            raise ValueError(f"--grpo-group-size {n}: GRPO normalises rewards within each prompt's group, which "
                             "needs at least 2 rollouts per prompt")
        if self.global_batch_size % n:
            raise ValueError(f"--global-batch-size {self.global_batch_size} (rollouts per optimizer update) is not a "
                             f"multiple of --grpo-group-size {n}: a mini-batch holds whole groups")
        if self.prompts_per_step % self.minibatch_prompts:
            raise ValueError(f"a mini-batch of {self.minibatch_prompts} prompts (--global-batch-size "
                             f"{self.global_batch_size} / --grpo-group-size {n}) does not divide "
                             f"--grpo-prompts-per-step {self.prompts_per_step}")
        if self.minibatch_prompts % data_parallel:
            raise ValueError(f"a mini-batch of {self.minibatch_prompts} prompts does not split over {data_parallel} "
                             "data-parallel ranks (each rank keeps whole groups)")
        total = self.max_prompt_tokens + self.max_response_tokens
        if total > seq_length:
            raise ValueError(f"--grpo-max-prompt-tokens {self.max_prompt_tokens} + --grpo-max-response-tokens "
                             f"{self.max_response_tokens} = {total} is beyond the context (--seq-length {seq_length})")
        if train_iters % self.updates_per_step:
            raise ValueError(f"--train-iters {train_iters} counts optimizer updates; a GRPO step makes "
                             f"{self.updates_per_step}: give a multiple of it (steps x {self.updates_per_step})")
        if self.dual_clip != 0 and not self.dual_clip > 1:
            raise ValueError(f"--grpo-dual-clip {self.dual_clip}: the dual clip bounds -A * ratio for ratios above c, "
                             "so c must be > 1 (VERL's default is 3); give 0 to turn it off")
        if self.kl_beta < 0:
            raise ValueError(f"--grpo-kl-beta {self.kl_beta} must be >= 0")

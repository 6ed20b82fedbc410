"""The GRPO outer loop: it builds the ``Trainer`` and alternates rollouts with its ``train_step``.

One step (Instella-Math, VERL's schedule):
1. the step's prompts (``--grpo-prompts-per-step``, a seeded order: ``prompts.problem_order``); each
   data-parallel rank takes its share of every mini-batch, whole groups;
2. n rollouts per prompt from the live policy through a ``TextGenerator``: megatron-core's inference
   engine on the policy's weights in place (``inference.engine.MegatronGenerator``, KV cache), or
   ``sampler.LiveModelSampler`` (``--grpo-rollout-engine plain``), or one handed in; sampled with a seed
   that depends only on (seed, step, DP rank);
3. rule rewards (``reward.math_reward`` against each row's answer) and group-normalised advantages;
4. the rollout policy's and the frozen reference's log-probabilities of every response token
   (no-grad forwards, vocab-parallel), and the rollout policy's entropy;
5. one PPO epoch: ``prompts / mini-batch`` optimizer updates, each ``Trainer.train_step`` over
   token-budget micro-batches (``--grpo-micro-batch-tokens``) with ``objective.GRPOStep``.
Checkpoints are the trainer's (policy, optimizer, scheduler, RNG, iteration), taken at step boundaries;
the step and the data position follow from the iteration (``iteration / updates per step``), the
sampling seeds from the step, so a resubmitted run continues exactly. The reference model is the
policy's starting weights, or ``--pretrained-checkpoint`` when the run resumes from its own checkpoint.
Pipeline and context parallelism are refused (``check_layout``): the sampler and the scoring passes run
one model chunk over whole sequences.
"""
import time
from typing import Callable, List, Optional

import torch
from megatron.core import parallel_state as ps

from instella_plugin.data.tokenizer import load_tokenizer
from instella_plugin.inference.api import SamplingParams
from instella_plugin.inference.engine import MegatronGenerator
from instella_plugin.model.fused_output_loss import set_expected_loss_grad
from instella_plugin.rl.advantages import group_advantages
from instella_plugin.rl.metrics import GRPOLog, StepTotals
from instella_plugin.rl.objective import vocab_parallel_logprobs_and_entropy
from instella_plugin.rl.prompts import load_problems, problem_order
from instella_plugin.rl.reward import math_reward
from instella_plugin.rl.sampler import LiveModelSampler
from instella_plugin.rl.settings import GRPOSettings
from instella_plugin.training import dpo
from instella_plugin.training.loop import stop_reason
from instella_plugin.training.signals import ExitSignalHandler
from instella_plugin.training.trainer import Trainer

PAD_ID = 1
NO_REFERENCE = ("error: a GRPO run resumed from its own checkpoint needs --pretrained-checkpoint: the KL term's "
                "reference model is the checkpoint the run started from")


def check_layout(run) -> None:
    if run.layout.pp > 1 or run.layout.cp > 1:
        raise SystemExit("error: --dataset-type grpo generates and scores with one model chunk over whole sequences: "
                         "use tensor and data parallelism (PP = CP = 1)")
    if run.flags.packed_documents:
        raise SystemExit("error: --dataset-type grpo trains one rollout per row: drop --packed-documents")


def sampling_seed(seed: int, step: int, dp_rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + dp_rank * 104_729) % (2 ** 31 - 1)


def token_budget_groups(lengths: List[int], budget: int) -> List[List[int]]:
    """Consecutive rows grouped so that rows x longest row <= budget (a longer row goes alone)."""
    groups, current, longest = [], [], 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def _pad(rows: List[List], value, dtype, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=dtype)
    return out.to(device)


class Rollouts:
    """A step's rollouts on this rank: token sequences, response masks, rewards, advantages, log-probs."""

    def __init__(self, completions, rewards: List[float], group_size: int):
        self.sequences = [list(c.prompt_tokens) + list(c.tokens) for c in completions]
        self.prompt_lengths = [len(c.prompt_tokens) for c in completions]
        self.response_lengths = [len(c.tokens) for c in completions]
        self.clipped = [c.finish_reason == "length" for c in completions]
        self.rewards = rewards
        self.advantages = group_advantages(torch.tensor(rewards), group_size).tolist()
        self.old_logprobs: List[torch.Tensor] = [None] * len(completions)  # [len - 1] per row, CPU float32
        self.ref_logprobs: List[torch.Tensor] = [None] * len(completions)
        self.entropy_sum = 0.0

    def __len__(self):
        return len(self.sequences)

    def fields(self, i: int) -> dict:
        """Row i as model inputs: tokens/labels shifted by one, loss mask on the response's labels."""
        seq = self.sequences[i]
        labels = seq[1:]
        first = self.prompt_lengths[i] - 1  # the label of position first is the first response token
        return {"tokens": seq[:-1], "labels": labels, "position_ids": list(range(len(seq) - 1)),
                "loss_mask": [0.0] * first + [1.0] * (len(labels) - first)}

    def batch(self, rows: List[int], device, with_logprobs: bool = True) -> dict:
        parts = [self.fields(i) for i in rows]
        batch = {"tokens": _pad([p["tokens"] for p in parts], PAD_ID, torch.long, device),
                 "labels": _pad([p["labels"] for p in parts], PAD_ID, torch.long, device),
                 "position_ids": _pad([p["position_ids"] for p in parts], 0, torch.long, device),
                 "loss_mask": _pad([p["loss_mask"] for p in parts], 0.0, torch.float32, device)}
        if with_logprobs:
            batch["old_logprobs"] = _pad([self.old_logprobs[i] for i in rows], 0.0, torch.float32, device)
            batch["ref_logprobs"] = _pad([self.ref_logprobs[i] for i in rows], 0.0, torch.float32, device)
            batch["advantages"] = torch.tensor([self.advantages[i] for i in rows], dtype=torch.float32, device=device)
        return batch


@torch.no_grad()
def score(model, rollouts: Rollouts, rows: List[int], budget: int, device, target: str) -> None:
    """Fill ``rollouts.<target>`` (old_logprobs / ref_logprobs) for ``rows`` with the model's log-probs of
    each label; the rollout policy's pass also sums the entropy over response tokens."""
    was_training = model.training
    model.eval()
    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    lengths = [len(rollouts.sequences[i]) - 1 for i in rows]
    for chunk in token_budget_groups(lengths, budget):
        ids = [rows[j] for j in chunk]
        batch = rollouts.batch(ids, device, with_logprobs=False)
        logits = model(batch["tokens"], batch["position_ids"], None)
        logp, entropy = vocab_parallel_logprobs_and_entropy(logits, batch["labels"], group)
        for k, i in enumerate(ids):
            getattr(rollouts, target)[i] = logp[k, :lengths[chunk[k]]].float().cpu()
        if target == "old_logprobs":
            rollouts.entropy_sum += float((entropy * batch["loss_mask"]).sum())
    model.train(was_training)


def grpo(run, plugin, settings: GRPOSettings, reward_fn: Callable[[str, str], float] = math_reward,
         generator=None) -> dict:
    """Run GRPO as the run config says; return {"step", "iteration", "records"} (records on the reporting rank).

    ``reward_fn(response_text, answer) -> float`` and ``generator`` (a ``TextGenerator``; default: as
    ``--grpo-rollout-engine`` says) are the two seams tests and other tasks replace.
    """
    flags = run.flags
    tokenizer = load_tokenizer(flags.tokenizer_model)  # bad data fails here, before any model is built
    problems, too_long = load_problems(run.data.named[0], tokenizer, settings.prompt_key, settings.answer_key,
                                       settings.max_prompt_tokens, settings.chat_template)
    trainer = Trainer(run, plugin)
    set_expected_loss_grad(trainer.model, None)  # per-token gradients follow the advantages: nothing to precompute
    step_fn = trainer.forward_step
    reference = dpo.build_reference(plugin, run, trainer.transformer_config, trainer.model, trainer.resumed_own_run,
                                    trainer.device)[0]
    if generator is None and settings.rollout_engine == "megatron":
        generator = MegatronGenerator(trainer.model[0], tokenizer, max_batch_size=settings.rollout_batch,
                                      max_sequence_length=settings.max_prompt_tokens + settings.max_response_tokens)
    elif generator is None:
        generator = LiveModelSampler(trainer.model, tokenizer, run.model.vocab_size, trainer.device,
                                     batch_tokens=settings.micro_batch_tokens)
    n, updates = settings.group_size, settings.updates_per_step
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    dp_group = ps.get_data_parallel_group()
    per_rank = settings.minibatch_prompts // dp_size  # prompts of one mini-batch on this rank
    total_steps = flags.train_iters // updates
    step = trainer.iteration // updates
    report = torch.distributed.get_rank() == 0
    log = GRPOLog(flags.save, total_steps, step, report, plot=not flags.no_plot)
    if report:
        print(f"grpo: {len(problems)} prompts ({too_long} longer than {settings.max_prompt_tokens} tokens filtered "
              f"out); {settings.prompts_per_step} prompts x {n} rollouts a step, {updates} updates a step, "
              f"steps {step} -> {total_steps}", flush=True)
    records = {}
    handler = ExitSignalHandler() if flags.exit_signal_handler else None
    start_time = time.time()
    while step < total_steps:
        t_start = time.time()
        order = problem_order(len(problems), flags.seed, step * settings.prompts_per_step, settings.prompts_per_step)
        mine = [order[k * settings.minibatch_prompts + dp_rank * per_rank + j]
                for k in range(updates) for j in range(per_rank)]
        prompts = [problems[i].prompt_ids for i in mine for _ in range(n)]
        answers = [problems[i].answer for i in mine for _ in range(n)]
        params = SamplingParams(max_new_tokens=settings.max_response_tokens, temperature=settings.temperature,
                                seed=sampling_seed(flags.seed, step, dp_rank))
        completions = generator.generate(prompts, params)
        t_rollout = time.time()
        rewards = [float(reward_fn(c.text, a)) for c, a in zip(completions, answers)]
        rollouts = Rollouts(completions, rewards, n)
        everything = list(range(len(rollouts)))
        score(trainer.model[0], rollouts, everything, settings.micro_batch_tokens, trainer.device, "old_logprobs")
        score(reference, rollouts, everything, settings.micro_batch_tokens, trainer.device, "ref_logprobs")
        t_scored = time.time()
        rows_per_update = per_rank * n
        losses, grad_norms = [], []
        for k in range(updates):
            rows = everything[k * rows_per_update:(k + 1) * rows_per_update]
            lengths = [len(rollouts.sequences[i]) - 1 for i in rows]
            batches = [rollouts.batch([rows[j] for j in chunk], trainer.device)
                       for chunk in token_budget_groups(lengths, settings.micro_batch_tokens)]
            m = trainer.train_step(batches)
            losses.append(m["loss"])
            grad_norms.append(m["grad_norm"])
        t_end = time.time()
        step += 1
        stats = step_fn.take_stats().tolist()
        totals = StepTotals(
            rollouts=len(rollouts), reward_sum=sum(rewards), reward_sq_sum=sum(r * r for r in rewards),
            correct=sum(1 for r in rewards if r == 1.0), response_tokens=sum(rollouts.response_lengths),
            clipped=sum(rollouts.clipped), entropy_sum=rollouts.entropy_sum, train_tokens=stats[0], pg_sum=stats[1],
            kl_sum=stats[2], clip_count=stats[3], dual_clip_count=stats[4], response_max=max(rollouts.response_lengths),
            sequence_tokens=sum(len(q) for q in rollouts.sequences)).reduced(dp_group)
        timing = {"rollout_s": t_rollout - t_start, "score_s": t_scored - t_rollout, "update_s": t_end - t_scored,
                  "rollout_tokens_per_s": totals.response_tokens / max(t_rollout - t_start, 1e-9),
                  "train_tokens_per_s": totals.sequence_tokens / max(t_end - t_scored, 1e-9)}
        reported = [x for x in losses if x is not None]
        extra = {"loss": sum(reported) / len(reported) if reported else None, "grad_norm": grad_norms[-1], "lr": trainer.optimizer.param_groups[0]["lr"],
                 "filtered_prompts": too_long}
        records[step] = log.step(step, trainer.iteration, totals, timing, extra)
        if step % settings.samples_interval == 0 or step == 1:
            log.rollouts(step, [{"prompt": tokenizer.decode(c.prompt_tokens), "response": c.text, "answer": a,
                                 "reward": r, "finish_reason": c.finish_reason}
                                for c, a, r in zip(completions, answers, rewards)])
        if flags.save and flags.save_interval and step % flags.save_interval == 0:
            trainer.save()
        reason = stop_reason(flags, step, start_time, handler)
        if reason:
            if report:
                print(f"exiting at GRPO step {step}: {reason}", flush=True)
            break
    if flags.save and trainer.checkpoint_iteration != trainer.iteration:
        trainer.save()
    path = log.finish()
    if path:
        print(f"GRPO curves written to {path}", flush=True)
    return {"step": step, "iteration": trainer.iteration, "records": records}

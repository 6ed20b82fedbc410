"""What a GRPO run reports: one record per step (printed, appended to ``SAVE/grpo_log.jsonl``), the
step's rollouts every N steps (``SAVE/grpo_rollouts.jsonl``: prompt, response, answer, reward) and a
plot of reward, accuracy and response length (``SAVE/grpo_curves.png``) at the end.

Per-step figures are sums over this data-parallel rank's rollouts and updates, all-reduced over the
data-parallel group before they are turned into means (``StepTotals``), so every figure covers the
whole step whatever the layout.
"""
import json
import os
import time
from dataclasses import dataclass, fields
from typing import List, Optional

import torch

from instella_plugin.training.collectives import all_reduce_host
from instella_plugin.training.progress import save_figure


@dataclass
class StepTotals:
    """Sums over one step's rollouts and updates (this rank's until ``reduced``)."""
    rollouts: float = 0.0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    correct: float = 0.0            # rewards of 1 (the rule reward is 0/1)
    response_tokens: float = 0.0
    clipped: float = 0.0            # responses cut at the length limit
    entropy_sum: float = 0.0        # over response tokens, rollout policy
    train_tokens: float = 0.0       # response tokens seen by the updates
    sequence_tokens: float = 0.0    # prompt + response tokens of the rollouts (what each update pass reads)
    pg_sum: float = 0.0
    kl_sum: float = 0.0
    clip_count: float = 0.0         # tokens whose PPO clip was active
    dual_clip_count: float = 0.0    # tokens (negative advantage) whose loss the dual clip bounded
    response_max: float = 0.0

    def reduced(self, group) -> "StepTotals":
        names = [f.name for f in fields(self) if f.name != "response_max"]
        sums = torch.tensor([getattr(self, n) for n in names], dtype=torch.float64)
        top = torch.tensor([self.response_max], dtype=torch.float64)
        sums = all_reduce_host(sums, group=group)
        top = all_reduce_host(top, op=torch.distributed.ReduceOp.MAX, group=group)
        return StepTotals(**dict(zip(names, sums.tolist())), response_max=float(top))

    def record(self) -> dict:
        n, t = max(self.rollouts, 1.0), max(self.train_tokens, 1.0)
        mean = self.reward_sum / n
        return {"rollouts": int(self.rollouts), "reward_mean": mean, "reward_std": max(self.reward_sq_sum / n - mean * mean, 0.0) ** 0.5,
                "accuracy": self.correct / n, "response_length_mean": self.response_tokens / n,
                "response_length_max": self.response_max, "response_clipped_fraction": self.clipped / n,
                "entropy": self.entropy_sum / max(self.response_tokens, 1.0), "kl": self.kl_sum / t,
                "pg_loss": self.pg_sum / t, "clip_fraction": self.clip_count / t,
                "dual_clip_fraction": self.dual_clip_count / t}


class GRPOLog:
    """Printing and files on the reporting rank; a no-op elsewhere."""

    def __init__(self, save_dir: Optional[str], total_steps: int, start_step: int, report: bool, plot: bool):
        self.save_dir, self.total_steps, self.report, self.plot = save_dir, total_steps, report, plot
        self.start_step, self.t0 = start_step, time.time()
        self.log = self.samples = None
        if report and save_dir:
            os.makedirs(save_dir, exist_ok=True)
            self.log = open(os.path.join(save_dir, "grpo_log.jsonl"), "a", encoding="utf-8")
            self.samples = open(os.path.join(save_dir, "grpo_rollouts.jsonl"), "a", encoding="utf-8")

    def step(self, step: int, iteration: int, totals: StepTotals, timing: dict, extra: dict) -> dict:
        record = {"step": step, "iteration": iteration, **totals.record(), **timing, **extra}
        if not self.report:
            return record
        done = step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total_steps - step)
        share = timing["rollout_s"] / max(timing["rollout_s"] + timing["score_s"] + timing["update_s"], 1e-9)
        print(f"grpo step {step:>5}/{self.total_steps} | reward {record['reward_mean']:.3f} +- "
              f"{record['reward_std']:.3f} | acc {record['accuracy']:.3f} | kl {record['kl']:.2e} | clip "
              f"{record['clip_fraction']:.3f} | entropy {record['entropy']:.3f} | len "
              f"{record['response_length_mean']:.0f}/{record['response_length_max']:.0f} "
              f"({100 * record['response_clipped_fraction']:.0f}% clipped) | rollout "
              f"{timing['rollout_tokens_per_s']:,.0f} tok/s | train {timing['train_tokens_per_s']:,.0f} tok/s | "
              f"rollout {100 * share:.0f}% of step | ETA {_hms(eta)}", flush=True)
        if self.log:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        return record

    def rollouts(self, step: int, rows: List[dict]) -> None:
        if self.samples:
            for row in rows:
                self.samples.write(json.dumps({"step": step, **row}) + "\n")
            self.samples.flush()

    def finish(self) -> Optional[str]:
        if not self.report:
            return None
        for f in (self.log, self.samples):
            if f:
                f.close()
        if self.plot and self.save_dir:
            return plot_curves(os.path.join(self.save_dir, "grpo_log.jsonl"),
                               os.path.join(self.save_dir, "grpo_curves.png"))
        return None


def read_log(path: str) -> dict:
    """{step: record} of a grpo_log.jsonl (a resubmitted run's records replace the earlier ones)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r
    return out


def plot_curves(jsonl_path: str, png_path: str) -> Optional[str]:
    """Reward, accuracy and mean response length per step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(jsonl_path)
    steps = sorted(records)
    if not steps:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(steps, [records[s]["reward_mean"] for s in steps], label="reward mean")
    ax1.plot(steps, [records[s]["accuracy"] for s in steps], label="accuracy")
    ax1.set_xlabel("GRPO step")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [records[s]["response_length_mean"] for s in steps], label="mean response length")
    ax2.set_xlabel("GRPO step")
    ax2.set_ylabel("tokens")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png_path, dpi=100)
    return png_path


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

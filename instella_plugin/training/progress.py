"""Progress reporting: log lines, throughput, model TFLOP/s and MFU, TensorBoard/wandb, JSONL, loss plot."""
import json
import os
import time
from typing import Optional

import torch

# Dense bf16 peak TFLOP/s per device (vendor specs), for MFU.
PEAK_TFLOPS = {"MI300X": 1307.0, "MI325X": 1307.0, "MI250X": 383.0, "H200": 989.0, "H100": 989.0, "A100": 312.0}


def save_figure(fig, path: str, dpi=100) -> None:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def device_peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper().replace(" ", "")
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def train_flops_per_token(cfg) -> float:
    """Model FLOPs per trained token (forward + backward, no recompute), Megatron-LM's accounting."""
    h, f, layers, s = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.seq_length
    matmul_params = layers * (h * (h + 2 * cfg.kv_width) + h * h + 3 * h * f) + cfg.padded_vocab_size * h
    attention = layers * 2 * 2 * h * s  # QK^T and PV, per token, forward
    return 6 * matmul_params + 3 * attention


class Progress:
    """Collects per-step figures; prints every ``log_interval`` on the reporting rank."""

    def __init__(self, run, start_iteration: int, is_reporting_rank: bool, sequences_per_sample: int = 1):
        flags, cfg = run.flags, run.model
        self.flags, self.cfg = flags, cfg
        self.sequences_per_sample = sequences_per_sample  # 2 for a DPO pair
        self.report = is_reporting_rank
        self.start_iteration = start_iteration
        self.t0 = self.t_last = time.time()
        self.last_iter = start_iteration
        self.flops_per_token = train_flops_per_token(cfg)
        self.peak = device_peak_tflops()
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.history = []
        self.tb = self.wandb = None
        self.jsonl = None
        if self.report and flags.save:
            os.makedirs(flags.save, exist_ok=True)
            self.jsonl = open(os.path.join(flags.save, "train_log.jsonl"), "a", encoding="utf-8")
        if self.report and flags.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(flags.tensorboard_dir)
        if self.report and flags.wandb_project:
            import wandb

            self.wandb = wandb.init(project=flags.wandb_project, name=flags.wandb_exp_name,
                                    dir=flags.wandb_save_dir or flags.save, config=flags.as_dict(),
                                    mode=os.environ.get("WANDB_MODE", "offline"))

    def step(self, iteration: int, loss: Optional[float], lr: float, grad_norm: Optional[float], theta=None):
        if self.report and loss is not None:
            self.history.append((iteration, loss))
        if iteration % self.flags.log_interval and iteration != self.flags.train_iters:
            if self.report:  # every step's loss goes to the JSONL (exact-resume checks, plots)
                self._write({"iteration": iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm}, iteration,
                            scalars=False)
            return
        now = time.time()
        steps = iteration - self.last_iter
        dt = (now - self.t_last) / max(steps, 1)
        tokens = self.sequences_per_sample * self.flags.global_batch_size * self.cfg.seq_length
        tokens_per_s = tokens / dt if dt > 0 else 0.0
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12
        mfu = f"{100 * tflops / self.peak:.1f}%" if self.peak else "n/a"
        remaining = (self.flags.train_iters - iteration) * dt
        mem = (f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available()
               else f"{_rss_gib():.1f} GiB RSS")
        self.t_last, self.last_iter = now, iteration
        if not self.report:
            return
        gn = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
        line = (f"iteration {iteration:>7}/{self.flags.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {gn} | "
                f"{dt * 1000:.0f} ms/step | {tokens_per_s:,.0f} tokens/s | {tflops:.2f} TFLOP/s/device | MFU {mfu} | "
                f"mem {mem} | ETA {_hms(remaining)}")
        if theta is not None:
            line += f" | rope theta {theta:,.0f}"
        print(line, flush=True)
        record = {"iteration": iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "ms_per_step": dt * 1000}
        if theta is not None:
            record["rope_theta"] = theta
        self._write(record, iteration)

    def eval(self, iteration: int, loss: Optional[float], scores: Optional[dict] = None):
        """Validation loss and downstream task scores ({"task/metric": value}, logged as eval/task/metric)."""
        if not self.report:
            return
        parts = [] if loss is None else [f"eval loss {loss:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in (scores or {}).items()]
        print(f"eval at iteration {iteration} | " + " | ".join(parts), flush=True)
        record = {"iteration": iteration, **({} if loss is None else {"eval_loss": loss})}
        record.update({f"eval/{k}": v for k, v in (scores or {}).items()})
        self._write(record, iteration)

    def _write(self, record, iteration, scalars=True):
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if not scalars:
            return
        for k, v in record.items():
            if k != "iteration" and v is not None:
                if self.tb:
                    self.tb.add_scalar(k, v, iteration)
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "iteration"}, step=iteration)

    def finish(self):
        if not self.report:
            return
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.history and self.flags.save and not self.flags.no_plot:
            path = plot_loss(os.path.join(self.flags.save, "train_log.jsonl"), os.path.join(self.flags.save, "loss.png"))
            if path:
                print(f"loss curve written to {path}", flush=True)
            path = plot_eval_scores(os.path.join(self.flags.save, "train_log.jsonl"),
                                    os.path.join(self.flags.save, "eval_scores.png"))
            if path:
                print(f"downstream scores written to {path}", flush=True)


def plot_loss(jsonl_path: str, png_path: str) -> Optional[str]:
    """Plot train (and eval) loss from a train_log.jsonl (all runs appended to it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot", flush=True)
        return None
    train, evals = {}, {}
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r and r["loss"] is not None:
                train[r["iteration"]] = r["loss"]
            if "eval_loss" in r:
                evals[r["iteration"]] = r["eval_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train), [train[k] for k in sorted(train)], label="train loss")
    if evals:
        ax.plot(sorted(evals), [evals[k] for k in sorted(evals)], "o-", label="eval loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png_path, dpi=100)
    return png_path


def plot_eval_scores(jsonl_path: str, png_path: str) -> Optional[str]:
    """The loss plot's companion: each downstream score (``eval/TASK/METRIC``) against iteration; None if none."""
    scores = {}
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            for k, v in r.items():
                if k.startswith("eval/"):
                    scores.setdefault(k[len("eval/"):], {})[r["iteration"]] = v
    if not scores:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in sorted(scores.items()):
        ax.plot(sorted(points), [points[k] for k in sorted(points)], "o-", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png_path, dpi=100)
    return png_path


def _rss_gib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        return 0.0


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

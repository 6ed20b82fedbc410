"""Trainer step time on CPU: the cost of Instella's full-width QK-norm over megatron's per-head one on the same
model, megatron's stock QK-norm GPT, and a plain PyTorch loop.

Shape (the trainer issue's): hidden 1024, 8 layers, 16 heads of 64, SwiGLU FFN 2816, sequence 1024,
micro-batch 2 (global batch 2), vocabularies 1024 (so the transformer layers, not the output layer,
dominate) and Instella's 50304 (where the output layer and the loss weigh: ``instella`` runs the fused
output layer + loss, ``--fused-output-loss``, its default), fp32, mock data. Variants, all built and
stepped inside one process per TP size:

- ``instella``: ``pretrain_gpt.py --plugin instella`` with explicit model flags: pre-norm RMSNorm,
  full-width QK-norm before RoPE (its sum of squares all-reduced over TP), untied embeddings.
- ``per-head qk-norm``: the same model, weights and core attention with megatron's per-head QK-norm in
  place of the full-width one: the module ``qk_layernorm=True`` puts in megatron's local spec
  (``WrappedTorchNorm`` = ``torch.nn.RMSNorm`` over head_dim, from ``LocalSpecProvider``), with
  ``qk_layernorm=True`` in the config so megatron all-reduces its gradients over TP as it does in its
  own spec. The spec is the ``instella`` provider with that one method changed. This is the baseline
  of (a): the QK-norm overhead compares like with like.
- ``stock qk-norm``: ``pretrain_gpt.py`` without a plugin, ``--qk-layernorm``: megatron's local GPT
  spec as shipped, per-head QK RMSNorm, pre-norm RMSNorm (``torch.nn.RMSNorm``), the same
  SwiGLU/no-bias/untied settings (``GPTPlugin``), and megatron's own core attention (scores
  materialised), so its ratio also holds the attention difference. For reference.
- ``hf loop sdpa`` (TP=1 only): transformers' ``OlmoeForCausalLM`` with one expert (Instella's
  function), its default attention (torch SDPA), ``torch.optim.AdamW``, grad clipping 1.0, a plain
  Python loop. This is the baseline of (b). ``--hf-attn sdpa eager`` adds the same loop with
  transformers' eager attention (scores materialised, like megatron's local ``DotProductAttention``
  of the stock spec), which tells how much of a gap is attention.

Every step of the megatron variants is the trainer loop's own iteration (``loop.pretrain``):
zero the DDP grad buffers, megatron's forward-backward schedule over the micro-batches, the
distributed loss reduction, the megatron optimizer step (with clipping), the LR scheduler. The
variants take turns step by step (A, B, C, A, B, C, ...) so that load from other users of a shared
machine falls on all of them alike; the first ``--warmup`` steps of each are dropped and medians are
reported. Wall time is the figure of merit; process CPU time (all threads, rank 0) is recorded too,
as a cross-check that is less sensitive to other users' load. TP=2 runs two gloo ranks with one thread
each (the trainer's own thread split).

Appends to bench/results/trainer.json and plots bench/results/trainer.png.

    python bench/bench_trainer.py                      # TP 1 and 2, vocab 1024 and 50304, 2 timed steps each
    python bench/bench_trainer.py --tp 1 --vocab 50304 --reps 3   # Instella's vocabulary only
    python bench/bench_trainer.py --tp 1 --reps 4      # more repetitions
    python bench/bench_trainer.py --layers 2           # quicker, same per-layer ratios
    python bench/bench_trainer.py --tp 1 --hf-attn sdpa eager   # attribute a gap to attention
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from instella_plugin.plugin import InstellaPlugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
TARGETS = {1: 0.05, 2: 0.10}  # allowed QK-norm overhead of instella over per-head qk-norm, by TP size
BASELINE = "per-head qk-norm"
PER_HEAD_SPEC = "bench-per-head-qk-norm"


def shape_flags(a) -> list:
    return ["--num-layers", a.layers, "--hidden-size", a.hidden, "--num-attention-heads", a.heads,
            "--ffn-hidden-size", a.ffn, "--seq-length", a.seq, "--max-position-embeddings", a.seq,
            "--vocab-size", a.vocab, "--padded-vocab-size", a.vocab]


def trainer_argv(a, variant: str) -> list:
    common = ["--micro-batch-size", a.mbs, "--global-batch-size", a.mbs, "--tensor-model-parallel-size", a.tp_size,
              "--mock-data", "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine",
              "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--train-iters", "1000",
              "--device", "cpu", "--no-plot", "--seed", "1234"]
    if variant == "instella":
        extra = ["--plugin", "instella", "--model-preset", "instella-test", "--num-query-groups", a.heads,
                 "--decay-all-params"]
    else:
        extra = ["--qk-layernorm", "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights",
                 "--position-embedding-type", "rope", "--swiglu", "--disable-bias-linear"]
    return [str(x) for x in shape_flags(a) + common + extra]


# ---- worker (one per rank, under torchrun) ------------------------------------------------------
class MegatronVariant:
    """The trainer's own parts (``Trainer``): model, optimizer and data as ``pretrain`` builds them;
    ``step`` = one ``train_step``."""

    def __init__(self, argv, device, per_head_qk_of=None):
        """``per_head_qk_of``: an ``instella`` variant whose weights this one copies, with megatron's per-head
        QK-norm (weights 1, as at init) in place of the full-width one."""
        from instella_plugin.training.arguments import parse_args
        from instella_plugin.training.datasets import dataset_sizes
        from instella_plugin.training.trainer import Trainer

        run, plugin = parse_args(argv)
        if per_head_qk_of is not None:
            plugin = PerHeadQKPlugin(per_head_qk_of.trainer.model)
        self.trainer = Trainer(run, plugin)
        self.train_ds = plugin.build_datasets(run, dataset_sizes(run))[0]

    def step(self) -> float:
        t = self.trainer
        return t.train_step(t.batches(self.train_ds, t.consumed))["loss"]


class PerHeadQKPlugin(InstellaPlugin):
    """Instella with megatron's per-head QK-norm in place of the full-width one, on a copy of another
    model's weights (same core attention, data and schedule: only the QK-norm differs)."""

    def __init__(self, source_chunks):
        self.source = source_chunks

    def transformer_config_overrides(self, run) -> dict:
        return {**super().transformer_config_overrides(run), "qk_layernorm": True}

    def build_model(self, run, transformer_config):
        import torch

        from instella_plugin.model.build import build_gpt_chunks
        from instella_plugin.training.model_setup import unwrap

        chunks = build_gpt_chunks(run.model, transformer_config, register_per_head_spec(), init_seed=None)
        for chunk, ref in zip(chunks, self.source):
            ref_params = dict(unwrap(ref).named_parameters())
            with torch.no_grad():
                for name, p in chunk.named_parameters():
                    if ref_params[name].shape == p.shape:
                        p.copy_(ref_params[name])
                    else:  # the q/k norms: per-head [head_dim] here, full-width there
                        p.fill_(1.0)
        return chunks


class HFLoopVariant:
    """transformers' one-expert OlmoeForCausalLM trained by a plain PyTorch loop on the same mock batches."""

    def __init__(self, a, dataset, attn: str):
        import torch
        from transformers import OlmoeConfig, OlmoeForCausalLM

        torch.manual_seed(1234)
        config = OlmoeConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                             num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                             num_experts=1, num_experts_per_tok=1, max_position_embeddings=a.seq,
                             rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                             output_router_logits=False, pad_token_id=1, eos_token_id=0, bos_token_id=None,
                             attn_implementation=attn)
        self.model = OlmoeForCausalLM(config).train()
        self.attn = self.model.config._attn_implementation
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        self.ds, self.a, self.consumed = dataset, a, 0

    def step(self) -> float:
        import torch

        from instella_plugin.training.datasets import to_torch_batch

        batch = to_torch_batch([self.ds[(self.consumed + i) % len(self.ds)] for i in range(self.a.mbs)])
        self.consumed += self.a.mbs
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=batch["tokens"]).logits
        losses = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                   batch["labels"].reshape(-1), reduction="none")
        mask = batch["loss_mask"].reshape(-1)
        loss = (losses * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss)


def register_per_head_spec() -> str:
    """The ``instella`` provider with megatron's per-head QK-norm, registered for this process."""
    from megatron.core.models.backends import LocalSpecProvider

    from instella_plugin.model import specs

    class PerHeadQKNorm(specs.InstellaLocalProvider):
        def layer_norm(self, rms_norm=True, for_qk=False):
            if for_qk:  # what megatron's local spec builds for qk_layernorm=True with RMSNorm
                return LocalSpecProvider().layer_norm(rms_norm=True, for_qk=True)
            return super().layer_norm(rms_norm, for_qk)

    specs.register_spec(PER_HEAD_SPEC, PerHeadQKNorm)
    return PER_HEAD_SPEC


def worker(a) -> None:
    import torch

    from instella_plugin.training.arguments import parse_args
    from instella_plugin.training.setup import initialize_distributed

    a.tp_size = int(os.environ["WORLD_SIZE"])
    base_run, _ = parse_args(trainer_argv(a, "instella"))
    device = initialize_distributed(base_run)
    instella = MegatronVariant(trainer_argv(a, "instella"), device)
    variants = {"instella": instella,
                BASELINE: MegatronVariant(trainer_argv(a, "instella"), device, per_head_qk_of=instella),
                "stock qk-norm": MegatronVariant(trainer_argv(a, "stock"), device)}
    if a.tp_size == 1:
        for attn in a.hf_attn:
            variants[f"hf loop {attn}"] = HFLoopVariant(a, variants["instella"].train_ds, attn)
    rank = torch.distributed.get_rank()
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    losses = {k: [] for k in variants}
    for r in range(a.warmup + a.reps):
        for name, v in variants.items():
            torch.distributed.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = v.step()
            torch.distributed.barrier()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            losses[name].append(loss)
            if rank == 0:
                print(f"  TP{a.tp_size} round {r} {name:<16} {times[name][-1]:7.2f} s  loss {loss:.3f}", flush=True)
    if rank == 0:
        out = {"tp": a.tp_size, "threads": torch.get_num_threads(), "warmup": a.warmup,
               "step_s": times, "cpu_s": cpu, "loss": losses}
        with open(a.worker_out, "w") as f:
            json.dump(out, f)
    torch.distributed.destroy_process_group()


# ---- driver ---------------------------------------------------------------------------------------
def run_tp(a, tp: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}", __file__,
               "--worker", "--worker-out", out] + [
            f"--{k}={getattr(a, k)}" for k in ("layers", "hidden", "heads", "ffn", "seq", "mbs", "vocab", "reps", "warmup")]
        cmd += ["--hf-attn", *a.hf_attn] if a.hf_attn else ["--hf-attn"]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // tp)), WANDB_MODE="disabled",
                   PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:  # the per-step lines as they come; the rest only on failure
            lines.append(line)
            if line.startswith("  TP"):
                print(line, end="", flush=True)
        if proc.wait() != 0:
            print("".join(lines)[-6000:])
            raise SystemExit(f"TP={tp} worker failed ({proc.returncode})")
        with open(out) as f:
            return json.load(f)


def summarize(raw: dict, a) -> dict:
    tokens = a.mbs * a.seq
    res = {}
    for name, ts in raw["step_s"].items():
        timed, cpu = ts[a.warmup:], raw["cpu_s"][name][a.warmup:]
        res[name] = {"median_s": statistics.median(timed), "min_s": min(timed), "cpu_median_s": statistics.median(cpu),
                     "tokens_per_s": tokens / statistics.median(timed), "steps": timed}
    return res


def add_shape_args(ap) -> None:
    """The model and batch shape flags (the output-loss benchmark takes the same)."""
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--mbs", type=int, default=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=2, help="timed steps per variant (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    add_shape_args(ap)
    ap.add_argument("--vocab", type=int, nargs="+", default=[1024, 50304],
                    help="vocabulary sizes, one run each (50304: Instella's, where the output layer weighs)")
    ap.add_argument("--hf-attn", nargs="*", default=["sdpa"], choices=["sdpa", "eager"],
                    help="attention of the plain PyTorch loop(s) at TP=1 (none: skip it); the first is baseline (b)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "trainer.json"))
    ap.add_argument("--label", default="cpu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.vocab = a.vocab[0]
        worker(a)
        return 0
    for tp in a.tp:
        if a.heads % tp or a.ffn % tp or any(v % tp for v in a.vocab):
            ap.error(f"TP {tp} must divide --heads {a.heads}, --ffn {a.ffn} and --vocab {a.vocab}")
    if a.reps < 1 or a.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    for vocab in a.vocab:  # one record (and plot) per vocabulary size
        run_shape(argparse.Namespace(**{**vars(a), "vocab": vocab}))
    return 0


def run_shape(a) -> None:
    load0, t0 = os.getloadavg()[0], time.time()
    print(f"shape: {a.layers} layers, hidden {a.hidden}, {a.heads} heads of {a.hidden // a.heads}, ffn {a.ffn}, "
          f"seq {a.seq}, micro-batch {a.mbs}, vocab {a.vocab}; {a.warmup} warm-up + {a.reps} timed steps per variant; "
          f"{os.cpu_count()} CPUs, load average {load0:.1f}", flush=True)
    runs = {}
    for tp in a.tp:
        raw = run_tp(a, tp)
        runs[tp] = {"summary": summarize(raw, a), "threads_per_rank": raw["threads"]}
    load1 = os.getloadavg()[0]
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "label": a.label, "host": platform.node(),
              "cpus": os.cpu_count(), "load_average": [load0, load1], "wall_s": time.time() - t0,
              "shape": {k: getattr(a, k) for k in ("layers", "hidden", "heads", "ffn", "seq", "mbs", "vocab")},
              "warmup": a.warmup, "reps": a.reps, "tp": {}}
    print(f"\n{'TP':>2} {'variant':<16} {'median s/step':>13} {'CPU s/step':>10} {'tokens/s':>9} {'ratio':>7}  note")
    for tp, run in runs.items():
        s = run["summary"]
        base = s[BASELINE]["median_s"]
        entry = {"variants": s, "threads_per_rank": run["threads_per_rank"], "qk_norm_baseline": BASELINE}
        overhead = s["instella"]["median_s"] / base - 1
        cpu_overhead = s["instella"]["cpu_median_s"] / s[BASELINE]["cpu_median_s"] - 1
        entry.update(qk_norm_overhead=overhead, qk_norm_overhead_cpu=cpu_overhead, target=TARGETS.get(tp),
                     meets_target=overhead < TARGETS.get(tp, 1.0),
                     instella_vs_stock=s["instella"]["median_s"] / s["stock qk-norm"]["median_s"] - 1)
        hf = [k for k in s if k.startswith("hf loop")]
        if hf:  # ours / plain loop, tokens/s: > 1 means the trainer is faster
            entry["ours_vs_hf_tokens_per_s"] = {k[len("hf loop "):]: s["instella"]["tokens_per_s"] / s[k]["tokens_per_s"]
                                                for k in hf}
        for name, v in s.items():
            if name == BASELINE:
                note = "baseline (a): same model and attention, megatron's per-head QK-norm"
            elif name == "stock qk-norm":
                note = (f"megatron's spec as shipped (its own attention); instella "
                        f"{100 * entry['instella_vs_stock']:+.1f}% of this")
            elif name.startswith("hf loop"):
                note = ("baseline (b)" if name == hf[0] else "plain loop, other attention") + (
                    f"; instella tokens/s x{s['instella']['tokens_per_s'] / v['tokens_per_s']:.2f} of this")
            else:
                note = (f"QK-norm overhead {100 * overhead:+.1f}% (CPU time {100 * cpu_overhead:+.1f}%), "
                        f"target <{100 * TARGETS.get(tp, 1):.0f}%")
            print(f"{tp:>2} {name:<16} {v['median_s']:13.2f} {v['cpu_median_s']:10.2f} {v['tokens_per_s']:9.1f} "
                  f"{v['median_s'] / base:7.3f}  {note}")
        record["tp"][str(tp)] = entry
    print(f"load average {load0:.1f} -> {load1:.1f}; total {record['wall_s']:.0f} s")
    _append(a.out, record)
    png = os.path.splitext(a.out)[0] + (".png" if a.vocab == 1024 else f"_vocab{a.vocab}.png")
    plot(record, png)
    print(f"results appended to {a.out}; plot {png}")


def _append(path: str, record: dict) -> None:
    history = []
    if os.path.exists(path):
        with open(path) as f:
            history = json.load(f)
    history.append(record)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(history, f, indent=1)
    os.replace(path + ".tmp", path)


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"instella": "tab:blue", BASELINE: "tab:cyan", "stock qk-norm": "grey", "hf loop sdpa": "tab:orange", "hf loop eager": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 3.4))
    labels, values, cols = [], [], []
    for tp, entry in record["tp"].items():
        for name, v in entry["variants"].items():
            labels.append(f"TP{tp} {name}")
            values.append(v["tokens_per_s"])
            cols.append(colors.get(name, "tab:green"))
    ax.barh(labels[::-1], values[::-1], color=cols[::-1])
    ax.set_xlabel("tokens / s per model replica (median step; higher is better)")
    sh = record["shape"]
    ax.set_title(f"trainer step, {sh['layers']}x{sh['hidden']}, seq {sh['seq']}, mbs {sh['mbs']} "
                 f"({record['cpus']} CPUs, load {record['load_average'][0]:.1f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    sys.exit(main())

"""Long-context attention on CPU: memory and step time of the local core attention, 2K..16K tokens.

One forward + backward of the core attention of an Instella layer (4 heads of 80, micro-batch 1,
fp32; q, k, v random, loss = sum of the output), for each sequence length and variant:

- ``dense (megatron)``: megatron's local ``DotProductAttention`` (what the ``instella`` spec runs for an
  unpacked batch at CP 1): materialises [b * heads, s, s] scores and probabilities. This is the baseline.
- ``per-doc sdpa, 1 doc``: the packed-document path with one document per row (torch SDPA, causal).
- ``packed, 8 docs``: the same row cut into 8 documents (per-document causal attention).
- ``cp N a2a``: Ulysses context parallelism over N gloo ranks (each holds s/N tokens, attends over the
  whole sequence for heads/N heads); memory and time are per rank, N ranks x 1 thread.

Memory is the peak resident-set growth of the process during the step (sampled every 0.5 ms from
/proc, with glibc returning large blocks to the OS at once), so it includes q/k/v, outputs and
gradients. Each rank uses 1 thread. The dense baseline is skipped where its two [heads, s, s] fp32
matrices alone would pass --dense-limit-gb. Ratios are against the dense baseline at the same length
(or, where it was skipped, the single-document SDPA). Appends to bench/results/long_context.json and
plots bench/results/long_context.png.

    python bench/bench_long_context.py                       # 2K, 4K, 8K, 16K; CP 2
    python bench/bench_long_context.py --seqs 2048 4096 --cp 2 4
"""
import argparse
import json
import os
import platform
import sys
import threading
import time

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed large blocks leave RSS at once
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEADS, HEAD_DIM, MBS, DOCS = 4, 80, 1, 8
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak RSS above the level at entry, sampled by a thread."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.peak = max(self.peak, _rss())
        self._stop.set()
        self._thread.join()
        self.mb = (self.peak - self.base) / 2 ** 20


def _bench_worker(seqs, variants, repeats, dense_limit_gb):
    """Runs on each rank: returns {(variant, seq): (peak MB, best step seconds)} for this rank."""
    import gc

    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType

    from instella_plugin.model.config import InstellaConfig
    from instella_plugin.model.packed_attention import InstellaDotProductAttention, packed_seq_params_from_cu_seqlens

    cp = ps.get_context_parallel_world_size()
    cfg = InstellaConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                         num_query_groups=HEADS, ffn_hidden_size=64, vocab_size=64, padded_vocab_size=64)
    tcfg = cfg.transformer_config(context_parallel=cp, cp_comm_type="a2a" if cp > 1 else None)
    attn = InstellaDotProductAttention(tcfg, 1, AttnMaskType.causal, "self", cp_comm_type="a2a" if cp > 1 else None)
    out = {}
    for seq in seqs:
        for variant in variants:
            if variant == "dense (megatron)" and 2 * HEADS * seq * seq * 4 / 2 ** 30 > dense_limit_gb:
                continue
            psp = None
            if variant.startswith("per-doc") or variant.startswith("packed"):
                docs = 1 if variant.startswith("per-doc") else DOCS
                cu = torch.arange(0, seq + 1, seq // docs, dtype=torch.int32)
                psp = packed_seq_params_from_cu_seqlens(cu, seq, MBS)
            g = torch.Generator().manual_seed(seq)
            qkv = [torch.randn(seq // cp, MBS, HEADS, HEAD_DIM, generator=g).requires_grad_() for _ in range(3)]
            best, peak = float("inf"), 0.0
            for _ in range(repeats):
                gc.collect()
                if cp > 1:
                    torch.distributed.barrier()
                with PeakRSS() as mem:
                    t = time.perf_counter()
                    o = attn(*qkv, None, packed_seq_params=psp)
                    o.sum().backward()
                    best = min(best, time.perf_counter() - t)
                    del o
                peak = max(peak, mem.mb)
                for x in qkv:
                    x.grad = None
            out[(variant, seq)] = (peak, best)
    return out


def main():
    from instella_plugin.testing.distributed import run_distributed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--cp", type=int, nargs="*", default=[2], help="context-parallel sizes to run (<= 4 heads)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dense-limit-gb", type=float, default=4.0)
    args = ap.parse_args()
    for c in args.cp:
        if HEADS % c or any(s % (2 * c) for s in args.seqs):
            raise SystemExit(f"error: CP {c} needs {HEADS} heads and every length divisible by it (and 2 x CP)")
    single = ["dense (megatron)", "per-doc sdpa, 1 doc", f"packed, {DOCS} docs"]
    rows = dict(run_distributed(_bench_worker, 1, args.seqs, single, args.repeats, args.dense_limit_gb)[0])
    for c in args.cp:
        per_rank = run_distributed(_bench_worker, c, args.seqs, [f"cp {c} a2a"], args.repeats,
                                   args.dense_limit_gb, cp=c)
        for key in per_rank[0]:  # the slowest rank's time, the largest rank's memory
            rows[key] = (max(r[key][0] for r in per_rank), max(r[key][1] for r in per_rank))
    variants = single + [f"cp {c} a2a" for c in args.cp]

    print(f"core attention fwd+bwd, fp32, heads {HEADS} x {HEAD_DIM}, micro-batch {MBS}, 1 thread per rank; "
          f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'seq':>6} {'variant':<22} {'peak MB/rank':>12} {'step ms':>9} {'mem vs base':>11} {'time vs base':>12}")
    table = []
    for seq in args.seqs:
        base = rows.get(("dense (megatron)", seq)) or rows[("per-doc sdpa, 1 doc", seq)]
        for v in variants:
            if (v, seq) not in rows:
                need = 2 * HEADS * seq * seq * 4 / 2 ** 30
                print(f"{seq:>6} {v:<22} {'skipped: scores+probs alone ' + format(need, '.1f') + ' GB':>35}")
                continue
            mb, sec = rows[(v, seq)]
            table.append(dict(seq=seq, variant=v, heads=HEADS, head_dim=HEAD_DIM, micro_batch=MBS, peak_mb=mb,
                              step_s=sec, mem_ratio=mb / max(base[0], 1e-9), time_ratio=sec / base[1]))
            print(f"{seq:>6} {v:<22} {mb:>12.1f} {sec * 1e3:>9.0f} {table[-1]['mem_ratio']:>11.3f} "
                  f"{table[-1]['time_ratio']:>12.3f}")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0], "torch": torch.__version__, "rows": table}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "long_context.json")
    history = json.load(open(path)) if os.path.exists(path) else []
    history.append(record)
    with open(path + ".tmp", "w") as f:
        json.dump(history, f, indent=1)
    os.replace(path + ".tmp", path)
    plot(record, os.path.join(RESULTS, "long_context.png"))
    return 0


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    variants = list(dict.fromkeys(r["variant"] for r in record["rows"]))
    for v in variants:
        pts = [r for r in record["rows"] if r["variant"] == v]
        xs = [r["seq"] for r in pts]
        axes[0].plot(xs, [max(r["peak_mb"], 0.1) for r in pts], marker="o", label=v)
        axes[1].plot(xs, [r["step_s"] for r in pts], marker="o", label=v)
    for ax, label in zip(axes, ("peak attention memory per rank (MB)", "fwd+bwd step (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"local core attention, {HEADS} heads x {HEAD_DIM}, micro-batch {MBS}, CPU fp32 "
                 f"({record['cpus']} CPUs, load {record['load_average']:.1f})", fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())

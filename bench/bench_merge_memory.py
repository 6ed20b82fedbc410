"""Peak memory of every ``instella merge`` method on three Megatron checkpoints of more than 1 GB.

Each merge runs in a fresh process that first imports everything it will use, then resets the
kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5) and reads VmHWM after the merge: the peak
resident memory above the post-import baseline, exact. The naive baseline, measured in the same run,
holds what a load-everything merge holds: all three input checkpoints in memory at once (every
parameter read whole), plus the base for the task-vector methods. The limit is the merge limit of the
convert/merge benchmark (4x the largest tensor + 64 MB): memory flat in the model size and in the
number of inputs. Printed side by side as ratios; appended to bench/results/merge_memory.json and
plotted to bench/results/merge_memory.png.

The three inputs are hard links of one checkpoint and the base another (values do not change the
memory a method needs; the task vectors are non-zero).

    python bench/bench_merge_memory.py                 # 8 layers x 1280 hidden, fp32: 1.15 GB each
    python bench/bench_merge_memory.py --methods uniform ties
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_convert_memory import make_source  # noqa: E402  (the same random >1 GB source)

MB = 1024 ** 2

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
from instella_plugin.megatron_import import import_megatron_core
import_megatron_core()
import torch, torch.distributed.checkpoint
from instella_plugin.hf import merge, merge_config, merge_methods, megatron_io, convert
from instella_plugin.training.checkpointing import resolve_checkpoint_dir
def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
inputs, base, out = {inputs!r}, {base!r}, {out!r}
base_rss = rss_kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
t = time.time()
{op}
print(json.dumps({{"seconds": time.time() - t, "baseline_mb": base_rss / 1024, "peak_mb": rss_kb("VmHWM:") / 1024}}))
"""

NAIVE = """
held = []
for p in inputs + ([base] if {with_base} else []):
    _, _, cfg, ck = convert.open_megatron(p)
    held.append({{n: ck.read_param(n) for n in megatron_io.param_names(cfg.num_layers)}})
"""

METHODS = {
    "uniform": "build_spec('uniform', inputs)",
    "weighted": "build_spec('weighted', inputs, weights=[0.5, 0.3, 0.2])",
    "layerwise": "build_spec('layerwise', inputs, weights=[[1.0, 0.0], [0.0, 1.0], 0.5])",
    "slerp": "build_spec('slerp', inputs[:2], t=0.3)",
    "ties": "build_spec('ties', inputs, base=base, density=[0.5])",
    "dare-linear": "build_spec('dare_linear', inputs, base=base, density=[0.5])",
    "dare-ties": "build_spec('dare_ties', inputs, base=base, density=[0.5])",
}


def run_child(op, inputs, base, out):
    code = CHILD.format(root=ROOT, inputs=inputs, base=base, out=out, op=op)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["op"] for r in rows]
    ax.bar(names, [r["peak_above_baseline_mb"] for r in rows],
           color=["tab:gray" if r["op"].startswith("naive") else "tab:blue" for r in rows])
    ax.axhline(rows[0]["limit_mb"], color="tab:red", lw=1, label="limit: 4x largest tensor + 64 MB")
    ax.set_ylabel("peak RSS above post-import baseline (MB)")
    ax.set_title(f"merge memory, three {rows[0]['model_mb']:.0f} MB checkpoints (gray: load everything)")
    ax.legend()
    plt.xticks(rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1280)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed after)")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    from instella_plugin.hf.convert import hf_to_megatron
    from instella_plugin.model.config import InstellaConfig

    heads = args.hidden // 80
    cfg = InstellaConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=heads,
                         num_query_groups=heads, ffn_hidden_size=int(args.hidden * 2.7) // 16 * 16, preset="bench")
    work = args.workdir or tempfile.mkdtemp(prefix="bench_merge_")
    try:
        model_bytes, largest = make_source(os.path.join(work, "hf"), cfg, torch.float32)
        hf_to_megatron(os.path.join(work, "hf"), os.path.join(work, "seed0"))
        shutil.rmtree(os.path.join(work, "hf"))
        base = os.path.join(work, "base")
        _perturbed_base(os.path.join(work, "seed0"), base)
        inputs = [os.path.join(work, "seed0")]
        for k in (1, 2):
            shutil.copytree(inputs[0], os.path.join(work, f"seed{k}"), copy_function=os.link)
            inputs.append(os.path.join(work, f"seed{k}"))
        limit = 4 * largest / MB + 64
        print(f"3 inputs of {model_bytes / MB:.0f} MB (fp32, {cfg.num_parameters() / 1e6:.0f}M params), largest "
              f"tensor {largest / MB:.0f} MB; limit {limit:.0f} MB")
        print(f"{'operation':14s} {'peak MB':>9s} {'naive MB':>9s} {'vs naive':>9s} {'x largest':>10s} "
              f"{'of limit':>9s} {'seconds':>8s}")
        rows, naive = [], {}

        def show(r):
            print(f"{r['op']:14s} {r['peak_above_baseline_mb']:9.0f} {r['naive_mb']:9.0f} {r['vs_naive']:9.2f} "
                  f"{r['x_largest_tensor']:10.2f} {r['of_limit']:9.2f} {r['seconds']:8.1f}", flush=True)

        for with_base, label in ((False, "naive_x3"), (True, "naive_x3+base")):
            r = run_child(NAIVE.format(with_base=with_base), inputs, base, "")
            naive[with_base] = r["peak_mb"] - r["baseline_mb"]
            rows.append(_row(label, r, naive[with_base], limit, model_bytes, largest))
            show(rows[-1])
        for m in args.methods:
            out = os.path.join(work, "out_" + m)
            op = f"from instella_plugin.hf.merge_config import build_spec\nspec = {METHODS[m]}\n" \
                 "merge.merge(spec.inputs, out, spec=spec)"
            r = run_child(op, inputs, base, out)
            shutil.rmtree(out, ignore_errors=True)
            rows.append(_row(m, r, naive[m in ("ties", "dare-linear", "dare-ties")], limit, model_bytes, largest))
            show(rows[-1])
        merges = [r for r in rows if not r["op"].startswith("naive")]
        ok = all(r["peak_above_baseline_mb"] < limit for r in merges)
        print("every merge under the limit" if ok else
              "OVER THE LIMIT: " + ", ".join(r["op"] for r in merges if r["peak_above_baseline_mb"] >= limit))
        os.makedirs(RESULTS, exist_ok=True)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
                  "torch": torch.__version__, "layers": args.layers, "hidden": args.hidden, "rows": rows}
        path = os.path.join(RESULTS, "merge_memory.json")
        history = json.load(open(path)) if os.path.isfile(path) else []
        history.append(record)
        with open(path + ".tmp", "w") as f:
            json.dump(history, f, indent=1)
        os.replace(path + ".tmp", path)
        plot(rows, os.path.join(RESULTS, "merge_memory.png"))
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _row(op, r, naive_mb, limit, model_bytes, largest):
    peak = r["peak_mb"] - r["baseline_mb"]
    return {"op": op, "peak_above_baseline_mb": round(peak, 1), "naive_mb": round(naive_mb, 1),
            "vs_naive": round(peak / naive_mb, 3), "x_largest_tensor": round(peak / (largest / MB), 2),
            "limit_mb": round(limit, 1), "of_limit": round(peak / limit, 3), "seconds": round(r["seconds"], 2),
            "model_mb": round(model_bytes / MB, 1), "largest_tensor_mb": round(largest / MB, 1)}


def _perturbed_base(src, out):
    """A base checkpoint: 0.9 x every tensor of ``src`` (so the task vectors are not zero)."""
    from instella_plugin.checkpoint_layout import iteration_dir, publish
    from instella_plugin.hf import megatron_io
    from instella_plugin.hf.convert import open_megatron, weights_only_meta
    from instella_plugin.hf.outputs import atomic_output

    _, _, cfg, ck = open_megatron(src)
    layout = megatron_io.stacked_layout(cfg)
    stacked = [k for k in layout if k.startswith("decoder.layers.")]
    dtype = ck.dtype("embedding.word_embeddings.weight")

    def produce(key, layer):
        name = key if layer is None else f"decoder.layers.{layer}.{key[len('decoder.layers.'):]}"
        return ck.read_param(name).mul_(0.9)

    with atomic_output(out, False) as tmp:
        it = iteration_dir(tmp, 0)
        os.makedirs(it)
        megatron_io.write_dist_checkpoint(it, layout, {k: dtype for k in layout}, stacked, produce,
                                          objects={k: ck.read_object(k) for k in ck.objects})
        publish(tmp, weights_only_meta(cfg, 0, rope=cfg.rotary_base, seq_length=cfg.seq_length))


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of ``instella convert`` and ``instella merge`` on a model of more than 1 GB.

Each operation runs in a fresh process that first imports everything it will use, then resets the
kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, so VmHWM restarts at the current RSS) and
reads VmHWM after the operation: the figure is the peak resident memory above the post-import
baseline, exact, with no sampling. Limits (issue 5): Megatron -> HF and merge under 4x the largest
tensor + 64 MB; HF -> Megatron under 1.2x the model size. The naive baseline measured in the same
run loads the whole HF checkpoint into memory at once (``safetensors.torch.load_file``, cloned out of
its mmap, as a load-everything converter holds it); ratios are printed
against it and against the limits. Results are appended to bench/results/convert_memory.json and
plotted to bench/results/convert_memory.png.

    python bench/bench_convert_memory.py            # 8 layers x 1280 hidden, fp32: 1.15 GB
    python bench/bench_convert_memory.py --dtype bfloat16 --layers 16
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
MB = 1024 ** 2

# run inside the child: import, reset the peak, run, report
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch
import instella_plugin.hf, instella_plugin.data.sft
from instella_plugin.hf import convert, merge, megatron_io, safetensors_io, formats
from safetensors.torch import load_file
import torch.distributed.checkpoint
def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
base = rss_kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
t = time.time()
{op}
print(json.dumps({{"seconds": time.time() - t, "baseline_mb": base / 1024, "peak_mb": rss_kb("VmHWM:") / 1024}}))
"""

OPS = {
    "hf_to_megatron": "convert.hf_to_megatron({hf!r}, {out!r})",
    "megatron_to_hf": "convert.megatron_to_hf({mg!r}, {out!r})",
    "megatron_to_hf_olmoe": "convert.megatron_to_hf({mg!r}, {out!r}, fmt='olmoe')",
    "merge_megatron_x3": "merge.merge([{mg!r}, {mg2!r}, {mg3!r}], {out!r})",
    "merge_hf_x3": "merge.merge([{hf!r}, {hf2!r}, {hf3!r}], {out!r})",
    "naive_load_all": "sd = {{k: v.clone() for k, v in load_file(os.path.join({hf!r}, 'model.safetensors')).items()}}",
}


def make_source(path, cfg, dtype):
    """A random Instella HF directory written tensor by tensor (the benchmark's input)."""
    import torch

    from instella_plugin.hf import formats
    from instella_plugin.hf.outputs import write_json
    from instella_plugin.hf.safetensors_io import ShardedWriter

    plan = formats.export_plan(cfg, "instella", dtype)
    os.makedirs(path)
    writer = ShardedWriter(path, plan, max_shard_bytes=1 << 40)
    g = torch.Generator().manual_seed(0)
    for name, shape, dt in plan:
        writer.write(name, (torch.randn(shape, generator=g) * 0.02).to(dt))
    writer.finish()
    write_json(os.path.join(path, "config.json"), formats.config_json(cfg, "instella", rope_theta=cfg.rotary_base,
                                                                      max_positions=cfg.seq_length, dtype=dtype))
    return sum(torch.Size(s).numel() for _, s, _ in plan) * torch.empty((), dtype=dtype).element_size(), \
        max(torch.Size(s).numel() for _, s, _ in plan) * torch.empty((), dtype=dtype).element_size()


def run_child(op, paths):
    code = CHILD.format(root=ROOT, op=OPS[op].format(**paths))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise RuntimeError(f"{op} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["op"] for r in rows]
    ax.bar(names, [r["peak_above_baseline_mb"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        if r["limit_mb"]:
            ax.hlines(r["limit_mb"], i - 0.4, i + 0.4, colors="tab:red")
    ax.set_ylabel("peak RSS above post-import baseline (MB)")
    ax.set_title(f"convert / merge memory, model {rows[0]['model_mb']:.0f} MB (red: limit)")
    plt.xticks(rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1280)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed after)")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    from instella_plugin.model.config import InstellaConfig

    heads = args.hidden // 80
    cfg = InstellaConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=heads,
                         num_query_groups=heads, ffn_hidden_size=int(args.hidden * 2.7) // 16 * 16, preset="bench")
    dtype = getattr(torch, args.dtype)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    try:
        paths = {k: os.path.join(work, k) for k in ("hf", "hf2", "hf3", "mg", "mg2", "mg3")}
        model_bytes, largest = make_source(paths["hf"], cfg, dtype)
        for extra in ("hf2", "hf3"):
            shutil.copytree(paths["hf"], paths[extra], copy_function=os.link)
        limits = {"hf_to_megatron": 1.2 * model_bytes / MB, "megatron_to_hf": 4 * largest / MB + 64,
                  "megatron_to_hf_olmoe": 4 * largest / MB + 64, "merge_megatron_x3": 4 * largest / MB + 64,
                  "merge_hf_x3": 4 * largest / MB + 64, "naive_load_all": None}
        rows = []
        print(f"model {model_bytes / MB:.0f} MB ({args.dtype}, {cfg.num_parameters() / 1e6:.0f}M params), "
              f"largest tensor {largest / MB:.0f} MB")
        print(f"{'operation':22s} {'peak MB':>9s} {'limit MB':>9s} {'of limit':>9s} {'vs naive':>9s} {'seconds':>8s}")
        order = ["naive_load_all", "hf_to_megatron", "megatron_to_hf", "megatron_to_hf_olmoe", "merge_megatron_x3",
                 "merge_hf_x3"]
        for op in order:
            out = os.path.join(work, "out_" + op)
            r = run_child(op, {**paths, "out": out})
            if op == "hf_to_megatron":
                for extra in ("mg", "mg2", "mg3"):
                    shutil.copytree(out, paths[extra], copy_function=os.link)
            shutil.rmtree(out, ignore_errors=True)
            peak = r["peak_mb"] - r["baseline_mb"]
            naive = rows[0]["peak_above_baseline_mb"] if rows else peak
            rows.append({"op": op, "peak_above_baseline_mb": round(peak, 1), "limit_mb": limits[op] and round(limits[op], 1),
                         "seconds": round(r["seconds"], 2), "model_mb": round(model_bytes / MB, 1),
                         "largest_tensor_mb": round(largest / MB, 1), "dtype": args.dtype})
            lim = f"{limits[op]:9.0f} {peak / limits[op]:9.2f}" if limits[op] else f"{'-':>9s} {'-':>9s}"
            print(f"{op:22s} {peak:9.0f} {lim} {peak / naive:9.2f} {r['seconds']:8.1f}")
        ok = all(r["limit_mb"] is None or r["peak_above_baseline_mb"] < r["limit_mb"] for r in rows)
        print("all under their limits" if ok else "LIMIT EXCEEDED")
        os.makedirs(RESULTS, exist_ok=True)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
                  "torch": torch.__version__, "layers": args.layers, "hidden": args.hidden, "rows": rows}
        path = os.path.join(RESULTS, "convert_memory.json")
        history = json.load(open(path)) if os.path.isfile(path) else []
        history.append(record)
        with open(path + ".tmp", "w") as f:
            json.dump(history, f, indent=1)
        os.replace(path + ".tmp", path)
        plot(rows, os.path.join(RESULTS, "convert_memory.png"))
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

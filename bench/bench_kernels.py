"""Benchmark the fused kernels against PyTorch eager and torch.compile of the same reference.

For each kernel (RMSNorm, full-width QK-norm + RoPE, SwiGLU), dtype and Instella shape it times (best
of --reps rounds, each round running every implementation once, so other load on a shared machine
falls on all alike) the forward and the forward+backward of: the fused op, the eager PyTorch
reference (what the ``instella`` spec runs), and ``torch.compile`` of that reference, all in this run. It prints time, effective GB/s
(minimum bytes each pass must move), the fused speed-up over each baseline, and the fraction of this
machine's copy bandwidth, measured here on 256 MiB (larger than the last-level cache) both as
``dst.copy_(src)`` into a preallocated tensor (%copy) and as ``src.clone()`` (%clone), which, like
every out-of-place op, pays for allocating and first-touching its output. Results are appended to bench/results/kernels.json and plotted to bench/results/kernels.png.

    python bench/bench_kernels.py                 # full: 4096 and 16384 tokens, fp32 and bf16
    python bench/bench_kernels.py --quick         # 4096 tokens, fp32 only
    python bench/bench_kernels.py --allocator jemalloc   # every op's output from jemalloc's retained pages
    python bench/bench_kernels.py --device cuda   # same table on a GPU (used by tests/gpu/check_kernels.py)
    python bench/bench_kernels.py --isa all       # once per x86 level this CPU runs (avx512, avx2, baseline)

The CPU kernels are compiled for several x86 levels and dispatched per call (the best this CPU runs;
``--isa LEVEL`` forces one through INSTELLA_CPU_ISA). Each level runs in its own process, with PyTorch's
eager kernels (ATEN_CPU_CAPABILITY) and torch.compile's generated code (its vector ISA and
TORCHINDUCTOR_CPP_MARCH) held to the same level, so the row is what a host of that level would see;
``--torch-isa native`` leaves PyTorch at this CPU's best instead. Every record and row names the level.

On the CPU an out-of-place op pays for its output's fresh pages (page faults, the kernel zeroing
them): with glibc's allocator every tensor this size is a new mmap, so eager and compiled ops (and
clone) run well below copy_ bandwidth. The fused ops take their outputs from their own cache of
freed blocks (csrc/cpu/output_cache.h; INSTELLA_CPU_OUTPUT_CACHE_MB=0 turns it off, to time them as
the others), as in a training step, where each step's outputs reuse the previous step's memory. ``--allocator jemalloc`` (PyTorch's CPU tuning
advice; Debian package libjemalloc2) re-runs this script with jemalloc preloaded and told to keep
freed pages, which shows what the kernels themselves stream. The allocator is recorded with the results.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# PyTorch's CPU allocator hands each large tensor fresh pages from mmap, and page-faulting them in
# costs more than the kernels themselves; THP_MEM_ALLOC_ENABLE=1 (a PyTorch switch) backs large
# allocations with transparent huge pages. It is set (unless --default-alloc) before torch loads,
# for the fused op and both baselines alike.
if "--default-alloc" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
            "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")


def _preload_jemalloc():
    """Re-run this script with jemalloc preloaded (retaining freed pages), unless it already is."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in JEMALLOC if os.path.exists(p)), None)
    if lib is None:
        sys.exit("--allocator jemalloc: libjemalloc.so.2 not found (apt-get install libjemalloc2, or set "
                 "LD_PRELOAD to it yourself); or run with the default allocator")
    env = dict(os.environ, LD_PRELOAD=lib, MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def _requested_allocator(argv):
    for i, arg in enumerate(argv):
        if arg.startswith("--allocator="):
            return arg.split("=", 1)[1]
        if arg == "--allocator" and i + 1 < len(argv):
            return argv[i + 1]
    return "default"


if _requested_allocator(sys.argv) == "jemalloc":
    _preload_jemalloc()

# --isa LEVEL: the settings of a host of that level, for this package's kernels and for PyTorch's own
# (ATen's eager kernels read ATEN_CPU_CAPABILITY when torch loads, so each level is its own process).
ISA_ENV = {
    "avx512": {"INSTELLA_CPU_ISA": "avx512", "ATEN_CPU_CAPABILITY": "avx512", "TORCHINDUCTOR_CPP_MARCH": "x86-64-v4"},
    "avx2": {"INSTELLA_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3"},
    "baseline": {"INSTELLA_CPU_ISA": "baseline", "ATEN_CPU_CAPABILITY": "default", "TORCHINDUCTOR_CPP_MARCH": "x86-64"},
}
ISA_CHILD = "INSTELLA_BENCH_ISA_CHILD"  # set in the process that runs one forced level

import torch  # noqa: E402

from instella_plugin import kernels as K

HIDDEN, HEADS, HEAD_DIM, FFN = 2560, 32, 80, 6912
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---- the references (what the unfused `instella` spec computes) ------------------------------------
def rms_ref(x, w, eps=1e-5):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def qk_rope_ref(x, w, freqs, eps=1e-5):
    s, b, h, d = x.shape
    x32 = x.float().reshape(s, b, h * d)
    n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = (w * n).float().reshape(s, b, h, d)
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    y1, y2 = y.chunk(2, dim=-1)
    return (y * cos + torch.cat((-y2, y1), dim=-1) * sin).to(x.dtype)


def swiglu_ref(x):
    g, u = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


# ---- timing -----------------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps, warmup=3):
    """Best time of fn over reps calls (a shared machine's other load only ever adds time)."""
    return timed_interleaved({"fn": fn}, device, reps, warmup)["fn"]


def copy_bandwidth(device, nbytes=256 << 20):
    """(GB/s of dst.copy_(src) into a preallocated tensor, GB/s of src.clone()): the second pays for
    allocating and first-touching its output, as every out-of-place op does."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), device, reps=10)
    t_clone = timed(lambda: src.clone(), device, reps=10)
    return 2 * nbytes / t_copy / 1e9, 2 * nbytes / t_clone / 1e9


def cases(device, dtype, tokens):
    """(kernel, fused fn, reference fn, args, bytes fwd, bytes fwd+bwd, RoPE angles or None)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    e = torch.finfo(dtype).bits // 8

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, w = rnd(tokens, HIDDEN), 1 + 0.1 * rnd(HIDDEN)
    q = rnd(tokens, 1, HEADS, HEAD_DIM)
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    f = torch.outer(torch.arange(tokens, dtype=torch.float32), inv)
    freqs = torch.cat((f, f), dim=-1).reshape(tokens, 1, 1, HEAD_DIM).to(device)
    h = rnd(tokens, 2 * FFN)
    n, nf = tokens * HIDDEN, tokens * FFN
    return [
        ("rms_norm", lambda a, b: K.rms_norm(a, b), rms_ref, (x, w), 2 * n * e, 5 * n * e, None),
        ("qk_norm_rope", lambda a, b: K.qk_norm_rope(a, b, freqs), lambda a, b: qk_rope_ref(a, b, freqs),
         (q, w), 2 * n * e, 5 * n * e, freqs),
        ("swiglu", K.swiglu, swiglu_ref, (h,), 3 * nf * e, 8 * nf * e, None),
    ]


def library_baselines(device, kernel, freqs=None):
    """Other libraries' fused kernels for ``kernel`` that import here: {name: fn(*args)} (GPU only).

    apex and Transformer Engine scale by the weight before casting (not Instella's order); they are
    timing baselines only. Liger's RMSNorm runs in its "llama" casting mode (cast, then weight). No
    library fuses a full-width QK-norm with RoPE; its Liger baseline is the pair of Liger kernels a
    user would otherwise chain: RMSNorm over the full width, then Liger's RoPE (which rotates a q and a
    k; k is one head here, so nearly all of its time is q's).
    """
    if device != "cuda":
        return {}
    out = {}
    if kernel == "qk_norm_rope":
        try:
            from liger_kernel.transformers.functional import liger_rms_norm
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            def liger_qk(x, w):
                s, b, h, d = x.shape
                y = liger_rms_norm(x.reshape(s * b, h * d), w, 1e-5, 0.0, "llama", False).reshape(s, b, h, d)
                cos = torch.cos(freqs).reshape(1, s, d).to(x.dtype)
                sin = torch.sin(freqs).reshape(1, s, d).to(x.dtype)
                q = y.permute(1, 2, 0, 3)  # Liger's layout: [b, heads, s, head_dim]
                q, _ = liger_rotary_pos_emb(q, q[:, :1].contiguous(), cos, sin)
                return q.permute(2, 0, 1, 3)
            out["liger"] = liger_qk
        except ImportError:
            pass
    if kernel == "rms_norm":
        try:
            from liger_kernel.transformers.functional import liger_rms_norm
            out["liger"] = lambda x, w: liger_rms_norm(x, w, 1e-5, 0.0, "llama", False)
        except ImportError:
            pass
        try:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine
            out["apex"] = lambda x, w: fused_rms_norm_affine(x, w, (x.shape[-1],), 1e-5)
        except ImportError:
            pass
        try:
            import transformer_engine.pytorch as te
            te_norm = {}

            def te_rms(x, w):
                mod = te_norm.setdefault(x.dtype, te.RMSNorm(x.shape[-1], eps=1e-5, params_dtype=x.dtype))
                mod.weight = w
                return mod(x)
            out["te"] = te_rms
        except ImportError:
            pass
    if kernel == "swiglu":
        try:
            from liger_kernel.transformers.functional import liger_swiglu
            out["liger"] = lambda x: liger_swiglu(*x.chunk(2, dim=-1))
        except ImportError:
            pass
    return out


def make_step(fn, args, bwd):
    """A call of fn (forward only, or forward + backward w.r.t. every input) to time."""
    if not bwd:
        def fwd():
            with torch.no_grad():
                fn(*args)
        return fwd
    leaves = [a.detach().requires_grad_(True) for a in args]
    dy = torch.randn_like(fn(*leaves))

    def fwd_bwd():
        torch.autograd.grad(fn(*leaves), leaves, dy)
    return fwd_bwd


def timed_interleaved(steps, device, reps, warmup=2):
    """Best time of each step over reps rounds; each round runs every step once, so load from other
    processes on a shared machine falls on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(reps):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def run_levels(a, argv):
    """Re-run this script once per requested level, each with its level's environment; then plot the
    records of this run side by side. Returns the records."""
    levels = K.supported_isas() if a.isa == ["all"] else a.isa
    unknown = [lvl for lvl in levels if lvl not in K.supported_isas()]
    if unknown:
        sys.exit(f"--isa {' '.join(unknown)}: this CPU runs only {', '.join(K.supported_isas()) or 'no native kernel'}")
    argv = list(sys.argv[1:] if argv is None else argv)
    i = argv.index("--isa")
    while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        del argv[i + 1]
    start = len(load_json(a.out))
    for level in levels:
        env = dict(os.environ, **{ISA_CHILD: level})
        env.update(ISA_ENV[level] if a.torch_isa == "matched" else {"INSTELLA_CPU_ISA": level})
        print(f"===== level {level}: " + " ".join(f"{k}={env[k]}" for k in sorted(ISA_ENV[level]) if k in env), flush=True)
        child = argv[:i + 1] + [level] + argv[i + 1:]
        subprocess.run([sys.executable, os.path.abspath(__file__)] + child, env=env, check=True)
    records = load_json(a.out)[start:]
    plot(a.out, records, os.path.splitext(a.out)[0] + "_isa.png")
    return records


def check_targets(record):
    """Rows that miss the targets of the CPU kernels (issue 20): fused at least 1.5x eager and 1.0x
    torch.compile (SwiGLU 0.95x), and RMSNorm forward at 16384 tokens at least 50 % of copy_ bandwidth."""
    misses = []
    for r in record["rows"]:
        name = f"{r['kernel']} {r['dtype']} {r['tokens']} {'fwd+bwd' if r['bwd'] else 'fwd'} [{r.get('isa')}]"
        if r["x_eager"] < 1.5:
            misses.append(f"{name}: {r['x_eager']:.2f}x eager < 1.5x")
        need = 0.95 if r["kernel"] == "swiglu" else 1.0
        if r["x_compile"] == r["x_compile"] and r["x_compile"] < need:
            misses.append(f"{name}: {r['x_compile']:.2f}x compile < {need}x")
        if r["kernel"] == "rms_norm" and not r["bwd"] and r["tokens"] == 16384 and r["frac_copy"] < 0.5:
            misses.append(f"{name}: {100 * r['frac_copy']:.0f} % of copy_ bandwidth < 50 %")
    return misses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="4096 tokens, float32 only")
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default=os.path.join(RESULTS, "kernels.json"))
    p.add_argument("--label", default=None, help="label of this run in the results file")
    p.add_argument("--default-alloc", action="store_true", help="leave THP_MEM_ALLOC_ENABLE unset")
    p.add_argument("--allocator", choices=["default", "jemalloc"], default="default",
                   help="jemalloc: preload it, keeping freed pages (CPU; see above)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads; on a loaded machine 1 thread times more reliably)")
    p.add_argument("--isa", nargs="+", default=None, choices=["all"] + list(ISA_ENV),
                   help="CPU: run once per x86 level named (all: every level this CPU runs), see above")
    p.add_argument("--kernels", nargs="*", default=None, choices=["rms_norm", "qk_norm_rope", "swiglu"],
                   help="only these kernels (default: all)")
    p.add_argument("--torch-isa", choices=["matched", "native"], default="matched",
                   help="with --isa: hold PyTorch's eager and compiled code to the same level (matched) or not")
    a = p.parse_args(argv)
    if a.isa and os.environ.get(ISA_CHILD) is None:
        return run_levels(a, argv)
    tokens = a.tokens or ([4096] if a.quick else [4096, 16384])
    dtypes = a.dtypes or (["float32"] if a.quick else ["float32", "bfloat16"])
    dev = a.device
    if a.threads:
        torch.set_num_threads(a.threads)
    copy_gbs, clone_gbs = copy_bandwidth(dev)
    alloc = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    allocator = "jemalloc (retaining pages)" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "default"
    isa = K.dispatched_isa() if dev == "cpu" else {}
    cache_mb = K.output_cache()["cap"] >> 20 if dev == "cpu" else 0
    print(f"device {dev}, backend {K.describe_backend(dev)}, threads {torch.get_num_threads()}, "
          f"copy bandwidth {copy_gbs:.1f} GB/s (clone {clone_gbs:.1f} GB/s), THP_MEM_ALLOC_ENABLE={alloc}, "
          f"allocator {allocator}" + (f", fused ops' output cache {cache_mb} MiB" if dev == "cpu" else ""))
    hdr = (f"{'kernel':13s} {'dtype':8s} {'tokens':>6s} {'pass':7s} {'fused ms':>9s} {'GB/s':>7s} "
           f"{'%copy':>6s} {'%clone':>6s} {'eager ms':>9s} {'x eager':>8s} {'compile ms':>10s} {'x compile':>9s}")
    print(hdr)
    rows = []
    record = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), label=a.label, device=dev,
                  device_name=(torch.cuda.get_device_name() if dev == "cuda" else platform.processor()
                               or platform.machine()),
                  torch=torch.__version__, threads=torch.get_num_threads(), backend=K.backend(dev),
                  copy_gbs=copy_gbs, clone_gbs=clone_gbs, thp_mem_alloc=alloc, allocator=allocator,
                  output_cache_mb=cache_mb,
                  isa=isa, forced_isa=os.environ.get("INSTELLA_CPU_ISA") or None,
                  aten_cpu_capability=os.environ.get("ATEN_CPU_CAPABILITY") or None,
                  inductor_march=os.environ.get("TORCHINDUCTOR_CPP_MARCH") or None, rows=rows)
    index = None  # the record is saved after every row, so an interrupted run keeps what it measured
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for t in tokens:
            for name, fused, ref, args, b_fwd, b_all, freqs in cases(dev, dtype, t):
                if a.kernels and name not in a.kernels:
                    continue
                compiled = None if a.no_compile else torch.compile(ref, dynamic=False)
                for bwd in (False, True):
                    steps = {"fused": make_step(fused, args, bwd), "eager": make_step(ref, args, bwd)}
                    if compiled:
                        steps["compile"] = make_step(compiled, args, bwd)
                    for lib, lib_fn in library_baselines(dev, name, freqs).items():
                        try:
                            steps[lib] = make_step(lib_fn, args, bwd)
                            steps[lib]()
                        except Exception as e:  # noqa: BLE001  (an optional baseline; say why it is absent)
                            steps.pop(lib, None)
                            print(f"  ({lib} baseline failed: {type(e).__name__}: {str(e)[:120]})")
                    best = timed_interleaved(steps, dev, a.reps)
                    tf, te, tc = best["fused"], best["eager"], best.get("compile", float("nan"))
                    gbs = (b_all if bwd else b_fwd) / tf / 1e9
                    r = dict(kernel=name, isa=isa.get(name), dtype=dtype_name, tokens=t, bwd=bwd, fused_ms=tf * 1e3,
                             eager_ms=te * 1e3, compile_ms=tc * 1e3, gbs=gbs, frac_copy=gbs / copy_gbs,
                             frac_clone=gbs / clone_gbs, x_eager=te / tf, x_compile=tc / tf)
                    r.update({f"x_{k}": v / tf for k, v in best.items() if k not in ("fused", "eager", "compile")})
                    rows.append(r)
                    print(f"{name:13s} {dtype_name:8s} {t:6d} {'fwd+bwd' if bwd else 'fwd':7s} "
                          f"{r['fused_ms']:9.2f} {gbs:7.1f} {100 * r['frac_copy']:5.0f}% {100 * r['frac_clone']:5.0f}% "
                          f"{r['eager_ms']:9.2f} "
                          f"{r['x_eager']:8.2f} {r['compile_ms']:10.2f} {r['x_compile']:9.2f}"
                          + "".join(f"  x {k[2:]} {v:.2f}" for k, v in r.items() if k[2:] in ("liger", "apex", "te")),
                          flush=True)
                    index = append_json(a.out, record, index)
    append_json(a.out, record, index)
    print(f"saved to {a.out}")
    if dev == "cpu":
        misses = check_targets(record)
        print("targets (1.5x eager, 1.0x compile / SwiGLU 0.95x, RMSNorm fwd 16384 >= 50 % copy_): "
              + ("all met" if not misses else f"{len(misses)} missed\n  " + "\n  ".join(misses)))
    if os.environ.get(ISA_CHILD) is None:
        plot(a.out, [record], os.path.splitext(a.out)[0] + (".png" if dev == "cpu" else f"_{dev}.png"))
    return record


def load_json(path):
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return json.load(fh)


def append_json(path, record, index=None):
    """Append ``record`` to the JSON list in ``path``, or replace entry ``index`` (a record saved before
    with fewer rows); returns its index. Written atomically, under a lock (runs of several levels may
    share the file)."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)  # lock the folder: no stray lock file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _write_json(path, record, index)
    finally:
        os.close(fd)


def _write_json(path, record, index):
    data = load_json(path)
    if index is None:
        data.append(record)
        index = len(data) - 1
    else:
        data[index] = record
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return index


def plot(path, records, png):
    """Speed-ups of each record's rows, one panel per record (e.g. one per x86 level)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing; no plot", file=sys.stderr)
        return
    n = max(len(r["rows"]) for r in records)
    fig, axes = plt.subplots(len(records), 1, figsize=(max(8, 0.7 * n), 4.5 * len(records)), squeeze=False)
    for ax, record in zip(axes[:, 0], records):
        rows = record["rows"]
        labels = [f"{r['kernel']}\n{r['dtype']} {r['tokens']}\n{'f+b' if r['bwd'] else 'fwd'}" for r in rows]
        xs = range(len(rows))
        ax.bar([i - 0.2 for i in xs], [r["x_eager"] for r in rows], 0.4, label="fused vs eager")
        ax.bar([i + 0.2 for i in xs], [r["x_compile"] for r in rows], 0.4, label="fused vs torch.compile")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.5, color="k", lw=0.5, ls=":")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("speed-up (baseline time / fused time)")
        levels = sorted({str(v) for v in (record.get("isa") or {}).values()})
        ax.set_title(f"instella fused kernels on {record['device']} ({record['device_name']}, "
                     f"{record['threads']} threads, allocator {record.get('allocator', 'default')}"
                     + (f", kernels {'/'.join(levels)}, torch {record.get('aten_cpu_capability') or 'native'}"
                        if levels else "") + f"), {record['time']}", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(png)), suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.chmod(tmp, 0o644)
    os.replace(tmp, png)
    print(f"plot written to {png}")


if __name__ == "__main__":
    main()

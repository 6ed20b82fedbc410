"""The checks of ``tests/gpu/run_gpu_checks.sh``, one subcommand each; each ends with one ``RESULT`` line.

    python tests/gpu/gpu_checks.py env                     # torch/CUDA/TE/megatron versions, GPU count
    python tests/gpu/gpu_checks.py wheels shared/wheels    # install carried wheels whose package is missing
    python tests/gpu/gpu_checks.py cpu-mode                # the CPU mode patches nothing where a GPU exists
    python tests/gpu/gpu_checks.py spec-parity             # instella-te / -fused / -fused-te / -fused-apex
                                                           # vs `instella` logits, bf16
    python tests/gpu/gpu_checks.py train --preset instella-1b --tp 1 --steps 20   # NCCL run, tokens/s, MFU

Every subcommand prints ``RESULT PASS|FAIL|SKIP <detail>`` as its last line and exits 0 (pass, skip)
or 1 (fail); the shell script collects these lines into its summary. ``--dry-run`` runs the same code
on the CPU (gloo, fp32/bf16, tiny shapes; ``cpu-mode`` pretends a GPU exists) so that everything but
the GPU itself can be checked on a machine without one.
"""
import argparse
import glob
import importlib.metadata
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def result(status: str, detail: str) -> int:
    print(f"RESULT {status} {detail}", flush=True)
    return 1 if status == "FAIL" else 0


# ---- env ------------------------------------------------------------------------------------------
def te_status():
    """(imports, detail) for Transformer Engine and megatron's TE extension."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401

        return True, f"transformer-engine {importlib.metadata.version('transformer_engine')}"
    except Exception as e:  # noqa: BLE001  (any import failure means: not usable here)
        return False, f"not usable ({type(e).__name__}: {str(e)[:120]})"


def cmd_env(a) -> int:
    import torch

    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, HIP {getattr(torch.version, 'hip', None)}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB")
    try:
        mc = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        mc = "missing"
    print(f"megatron-core {mc}; Transformer Engine {te_status()[1]}")
    if n == 0:
        return result("SKIP" if a.dry_run else "FAIL", "torch sees no GPU" + (" (dry run)" if a.dry_run else ""))
    return result("PASS", f"{n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, megatron-core {mc}")


# ---- carried wheels -------------------------------------------------------------------------------
def cmd_wheels(a) -> int:
    wheels = sorted(glob.glob(os.path.join(a.dir, "*.whl")))
    if not wheels:
        return result("SKIP", f"no wheels in {a.dir}")
    done, present = [], []
    for w in wheels:
        dist = os.path.basename(w).split("-")[0].replace("_", "-")
        try:
            present.append(f"{dist} {importlib.metadata.version(dist)}")
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", w],
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            return result("FAIL", f"pip could not install {os.path.basename(w)}")
        done.append(dist)
    return result("PASS", f"installed {done or 'nothing'}; already present: {present or 'none'}")


# ---- CPU mode on a GPU machine ---------------------------------------------------------------------
CUDA_ATTRS = ["current_device", "device_count", "set_device", "synchronize", "current_stream", "default_stream",
              "Stream", "Event", "stream", "empty_cache", "memory_stats", "memory_allocated", "max_memory_allocated",
              "memory_reserved", "max_memory_reserved", "reset_peak_memory_stats", "get_rng_state", "set_rng_state",
              "manual_seed", "manual_seed_all"]


def _snapshot():
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import random as mrandom

    snap = {f"torch.cuda.{n}": getattr(torch.cuda, n) for n in CUDA_ATTRS}
    snap.update({"torch.cuda.nvtx.range_push": torch.cuda.nvtx.range_push,
                 "torch.cuda.nvtx.range_pop": torch.cuda.nvtx.range_pop,
                 "torch.cuda.random.get_rng_state": torch.cuda.random.get_rng_state,
                 "torch.cuda.random.manual_seed": torch.cuda.random.manual_seed,
                 "megatron _get_cuda_rng_state": mrandom._get_cuda_rng_state,
                 "megatron _set_cuda_rng_state": mrandom._set_cuda_rng_state,
                 "torch.distributed.barrier": dist.barrier, "Tensor.type": torch.Tensor.type,
                 "Tensor.cuda": torch.Tensor.cuda, "Tensor.to": torch.Tensor.to})
    return snap


def cmd_cpu_mode(a) -> int:
    import torch

    from instella_plugin import cpu_mode

    if a.dry_run:  # exercise the same logic on a CPU machine by pretending a GPU exists
        cpu_mode.gpu_available = lambda: True
    elif not cpu_mode.gpu_available():
        return result("FAIL", "torch sees no GPU (run with --dry-run on a CPU machine)")
    before = _snapshot()
    problems = []
    if cpu_mode.enable_if_no_gpu() is not False:
        problems.append("enable_if_no_gpu() did not return False")
    try:
        cpu_mode.enable()
        problems.append("enable() did not refuse")
    except RuntimeError as e:
        print(f"enable() refused: {e}")
    if cpu_mode.is_enabled():
        problems.append("is_enabled() is True")
    changed = [k for k, v in _snapshot().items() if v is not before[k]]
    if changed:
        problems.append(f"patched: {changed}")
    modes = torch.overrides._get_current_function_mode_stack()
    if modes:
        problems.append(f"torch function modes active: {modes}")
    if not a.dry_run:
        x = torch.zeros(2, device="cuda")
        if x.device.type != "cuda" or not isinstance(torch.cuda.current_device(), int):
            problems.append(f"a device='cuda' tensor landed on {x.device}")
    if problems:
        return result("FAIL", "; ".join(problems))
    return result("PASS", f"nothing patched ({len(before)} entry points unchanged), no function mode, enable() refuses"
                  + (" (dry run: GPU pretended)" if a.dry_run else ""))


# ---- every spec against instella's logits ----------------------------------------------------------------
def _init_single_process(device_type: str):
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from instella_plugin import cpu_mode
    from instella_plugin.testing.distributed import free_port

    if device_type == "cpu":
        cpu_mode.enable(force=True)
    else:
        torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("gloo" if device_type == "cpu" else "nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)


def _logits(spec, dtype, device, tokens, state=None):
    import torch

    from instella_plugin.model.build import build_gpt_chunks
    from instella_plugin.model.config import get_preset

    cfg = get_preset("instella-test")
    tcfg = cfg.transformer_config(params_dtype=dtype, cpu=device.type == "cpu")
    model = build_gpt_chunks(cfg, tcfg, spec, init_seed=None if state else 1234)[0].to(device)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in list(missing) + list(unexpected) if not k.endswith("_extra_state")]
        if bad:
            raise RuntimeError(f"spec {spec} has differently named weights: {bad[:8]}")
    model.eval()
    pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        out = model(tokens, pos, None).float()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return out, sd


PARITY_SPECS = ("instella-te", "instella-fused", "instella-fused-te", "instella-fused-apex")


def cmd_spec_parity(a) -> int:
    """Every other spec's bf16 logits against fp32 ``instella``, from the same weights: each must stay
    within 3x the error of ``instella`` itself in bf16 (or 1 % of the largest logit). The fused specs
    run our CUDA/HIP kernels here; ``-te`` / ``-apex`` take apex's or TE's RMSNorm (weight applied
    before the cast, so only bf16-close). Specs whose library does not import are listed as skipped."""
    import torch

    device = torch.device("cpu" if a.dry_run else "cuda")
    _init_single_process(device.type)
    from instella_plugin.kernels import fused_spec

    fused_spec.register()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 500, (2, 64), generator=g).to(device)
    ref, state = _logits("instella", torch.float32, device, tokens)
    bf16_state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    local, _ = _logits("instella", torch.bfloat16, device, tokens, bf16_state)
    scale = ref.abs().max().item()
    err_local = (local - ref).abs().max().item()
    tol = max(3 * err_local, 1e-2 * scale)
    checked, skipped, failed = [], [], []
    for spec in PARITY_SPECS:
        try:
            other, _ = _logits(spec, torch.bfloat16, device, tokens, bf16_state)
        except RuntimeError as e:
            if "does not import here" not in str(e):
                raise
            skipped.append(f"{spec} ({str(e).split(',')[0].split('needs ')[-1]})")
            continue
        err = (other - ref).abs().max().item()
        checked.append(f"{spec} {err:.3e}")
        if not err <= tol:
            failed.append(spec)
    torch.distributed.destroy_process_group()
    detail = (f"bf16 vs fp32 instella logits, max error: instella {err_local:.3e}; " + ", ".join(checked)
              + f"; tolerance {tol:.3e} (max |logit| {scale:.2f})"
              + (f"; skipped: {'; '.join(skipped)}" if skipped else "") + (" (dry run on the CPU)" if a.dry_run else ""))
    if failed:
        return result("FAIL", f"{', '.join(failed)} off: {detail}")
    return result("PASS" if checked else "SKIP", detail)


# ---- 20 training steps with the trainer --------------------------------------------------------------
LINE = re.compile(r"iteration\s+(\d+)/(\d+) \| loss (\S+) .*?\| (\d+) ms/step \| ([\d,]+) tokens/s \| "
                  r"([\d.]+) TFLOP/s/device \| MFU (\S+)")
# micro-batch, global batch per data-parallel replica (sequence length: the preset's). Micro-batch 1 for the
# 1B preset: the local spec's attention keeps [heads, s, s] probabilities per layer (about 1.6 GB at 4096).
SHAPES = {
    "instella-test": (2, 4), "instella-tiny": (8, 32), "instella-1b": (1, 16), "instella-3b": (1, 8)}


def parse_log(text: str):
    """[(iteration, loss, ms/step, tokens/s, TFLOP/s/device, MFU string)] from the trainer's log lines."""
    return [(int(m[1]), float(m[3]), float(m[4]), float(m[5].replace(",", "")), float(m[6]), m[7])
            for m in LINE.finditer(text)]


def cmd_train(a) -> int:
    import math

    from instella_plugin.testing.trainer import run_trainer

    device = "cpu" if a.dry_run else "cuda"
    mbs, gbs = SHAPES.get(a.preset, (1, 8))
    mbs, gbs = a.mbs or mbs, a.gbs or gbs
    interval = max(1, a.steps // 4)
    args = ["--plugin", "instella", "--model-preset", a.preset, "--mock-data", "--device", device,
            "--tensor-model-parallel-size", a.tp, "--micro-batch-size", mbs, "--global-batch-size", gbs,
            "--train-iters", a.steps, "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "2",
            "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--decay-all-params", "--adam-beta2", "0.95",
            "--log-interval", interval, "--no-plot", "--seed", "1234"]
    if a.spec:
        args += ["--spec", a.spec]
    if not a.dry_run:
        args.append("--bf16")
    if a.seq:
        args += ["--seq-length", a.seq]
    env = {"PYTHONUNBUFFERED": "1"}  # run_trainer sets OMP_NUM_THREADS=1 (GPU ranks need no more)
    print("pretrain_gpt.py " + " ".join(map(str, args)), flush=True)
    try:
        proc = run_trainer(a.tp, args, env=env, check=False, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return result("FAIL", f"{a.preset} TP={a.tp}: no exit within {a.timeout} s")
    lines = parse_log(proc.stdout)
    for raw in proc.stdout.splitlines():
        if raw.startswith("iteration"):
            print(raw)
    name = (f"{a.preset}{' --spec ' + a.spec if a.spec else ''} TP={a.tp} "
            f"{'bf16 NCCL' if not a.dry_run else 'fp32 gloo (dry run)'}")
    model_line = next((raw for raw in proc.stdout.splitlines() if raw.startswith("model:")), "")
    if a.spec and "fused" in a.spec and proc.returncode == 0 and "fused kernels: native" not in model_line:
        return result("FAIL", f"{name}: the fused kernels did not run natively ({model_line})")
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:])
        return result("FAIL", f"{name}: trainer exited {proc.returncode}")
    if not lines or lines[-1][0] != a.steps:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return result("FAIL", f"{name}: no log line for iteration {a.steps}")
    if not all(math.isfinite(x[1]) for x in lines):
        return result("FAIL", f"{name}: non-finite loss {[x[1] for x in lines]}")
    timed = lines[1:] or lines  # the first interval includes warm-up (allocator, kernels, NCCL set-up)
    tok = statistics.median(x[3] for x in timed)
    tfl = statistics.median(x[4] for x in timed)
    ms = statistics.median(x[2] for x in timed)
    return result("PASS", f"{name}: {tok:,.0f} tokens/s, {tfl:.1f} TFLOP/s/device, MFU {timed[-1][5]}, "
                  f"{ms:.0f} ms/step (median of iterations {timed[0][0]}..{timed[-1][0]}); "
                  f"loss {lines[0][1]:.3f} -> {lines[-1][1]:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("env", "cpu-mode", "spec-parity"):
        sub.add_parser(name).add_argument("--dry-run", action="store_true")
    w = sub.add_parser("wheels")
    w.add_argument("dir")
    t = sub.add_parser("train")
    t.add_argument("--preset", default="instella-tiny")
    t.add_argument("--tp", type=int, default=1)
    t.add_argument("--spec", help="layer spec (default: the plugin's, instella)")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--mbs", type=int)
    t.add_argument("--gbs", type=int)
    t.add_argument("--seq", type=int)
    t.add_argument("--timeout", type=int, default=300)
    t.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    fn = {"env": cmd_env, "wheels": cmd_wheels, "cpu-mode": cmd_cpu_mode, "spec-parity": cmd_spec_parity,
          "train": cmd_train}[a.cmd]
    try:
        return fn(a)
    except Exception as e:  # noqa: BLE001  (reported as the check's failure; the script goes on)
        import traceback

        traceback.print_exc()
        return result("FAIL", f"{a.cmd}: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    sys.exit(main())

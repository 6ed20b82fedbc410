"""GPU check of the fused kernels: build, check and time everything in one run (under 5 minutes).

Run on a CUDA (or ROCm) machine with its own Python and GPU build of torch, no network:

    python tests/gpu/check_kernels.py            # installs the package --no-deps, then checks
    python tests/gpu/check_kernels.py --no-install --device cpu   # the same checks on the CPU

Steps: (1) ``pip install --no-deps --no-build-isolation -e .`` with INSTELLA_KERNELS=all, the arch
list narrowed to this GPU (fast build); (2) every op on the GPU against an fp64 reference computed
here, fp32 and bf16, odd and Instella shapes, strided inputs, forward and gradients: error within 2x
PyTorch's own in the same precision; bitwise determinism; agreement with the CPU kernels;
torch.library.opcheck; (3) bench/bench_kernels.py on the device (eager, torch.compile, and Liger /
apex / Transformer Engine where importable), results into bench/results/kernels.json (and $OUT).
Exits non-zero on any failed check; prints one summary line per check.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILURES = []


def report(name, ok, detail=""):
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def install(device):
    import torch

    env = dict(os.environ, INSTELLA_KERNELS="all", MAX_JOBS=str(os.cpu_count() or 4))
    if device == "cuda" and torch.version.cuda:
        major, minor = torch.cuda.get_device_capability()
        env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    elif device == "cuda" and torch.version.hip:
        env.setdefault("PYTORCH_ROCM_ARCH", torch.cuda.get_device_properties(0).gcnArchName.split(":")[0])
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", ROOT],
                          env=env, capture_output=True, text=True)
    report("build", proc.returncode == 0, f"({time.time() - t0:.0f} s)")
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:])
        sys.exit(1)


# ---- references (the truth is the same code in float64) ----------------------------------------------
def rms_ref(x, w, eps=1e-5):
    import torch
    xa = x.float() if x.dtype != torch.float64 else x
    return w * (xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def qk_ref(x, w, f, eps=1e-5):
    import torch
    s, b, h, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc).reshape(s, b, h * d)
    y = (w * (xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)).to(acc).reshape(s, b, h, d)
    y1, y2 = y.chunk(2, dim=-1)
    return (y * torch.cos(f.to(acc)) + torch.cat((-y2, y1), -1) * torch.sin(f.to(acc))).to(x.dtype)


def swiglu_ref(x):
    import torch
    g, u = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def check_numerics(device):
    import torch

    from instella_plugin import kernels as K

    def grads(fn, inputs, dy):
        leaves = [t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(inputs)]
        y = fn(*leaves)
        return [y] + list(torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy.to(y.dtype)))

    def err(a, t):
        return ((a.double() - t).abs().max() / t.abs().max()).item()

    cases = [("rms_norm", lambda x, w: K.rms_norm(x, w), rms_ref, [(3, 7, 33), (4096, 2560)]),
             ("qk_norm_rope", lambda x, w, f: K.qk_norm_rope(x, w, f), qk_ref, [(5, 3, 3, 6), (512, 2, 32, 80)]),
             ("swiglu", K.swiglu, swiglu_ref, [(3, 5, 34), (1024, 2 * 6912)])]
    for name, fused, ref, shapes in cases:
        for dtype in (torch.float32, torch.bfloat16):
            worst = 0.0
            for shape in shapes:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(*shape[:-1], shape[-1] + 4, generator=g, dtype=torch.float64)[..., 2:-2]
                inputs = [x.to(device=device, dtype=dtype)]
                if name != "swiglu":
                    width = shape[-1] if name == "rms_norm" else shape[2] * shape[3]
                    inputs.append((1 + 0.3 * torch.randn(width, generator=g, dtype=torch.float64)).to(device, dtype))
                if name == "qk_norm_rope":
                    inputs.append((torch.randn(shape[0], 1, 1, shape[3], generator=g) * 100).to(device))
                y0 = ref(*inputs)
                dy = torch.randn(y0.shape, generator=g, dtype=torch.float64).to(device)
                truth = grads(ref, [t.double() if i < 2 else t for i, t in enumerate(inputs)], dy)
                own, ours = grads(ref, inputs, dy), grads(fused, inputs, dy)
                again = grads(fused, inputs, dy)
                for o, p, t in zip(ours, own, truth):
                    ratio = err(o, t) / (err(p, t) + torch.finfo(dtype).eps / 4)
                    worst = max(worst, ratio)
                report(f"{name} {dtype} {shape} deterministic", all(torch.equal(a, b) for a, b in zip(ours, again)))
                if device != "cpu" and shape == shapes[0]:
                    cpu = grads(fused, [t.cpu() for t in inputs], dy.cpu())
                    d = max(err(a.cpu(), b.double()) for a, b in zip(ours, cpu))
                    report(f"{name} {dtype} {shape} matches the CPU kernel", d <= 4 * torch.finfo(dtype).eps, f"{d:.2e}")
            report(f"{name} {dtype} error <= 2x PyTorch's", worst <= 2.0, f"(worst ratio {worst:.2f})")


def check_opcheck(device):
    import torch

    ops = torch.ops.instella
    x = torch.randn(5, 3, 12, device=device, requires_grad=True)
    w = torch.randn(12, device=device, requires_grad=True)
    q = torch.randn(4, 2, 3, 6, device=device, requires_grad=True)
    wq = torch.randn(18, device=device, requires_grad=True)
    f = torch.randn(4, 1, 1, 6, device=device)
    h = torch.randn(3, 2, 10, device=device, requires_grad=True)
    for op, args in [(ops.rms_norm_fwd.default, (x, w, 1e-5)), (ops.qk_norm_rope_fwd.default, (q, wq, f, 1e-5)),
                     (ops.qk_sumsq.default, (q,)), (ops.swiglu_fwd.default, (h,))]:
        try:
            torch.library.opcheck(op, args)
            report(f"opcheck {op}", True)
        except Exception as e:  # noqa: BLE001  (reported, then the run fails)
            report(f"opcheck {op}", False, str(e)[:300])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--no-bench", action="store_true")
    a = p.parse_args()
    if not a.no_install:
        install(a.device)
    sys.path.insert(0, ROOT)
    import torch

    from instella_plugin import kernels as K

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU visible to torch: run with --device cpu, or on a GPU machine")
    report(f"native kernels on {a.device}", K.backend(a.device) == "native", f"(native: {K.native_devices()})")
    check_numerics(a.device)
    check_opcheck(a.device)
    if not a.no_bench:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        import bench_kernels

        out = os.path.join(ROOT, "bench", "results", "kernels.json")
        # bf16 only (the training dtype) keeps the torch.compile warm-ups inside the 5-minute budget.
        bench_kernels.main(["--device", a.device, "--reps", "20", "--dtypes", "bfloat16", "--tokens", "4096", "16384",
                            "--out", out, "--label", "gpu-check"])
        if os.environ.get("OUT"):
            for name in ("kernels.json", f"kernels_{a.device}.png"):
                if os.path.exists(os.path.join(ROOT, "bench", "results", name)):
                    shutil.copy(os.path.join(ROOT, "bench", "results", name), os.environ["OUT"])
    print(f"{len(FAILURES)} failed checks" + (f": {FAILURES}" if FAILURES else ""))
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()

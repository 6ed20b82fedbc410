"""The CPU kernels' x86 levels: dispatch, the INSTELLA_CPU_ISA override, and the machine code of each level.

Each CPU worker is compiled for baseline x86-64 (SSE2), avx2 (x86-64-v3's vector set) and avx512
(x86-64-v4's) and dispatched per call (csrc/cpu/isa.h). Here: every op runs the best level this CPU
supports, read independently from /proc/cpuinfo; a forced level runs (and is reported) as asked, an
unknown or unsupported one is a clear error; and the built library's code for each level is vector
code of that level's width, with no library calls (the fp32 exp of SwiGLU and the sin/cos of RoPE
included) and streaming stores of that width for large outputs. Numerics per level: tests/test_kernels_numerics.py runs for every supported level.
"""
import os
import re
import shutil
import subprocess

import pytest
import torch

from instella_plugin import kernels as K
from instella_plugin.kernels.ops import _CPU, KERNELS

LEVELS = ("avx512", "avx2", "baseline")
NEEDS = {"avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"},
         "avx2": {"avx2", "fma"}, "baseline": set()}
needs_native = pytest.mark.skipif(K.backend("cpu") != "native", reason="the native CPU kernel is not built")


def cpuinfo_best_level():
    """The best level this CPU runs, from the kernel's /proc/cpuinfo flags (not from the extension)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return "baseline"
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to check the dispatch against")
    return next(level for level in LEVELS if NEEDS[level] <= flags)


@needs_native
def test_every_op_dispatches_to_the_best_level_the_cpu_supports(monkeypatch):
    monkeypatch.delenv("INSTELLA_CPU_ISA", raising=False)
    best = cpuinfo_best_level()
    assert K.dispatched_isa() == dict.fromkeys(KERNELS, best), (
        f"this CPU runs {best} (its /proc/cpuinfo flags) but the kernels dispatch to {K.dispatched_isa()}")
    assert K.supported_isas() == list(LEVELS[LEVELS.index(best):])
    assert K.describe_backend("cpu") == f"native ({best}: rms_norm, qk_norm_rope, swiglu)"


@needs_native
@pytest.mark.parametrize("level", LEVELS)
def test_a_forced_level_runs_and_is_reported(monkeypatch, level):
    if level not in K.supported_isas():
        pytest.skip(f"this CPU does not run {level}")
    monkeypatch.setenv("INSTELLA_CPU_ISA", level)
    assert K.dispatched_isa() == dict.fromkeys(KERNELS, level)
    x = torch.randn(6, 2 * 37, generator=torch.Generator().manual_seed(0))
    g, u = x.chunk(2, -1)
    torch.testing.assert_close(K.swiglu(x), torch.nn.functional.silu(g) * u, rtol=3e-6, atol=1e-6)


@needs_native
def test_unknown_or_unsupported_level_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("INSTELLA_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="INSTELLA_CPU_ISA=sse9: expected auto, avx512"):
        K.dispatched_isa()
    with pytest.raises((ValueError, RuntimeError), match="INSTELLA_CPU_ISA=sse9"):
        K.swiglu(torch.randn(2, 4))
    missing = [level for level in LEVELS if level not in K.supported_isas()]
    if missing:
        monkeypatch.setenv("INSTELLA_CPU_ISA", missing[0])
        with pytest.raises(ValueError, match="does not run that level; it runs"):
            K.dispatched_isa()


# ---- the machine code of each level, read back from the built library ---------------------------------
# Worker symbol prefixes (csrc/cpu/*.cpp) and an instruction each one's hot loop must hold in packed
# form: the float->int conversion of exp's exponent (SwiGLU) and of the RoPE quadrant (QK-norm + RoPE),
# the double sums of squares (a multiply, or an FMA where the level has one).
WORKERS = {
    "rms_fwd_chunk": "mulps", "rms_bwd_chunk": "mulps",
    "qk_sumsq_chunk": r"(?:mul|fmadd\w*)pd", "qk_fwd_chunk": "cvttpd2dq", "qk_bwd_chunk": "mulps",
    "swiglu_fwd_chunk": "cvttps2dq", "swiglu_bwd_chunk": "cvttps2dq",
}
# memset: zeroing a chunk's weight-gradient partial sums; memcpy: the unaligned ends of a streamed row.
ALLOWED_CALLS = {"memset@plt", "memcpy@plt"}
STREAMED = set(WORKERS) - {"qk_sumsq_chunk"}  # workers that stream large outputs (csrc/cpu/stream.h)
REGISTER = {0: "xmm", 1: "ymm", 2: "zmm"}


def disassembly():
    objdump = shutil.which("objdump")
    lib = getattr(_CPU, "__file__", None)
    if objdump is None or lib is None:
        pytest.skip("objdump (binutils) or the native CPU kernel is missing")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", lib], capture_output=True, text=True,
                          check=True).stdout
    functions = {}
    for block in re.split(r"\n(?=[0-9a-f]+ <)", text):
        head, _, body = block.partition("\n")
        m = re.search(r"::(\w+_chunk)<(float|unsigned short)>\(instella::cpu::IsaTag<(\d)>", head)
        if m:
            functions.setdefault((m.group(1), m.group(2), int(m.group(3))), []).append(body)
    return functions


@needs_native
@pytest.mark.skipif(not os.uname().machine == "x86_64", reason="the levels are x86 ones")
def test_every_worker_is_vector_code_of_its_level():
    functions = disassembly()
    levels = sorted({level for (_, _, level) in functions})
    assert levels == [0, 1, 2], f"expected workers for levels 0-2 in the library, found {levels}"
    problems = []
    for worker, marker in WORKERS.items():
        for dtype in ("float", "unsigned short"):
            for level, reg in REGISTER.items():
                bodies = functions.get((worker, dtype, level))
                if not bodies:
                    problems.append(f"{worker}<{dtype}> level {level}: not in the library")
                    continue
                code = "\n".join(bodies)
                calls = sorted(set(re.findall(r"\tcall\s+[0-9a-f]+\s+<(.*)>\s*$", code, re.M)) - ALLOWED_CALLS)
                if calls:
                    problems.append(f"{worker}<{dtype}> level {level}: calls {calls}")
                if not re.search(rf"\tv?{marker}\s+[^\n]*%{reg}", code):
                    problems.append(f"{worker}<{dtype}> level {level}: no packed {marker} on %{reg} registers")
                if worker in STREAMED and not re.search(rf"\tv?movntdq\s+%{reg}", code):
                    problems.append(f"{worker}<{dtype}> level {level}: no streaming stores of %{reg} registers")
                wider = [r for lv, r in REGISTER.items() if lv > level]
                if any(f"%{r}" in code for r in wider):
                    problems.append(f"{worker}<{dtype}> level {level}: uses registers of a higher level")
    assert not problems, "\n".join(problems)


# ---- the streamed path (outputs of 16 MiB and more) equals the cached one, bit for bit ----------------
def _fwd_bwd(fn, inputs, dy=None):
    """fn's output, its output gradient dy (random unless given) and the gradients of <y, dy>."""
    leaves = [t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    y = fn(*leaves)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype) if dy is None else dy
    return [y.detach(), dy] + list(torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_outputs_equal_the_cached_path(monkeypatch, dtype):
    """Each op on a tensor whose outputs pass the streaming threshold, against the same op on row blocks
    small enough to be written through the cache: outputs and input gradients equal bitwise, every level
    (the weight gradients are not streamed)."""
    g = torch.Generator().manual_seed(0)
    rows = (16 << 20) // (2560 * (torch.finfo(dtype).bits // 8)) + 8  # one output just over 16 MiB
    x = torch.randn(rows, 2560, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(2560, generator=g)).to(dtype)
    q = x.reshape(rows, 1, 32, 80)
    f = torch.outer(torch.arange(rows, dtype=torch.float32), torch.rand(40, generator=g)).repeat(1, 2)
    f = f.reshape(rows, 1, 1, 80)
    h = torch.randn(rows // 2, 2 * 2560, generator=g).to(dtype)  # SwiGLU's dx: the same 16 MiB and more
    cases = {"rms_norm": (lambda a, b: K.rms_norm(a, b), [x, w]),
             "qk_norm_rope": (lambda a, b, c: K.qk_norm_rope(a, b, c), [q, w, f]),
             "swiglu": (K.swiglu, [h])}
    for level in K.supported_isas():
        monkeypatch.setenv("INSTELLA_CPU_ISA", level)
        for name, (fn, inputs) in cases.items():
            whole = _fwd_bwd(fn, inputs)
            n, step = inputs[0].shape[0], inputs[0].shape[0] // 8
            blocks = [_fwd_bwd(fn, [t[i:i + step] if t.dim() > 1 else t for t in inputs], whole[1][i:i + step])
                      for i in range(0, n, step)]
            assert torch.equal(whole[0], torch.cat([b[0] for b in blocks])), f"{name} {dtype} {level}: output"
            assert torch.equal(whole[2], torch.cat([b[2] for b in blocks])), f"{name} {dtype} {level}: grad x"

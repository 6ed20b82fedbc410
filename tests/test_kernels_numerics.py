"""Numerics of the fused kernels against an fp64 reference written here, on the CPU path.

For each kernel, dtype (fp32, bf16), odd and Instella shapes, contiguous and strided inputs: the
error of the fused op (forward and every gradient) must be within 2x the error PyTorch itself makes
computing the same function in the same precision (plus a floor of a quarter ulp, for cases where
PyTorch happens to be exact). The same bound holds for the PyTorch fallback. Plus gradcheck in fp64
and bitwise determinism across runs and thread counts. The fused kernels' tests run once per x86 level
this CPU supports (avx512, avx2, baseline: INSTELLA_CPU_ISA, read by the dispatch at every call): the
best in the default tier, the others in the slow one.
"""
import pytest
import torch

from instella_plugin import kernels as K
from instella_plugin.kernels import fallback as FB

EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16]
LEVELS = K.supported_isas() or ["fallback"]  # "fallback": no native CPU kernel, nothing to force


# The level this CPU dispatches to runs in `make test`; the lower ones it can also run, in the slow tier.
@pytest.fixture(params=[pytest.param(lv, marks=[pytest.mark.slow] if i else []) for i, lv in enumerate(LEVELS)])
def level(request, monkeypatch):
    """Runs the test with the CPU kernels forced to one ISA level."""
    if request.param != "fallback":
        monkeypatch.setenv("INSTELLA_CPU_ISA", request.param)
        assert set(K.dispatched_isa().values()) == {request.param}
    return request.param


# ---- references: eager PyTorch; the truth is the same code run in float64 ----------------------------
def rms_ref(x, w):
    x32 = x.float() if x.dtype != torch.float64 else x
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def qk_rope_ref(x, w, freqs):
    s, b, h, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc).reshape(s, b, h * d)
    y = (w * (xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)).to(acc).reshape(s, b, h, d)
    f = freqs.to(acc)
    y1, y2 = y.chunk(2, dim=-1)
    return (y * torch.cos(f) + torch.cat((-y2, y1), dim=-1) * torch.sin(f)).to(x.dtype)


def swiglu_ref(x):
    g, u = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def rope_freqs(s, d, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = torch.outer(torch.arange(s, dtype=torch.float64) + 1000.0, inv)  # large angles too
    return torch.cat((f, f), dim=-1).float().reshape(s, 1, 1, d)


# ---- cases: (name, fused fn, reference fn, inputs factory) --------------------------------------------
def strided(t, how):
    """A non-contiguous tensor equal to t: rows inside a wider buffer, or transposed storage."""
    if how == "contiguous":
        return t
    if how == "wide":
        buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 7, dtype=t.dtype)
        buf[..., : t.shape[-1]] = t
        return buf[..., : t.shape[-1]]
    return t.transpose(0, 1).contiguous().transpose(0, 1)  # "transposed"


def make_inputs(kernel, shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if kernel == "rms_norm":
        w = (1 + 0.3 * torch.randn(shape[-1], generator=g, dtype=torch.float64)).to(dtype)
        return [strided(x, layout), w]
    if kernel == "qk_norm_rope":
        w = (1 + 0.3 * torch.randn(shape[2] * shape[3], generator=g, dtype=torch.float64)).to(dtype)
        return [strided(x, layout), w, rope_freqs(shape[0], shape[3])]
    return [strided(x, layout)]


KERNELS = {
    "rms_norm": (lambda x, w: K.rms_norm(x, w, EPS), rms_ref, [(3, 7, 33), (64, 2560)]),
    "qk_norm_rope": (lambda x, w, f: K.qk_norm_rope(x, w, f, EPS), qk_rope_ref, [(5, 3, 3, 6), (16, 2, 32, 80)]),
    "swiglu": (K.swiglu, swiglu_ref, [(3, 5, 34), (16, 2 * 6912)]),
}
FALLBACK = {
    "rms_norm": lambda x, w: FB.rms_norm_fwd(x, w, EPS)[0],
    "qk_norm_rope": lambda x, w, f: FB.qk_norm_rope_fwd(x, w, f, EPS)[0],
    "swiglu": FB.swiglu_fwd,
}


def outputs_and_grads(fn, inputs, dy_seed=1):
    """fn's output and the gradients of <output, dy> w.r.t. every floating input but freqs."""
    leaves = [t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    y = fn(*leaves)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=torch.float64)
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(y, wrt, dy.to(y.dtype))
    return [y] + list(grads)


def rel_err(a, truth):
    return ((a.double() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def check_against_fp64(kernel, fn, shape, dtype, layout):
    _, ref, _ = KERNELS[kernel]
    inputs = make_inputs(kernel, shape, dtype, layout)
    truth = outputs_and_grads(ref, [t.double() if t.dtype != torch.float32 or i < 2 else t
                                    for i, t in enumerate(inputs)])
    torch_own = outputs_and_grads(ref, inputs)
    ours = outputs_and_grads(fn, inputs)
    floor = torch.finfo(dtype).eps / 4
    for what, o, p, t in zip(["output", "grad x", "grad weight"], ours, torch_own, truth):
        assert o.dtype == p.dtype and o.shape == p.shape
        e_ours, e_torch = rel_err(o, t), rel_err(p, t)
        assert e_ours <= 2 * e_torch + floor, (
            f"{kernel} {dtype} {shape} {layout}: {what} error {e_ours:.3g} vs PyTorch's {e_torch:.3g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_fused_within_twice_pytorch_error(kernel, dtype, level):
    fn, _, shapes = KERNELS[kernel]
    for shape in shapes:
        for layout in ("contiguous", "wide", "transposed"):
            check_against_fp64(kernel, fn, shape, dtype, layout)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_fallback_within_twice_pytorch_error(kernel):
    _, _, shapes = KERNELS[kernel]
    for dtype in DTYPES:
        check_against_fp64(kernel, _with_autograd(kernel), shapes[0], dtype, "wide")


def _with_autograd(kernel):
    """The fallback's forward with the fallback's own backward formulas, as one autograd function."""
    fwd = {"rms_norm": lambda x, w: FB.rms_norm_fwd(x, w, EPS), "swiglu": lambda x: (FB.swiglu_fwd(x),),
           "qk_norm_rope": lambda x, w, f: FB.qk_norm_rope_fwd(x, w, f, EPS)}[kernel]

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = fwd(*args)
            ctx.save_for_backward(*args, *out[1:])
            return out[0]

        @staticmethod
        def backward(ctx, dy):
            saved = ctx.saved_tensors
            if kernel == "rms_norm":
                return FB.rms_norm_bwd(dy, *saved)
            if kernel == "swiglu":
                return (FB.swiglu_bwd(dy, saved[0]),)
            x, w, f, rstd = saved
            dx, dw, _ = FB.qk_norm_rope_bwd(dy, x, w, f, rstd, x.shape[2] * x.shape[3], False)
            return dx, dw, None

    return Fn.apply


def test_gradcheck_fp64(level):
    g = torch.Generator().manual_seed(3)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(lambda x, w: K.rms_norm(x, w, EPS), (r(4, 3, 9), r(9)))
    f = rope_freqs(4, 6).double()
    assert torch.autograd.gradcheck(lambda x, w: K.qk_norm_rope(x, w, f, EPS), (r(4, 2, 3, 6), r(18)))
    # The TP split with a one-rank "all-reduce": sum of squares -> apply, gradient through both.
    assert torch.autograd.gradcheck(lambda x, w: K.qk_norm_rope_tp(x, w, f, 18, lambda t: t, EPS),
                                    (r(4, 2, 3, 6), r(18)))
    # A strided q (a slice of a wider qkv tensor), as megatron hands it over.
    qkv = r(4, 2, 3, 14)
    assert torch.autograd.gradcheck(lambda t, w: K.qk_norm_rope(t[..., 4:10], w, f, EPS), (qkv, r(18)))
    assert torch.autograd.gradcheck(K.swiglu, (r(3, 5, 14),))


def test_tp_apply_with_full_width_equals_unsplit(level):
    x, w, f = make_inputs("qk_norm_rope", (6, 2, 4, 8), torch.float64, "contiguous")
    ss = K.ops.qk_sumsq(x)
    assert torch.allclose(ss, x.pow(2).sum((2, 3)), rtol=1e-14)
    a = K.ops.qk_norm_rope_apply(x, w, f, ss, 32, EPS)[0]
    assert torch.allclose(a, K.qk_norm_rope(x, w, f, EPS), rtol=0, atol=1e-14)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_bitwise_deterministic_across_runs_and_threads(kernel, level):
    fn, _, shapes = KERNELS[kernel]
    inputs = make_inputs(kernel, shapes[-1], torch.bfloat16, "contiguous")
    first = outputs_and_grads(fn, inputs)
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, 3):
            torch.set_num_threads(n)
            again = outputs_and_grads(fn, inputs)
            assert all(torch.equal(a, b) for a, b in zip(first, again)), f"{kernel} differs with {n} threads"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_non_finite_rows_as_pytorch(dtype, level):
    """Rows holding a NaN or an infinity (and for bf16, whose squares are summed in float as PyTorch
    does, values whose squares overflow), with a finite weight and with one holding an infinity: the
    fused forward puts NaNs and infinities where PyTorch does, and the finite values agree (the bf16
    forward takes its NaN-free rounding only for rows whose sum of squares is finite, with a finite weight)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 64, generator=g).to(dtype)
    x[0, 5], x[1, 7], x[3, 9] = float("nan"), float("inf"), -float("inf")
    if dtype == torch.bfloat16:
        x[2, :] = 3e38  # (fp32 rows are summed in double: no overflow, unlike PyTorch's float mean)
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    for weight in (w, w.clone().index_fill_(0, torch.tensor([3]), float("inf"))):
        ours, want = K.rms_norm(x, weight).float(), rms_ref(x, weight).float()
        assert torch.equal(ours.isnan(), want.isnan()), (dtype, level)
        assert torch.equal(ours.isinf(), want.isinf()) and torch.equal(ours[ours.isinf()], want[want.isinf()])
        fin = want.isfinite()
        assert fin.sum() >= 2 * 63 and torch.allclose(ours[fin], want[fin], rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_rms_norm_bf16_word_pairs_equal_the_element_loop(level):
    """bf16 rows of even width on 4-byte boundaries are read and written two values a word
    (csrc/cpu/rms_norm.cpp); the same rows at an odd offset take the element loop. Output and rstd
    are the same bits either way, at widths with and without a tail of under 32 values, for finite
    rows and for rows holding a NaN or an infinity."""
    g = torch.Generator().manual_seed(5)
    for hidden in (2560, 70):
        x = (3 * torch.randn(9, hidden, generator=g)).to(torch.bfloat16)
        x[4, 3], x[6, hidden - 1] = float("nan"), float("inf")
        w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(torch.bfloat16)
        buf = torch.empty(x.numel() + 1, dtype=torch.bfloat16)
        odd = buf[1:].view(9, hidden).copy_(x)  # 2-byte offset: not on a 4-byte boundary
        assert odd.data_ptr() % 4 == 2 and x.data_ptr() % 4 == 0
        y_pair, rstd_pair = K.ops.rms_norm_fwd(x, w, EPS)
        y_elem, rstd_elem = K.ops.rms_norm_fwd(odd, w, EPS)
        assert torch.equal(y_pair.view(torch.int16), y_elem.view(torch.int16)), (hidden, level)
        assert torch.equal(rstd_pair.view(torch.int32), rstd_elem.view(torch.int32)), (hidden, level)
        fin = torch.ones(9, dtype=torch.bool)
        fin[[4, 6]] = False
        assert torch.allclose(y_pair[fin].float(), rms_ref(x, w)[fin].float(),
                              rtol=2 * torch.finfo(torch.bfloat16).eps, atol=0)


# ---- the bf16 rounding shortcut, over every float ------------------------------------------------------
ROUND_TRIP_CHECK = r"""
#include <stdio.h>
#include "instella_kernels/scalar.h"
#include "cpu_common.h"
using namespace instella;
int main() {
  unsigned long long bad = 0;
  for (unsigned long long i = 0; i < (1ull << 32); ++i) {
    const float v = bits_to_float(uint32_t(i));
    const uint32_t trip = float_to_bits(to_acc(from_acc<bf16>(v)));
    if (float_to_bits(round_to<bf16>(v)) != trip) ++bad;
    // the CPU kernels' forms (csrc/cpu/cpu_common.h): the same bits, NaN payloads included
    if (float_to_bits(cpu::round_dtype<bf16>(v)) != trip || cpu::to_dtype<bf16>(v) != from_acc<bf16>(v)) ++bad;
    // and their forms for values known not to be NaN, on every other float
    if (v == v && (float_to_bits(cpu::round_dtype_no_nan<bf16>(v)) != trip ||
                   cpu::to_dtype_no_nan<bf16>(v) != from_acc<bf16>(v))) ++bad;
  }
  printf("%llu\n", bad);
}
"""


def test_bf16_round_to_equals_the_16_bit_round_trip_for_every_float(tmp_path):
    """round_to<bf16> stays in 32-bit lanes; it must equal narrowing to bf16 and widening back, bit for
    bit, for all 2^32 inputs (NaNs, infinities, subnormals, ties); so must the CPU kernels' forms of both,
    and their NaN-free forms for every input but NaN."""
    import os
    import shutil
    import subprocess

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler (the CPU extension could not have been built either)")
    src, exe = tmp_path / "check.cpp", tmp_path / "check"
    src.write_text(ROUND_TRIP_CHECK)
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    subprocess.run([cxx, "-O2", "-std=c++17", "-I", os.path.join(csrc, "include"), "-I", os.path.join(csrc, "cpu"),
                    str(src), "-o", str(exe)], check=True)
    assert subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.strip() == "0"

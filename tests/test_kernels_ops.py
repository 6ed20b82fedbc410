"""The instella:: operators as torch.library ops: opcheck, torch.compile, errors, build targets, fallback."""
import os
import subprocess
import sys

import pytest
import torch

from instella_plugin import kernels as K
from instella_plugin.kernels import build_targets

ops = torch.ops.instella
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)

    x, w = r(5, 3, 12), r(12)
    q, wq = r(4, 2, 3, 6), r(18)
    f = torch.randn(4, 1, 1, 6, generator=g, dtype=torch.float32)
    h = r(3, 2, 10)
    return x, w, q, wq, f, h


def test_native_cpu_kernel_is_built():
    assert K.native_devices() == ["cpu"] or "cpu" in K.native_devices(), (
        "the CPU extension did not build; run pip install --no-build-isolation -e . and read its log")
    assert K.backend("cpu") == "native"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_every_op(dtype):
    x, w, q, wq, f, h = _args(dtype, grad=True)
    acc = torch.float32
    y, rstd = ops.rms_norm_fwd(x.detach(), w.detach(), 1e-5)
    qy, qr = ops.qk_norm_rope_fwd(q.detach(), wq.detach(), f, 1e-5)
    ss = ops.qk_sumsq(q.detach()).requires_grad_(True)
    cases = [
        (ops.rms_norm_fwd.default, (x, w, 1e-5)),
        (ops.rms_norm_bwd.default, (torch.randn_like(y), x.detach(), w.detach(), rstd)),
        (ops.qk_sumsq.default, (q,)),
        (ops.qk_norm_rope_fwd.default, (q, wq, f, 1e-5)),
        (ops.qk_norm_rope_apply.default, (q, wq, f, ss, 36, 1e-5)),
        (ops.qk_norm_rope_bwd.default, (torch.randn_like(qy), q.detach(), wq.detach(), f, qr, 18, False)),
        (ops.qk_norm_rope_bwd.default, (torch.randn_like(qy), q.detach(), wq.detach(), f, qr.to(acc), 36, True)),
        (ops.swiglu_fwd.default, (h,)),
        (ops.swiglu_bwd.default, (torch.randn(3, 2, 5, dtype=dtype), h.detach())),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_traces_the_ops():
    x, w, q, wq, f, h = _args(torch.float32)

    def model(x, w, q, wq, h):
        return K.rms_norm(x, w).sum() + K.qk_norm_rope(q, wq, f).sum() + K.swiglu(h).sum()

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, q, wq, h)]
    leaves2 = [t.clone().requires_grad_(True) for t in (x, w, q, wq, h)]
    torch.testing.assert_close(compiled(*leaves), model(*leaves2))
    compiled(*leaves).backward()
    model(*leaves2).backward()
    for a, b in zip(leaves, leaves2):
        torch.testing.assert_close(a.grad, b.grad)


BAD = [
    ("unsupported dtype", lambda: ops.rms_norm_fwd(torch.ones(2, 4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), 1e-5)),
    ("unsupported dtype", lambda: ops.swiglu_fwd(torch.ones(2, 4, dtype=torch.float16))),
    ("cast weight", lambda: ops.rms_norm_fwd(torch.ones(2, 4), torch.ones(4, dtype=torch.float64), 1e-5)),
    ("does not match the last dim", lambda: ops.rms_norm_fwd(torch.ones(2, 4), torch.ones(5), 1e-5)),
    ("[s, b, heads, head_dim]", lambda: ops.qk_norm_rope_fwd(torch.ones(2, 4, 6), torch.ones(24), torch.ones(2, 6), 1e-5)),
    ("odd", lambda: ops.qk_norm_rope_fwd(torch.ones(2, 1, 2, 5), torch.ones(10), torch.ones(2, 1, 1, 5), 1e-5)),
    ("local width", lambda: ops.qk_norm_rope_fwd(torch.ones(2, 1, 2, 4), torch.ones(4), torch.ones(2, 1, 1, 4), 1e-5)),
    ("freqs of shape", lambda: ops.qk_norm_rope_fwd(torch.ones(2, 1, 2, 4), torch.ones(8), torch.ones(3, 1, 1, 4), 1e-5)),
    ("freqs must be float32", lambda: ops.qk_norm_rope_fwd(torch.ones(2, 1, 2, 4), torch.ones(8), torch.ones(2, 1, 1, 4, dtype=torch.bfloat16), 1e-5)),
    ("smaller than the local width", lambda: ops.qk_norm_rope_apply(torch.ones(2, 1, 2, 4), torch.ones(8), torch.ones(2, 1, 1, 4), torch.ones(2, 1), 4, 1e-5)),
    ("must be even", lambda: ops.swiglu_fwd(torch.ones(3, 5))),
    ("does not match x", lambda: ops.swiglu_bwd(torch.ones(3, 3), torch.ones(3, 4))),
]


@pytest.mark.parametrize("needle,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(needle, call):
    with pytest.raises(ValueError, match=None) as e:
        call()
    assert needle in str(e.value)


def test_non_cpu_tensor_on_the_cpu_kernel_is_refused():
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    x, w = torch.ones(2, 4, device="meta"), torch.ones(4, device="meta")
    with pytest.raises(ValueError, match="expected CPU tensors"):
        ops.rms_norm_fwd.default.redispatch(cpu_only, x, w, 1e-5)
    with pytest.raises(ValueError, match="put all inputs on one device"):
        ops.rms_norm_fwd(torch.ones(2, 4), w, 1e-5)


def test_build_targets_never_fail(monkeypatch, capsys):
    monkeypatch.setenv("INSTELLA_KERNELS", "none")
    assert build_targets.extension_modules() == ([], {})
    monkeypatch.setenv("INSTELLA_KERNELS", "cpu")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert build_targets.extension_modules() == ([], {})
    assert "no C++ compiler" in capsys.readouterr().err
    monkeypatch.delenv("CXX")
    exts, cmd = build_targets.extension_modules()
    assert [e.name for e in exts] == ["instella_plugin.kernels._cpu"] and "build_ext" in cmd
    assert set(build_targets.cpu_sources()) == {"csrc/cpu/rms_norm.cpp", "csrc/cpu/qk_norm_rope.cpp",
                                                "csrc/cpu/swiglu.cpp", "csrc/cpu/torch_ops.cpp", "csrc/cpu/isa.cpp",
                                                "csrc/cpu/output_cache.cpp"}
    assert "-fno-trapping-math" in exts[0].extra_compile_args  # else exp's clamps stop SwiGLU vectorising
    with pytest.raises(ValueError, match="INSTELLA_KERNELS"):
        build_targets.requested_targets("gpu-please")
    # Without torch at build time: no extensions, one line, no exception.
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, 'instella_plugin/kernels'); "
            "import build_targets; print(build_targets.extension_modules())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "([], {})" and out.stderr.count("\n") == 1 and "torch not importable" in out.stderr


OUTPUT_CACHE_CHECK = r"""
import torch
from instella_plugin import kernels as K
from instella_plugin.kernels import output_cache

def held():
    return output_cache()["held"] >> 20

x1, x2, w = torch.randn(1024, 512), torch.randn(2048, 512), torch.ones(512)  # 2 and 4 MiB outputs
want1 = (x1 * torch.rsqrt(x1.pow(2).mean(-1, keepdim=True) + 1e-5)) * w
y = K.rms_norm(x1, w)
first = y.data_ptr()
del y
assert held() == 2, held()
y = K.rms_norm(x1, w)  # the freed block again, already resident, written afresh
assert y.data_ptr() == first and held() == 0 and torch.allclose(y, want1, rtol=1e-6, atol=1e-6)
y2 = K.rms_norm(x2, w)  # another size: a new block
assert y2.data_ptr() != first
del y, y2
assert held() == 6, held()
ys = [K.rms_norm(x2, w) for _ in range(2)]  # one 4 MiB block reused, one new
del ys
assert held() == 8, held()  # the cap (8 MiB): nothing dropped yet
y3 = K.rms_norm(torch.randn(3072, 512), w)  # 6 MiB: no such block; when freed, the oldest go
del y3
assert held() <= 8, held()
small = K.rms_norm(torch.randn(4, 512), w)  # under 1 MiB: PyTorch's allocator
del small
assert held() <= 8
print("ok")
"""


def test_cpu_output_cache_reuses_freed_outputs_within_its_cap():
    """The CPU ops' large outputs come from a cache of their own freed blocks (csrc/cpu/output_cache.h):
    a freed block of the same size is handed back (same address, correct values written), other sizes
    get new blocks, the cap holds, the oldest blocks go first; INSTELLA_CPU_OUTPUT_CACHE_MB=0 keeps nothing."""
    env = dict(os.environ, INSTELLA_CPU_OUTPUT_CACHE_MB="8")
    out = subprocess.run([sys.executable, "-c", OUTPUT_CACHE_CHECK], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    code = ("import torch; from instella_plugin import kernels as K; "
            "y = K.rms_norm(torch.randn(1024, 512), torch.ones(512)); del y; print(K.output_cache())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, INSTELLA_CPU_OUTPUT_CACHE_MB="0"))
    assert out.stdout.strip() == "{'held': 0, 'cap': 0}", out.stdout


def test_missing_extension_falls_back_with_one_log_line():
    code = ("import logging, torch; logging.basicConfig(); from instella_plugin import kernels as K; "
            "x = torch.randn(4, 8, requires_grad=True); w = torch.ones(8, requires_grad=True); "
            "ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)); "
            "y = K.rms_norm(x, w); y.sum().backward(); K.rms_norm(x, w); K.swiglu(torch.ones(2, 4)); "
            "assert torch.allclose(y, ref, atol=1e-6), (y, ref); print(K.backend('cpu'))")
    env = dict(os.environ, INSTELLA_KERNELS="none")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fallback"
    lines = [line for line in out.stderr.splitlines() if "instella kernels" in line]
    assert len(lines) == 1 and "PyTorch fallback on cpu" in lines[0], out.stderr


# ---- apex / Transformer Engine RMSNorms (instella-fused-apex, instella-fused-te) -------------------------
@pytest.mark.parametrize("name,library", [("instella-fused-apex", "apex"), ("instella-fused-te", "Transformer Engine")])
def test_vendor_norm_specs_without_their_library_name_it_and_the_fix(name, library):
    """Neither library installs on the CPU machines; asking for its spec fails before any building."""
    from instella_plugin.model import specs

    with pytest.raises(RuntimeError) as e:
        specs.get_spec(name, config=None)
    assert library in str(e.value) and "--spec instella-fused" in str(e.value)


class _StubTERMSNorm(torch.nn.Module):
    """Stands in for transformer_engine.pytorch.RMSNorm: its constructor arguments and TE's rounding
    order (weight applied before the cast)."""

    def __init__(self, hidden_size, eps=1e-5, params_dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 7.0, dtype=params_dtype, device=device))

    def forward(self, x):
        x32 = x.float()
        return (self.weight.float() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def test_te_norm_uses_its_own_weight_and_keeps_instellas_state_dict(monkeypatch):
    from types import SimpleNamespace

    from instella_plugin.kernels import vendor_norms

    monkeypatch.setattr(vendor_norms, "te_rms_norm_class", lambda: _StubTERMSNorm)
    norm = vendor_norms.TERMSNorm(SimpleNamespace(params_dtype=torch.float32, sequence_parallel=True), 8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8, requires_grad=True)
    y = norm(x)
    x32 = x.detach()
    expect = norm.weight.detach() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.detach(), expect)  # the stub's 7.0 weight was replaced by ours
    y.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert list(norm.state_dict()) == ["weight"] and norm.weight.sequence_parallel

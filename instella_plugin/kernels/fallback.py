"""PyTorch implementations of the ``instella::`` ops, and the input checks every backend shares.

They compute what the native kernels compute (same rounding points, Acc = float32, or float64 for
float64 inputs) with plain tensor ops, and serve any device without a native kernel. The first call
on a device logs one line saying the fallback is in use. The checks raise ``ValueError`` naming the
problem and the fix; the fake implementations call them too, so ``torch.compile`` fails the same way.
"""
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("instella_plugin.kernels")

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_missing = {}
_announced = set()


def note_missing(name: str, reason: str) -> None:
    _missing[name] = reason


def announce(t: torch.Tensor) -> None:
    """Log, once per device type, that the fallback serves it."""
    dev = t.device.type
    if dev not in _announced:
        _announced.add(dev)
        why = _missing.get("_cpu" if dev == "cpu" else "_gpu", "no native kernel for this device")
        log.warning("instella kernels: using the PyTorch fallback on %s (%s)", dev, why.splitlines()[0])


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _check_common(x, op, others):
    if x.dtype not in DTYPES:
        _fail(op, f"unsupported dtype {x.dtype}; supported are float32, float64 and bfloat16 (cast the input first)")
    for name, t in others.items():
        if t is None:
            continue
        if t.device != x.device:
            _fail(op, f"{name} is on {t.device} but x is on {x.device}; put all inputs on one device")
        if name in ("weight", "grad") and t.dtype != x.dtype:
            _fail(op, f"{name} has dtype {t.dtype} but x has {x.dtype}; cast {name} to the dtype of x")


def check_rms(x, weight, op, dy=None, rstd=None):
    _check_common(x, op, {"weight": weight, "grad": dy, "rstd": rstd})
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        _fail(op, f"weight shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if dy is not None and dy.shape != x.shape:
        _fail(op, f"grad {tuple(dy.shape)} and x {tuple(x.shape)} differ in shape")
    if rstd is not None and (rstd.numel() * x.shape[-1] != x.numel() or rstd.dtype != acc_dtype(x)):
        _fail(op, f"rstd {tuple(rstd.shape)} {rstd.dtype} does not fit x; pass what rms_norm_fwd saved")


def check_qk(x, weight, freqs, op, dy=None, rstd=None, ss=None, full_width=None):
    _check_common(x, op, {"weight": weight, "grad": dy, "freqs": freqs, "rstd": rstd, "ss": ss})
    if x.dim() != 4:
        _fail(op, f"expected q or k of shape [s, b, heads, head_dim] (Megatron's layout), got {tuple(x.shape)}")
    s, b, h, d = x.shape
    if d % 2:
        _fail(op, f"head_dim {d} is odd; rotate-half RoPE needs an even head_dim")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != h * d):
        _fail(op, f"weight of shape {tuple(weight.shape)} does not cover the local width heads*head_dim = "
                  f"{h * d} of x {tuple(x.shape)}")
    if freqs is not None:
        if freqs.dtype not in (torch.float32, torch.float64):
            _fail(op, f"freqs must be float32 or float64 (RoPE angles), got {freqs.dtype}")
        if freqs.dim() < 2 or freqs.shape[0] != s or freqs.shape[-1] != d or freqs.numel() != s * d:
            _fail(op, f"freqs of shape {tuple(freqs.shape)} do not match x {tuple(x.shape)}; "
                      f"expected [s, 1, 1, head_dim] = [{s}, 1, 1, {d}]")
    if dy is not None and dy.shape != x.shape:
        _fail(op, f"grad {tuple(dy.shape)} and x {tuple(x.shape)} differ in shape")
    for name, t in (("ss", ss), ("rstd", rstd)):
        if t is not None and (t.numel() != s * b or t.dtype != acc_dtype(x)):
            _fail(op, f"{name} must hold {s * b} values of dtype {acc_dtype(x)}, got {tuple(t.shape)} {t.dtype}")
    if full_width is not None and full_width < h * d:
        _fail(op, f"full_width {full_width} is smaller than the local width {h * d}; pass the width of q or "
                  "k before tensor-parallel splitting")


def check_swiglu(x, op, dy=None):
    _check_common(x, op, {"grad": dy})
    if x.dim() < 1 or x.shape[-1] % 2:
        _fail(op, f"the last dim of x {tuple(x.shape)} must be even: it holds [gate | up] "
                  "(Megatron's fc1 output with gated_linear_unit)")
    if dy is not None and dy.shape != x.shape[:-1] + (x.shape[-1] // 2,):
        _fail(op, f"grad {tuple(dy.shape)} does not match x {tuple(x.shape)}")


# ---- RMSNorm ---------------------------------------------------------------------------------------
def rms_norm_fwd(x, weight, eps):
    check_rms(x, weight, "instella::rms_norm_fwd")
    xa = x.to(acc_dtype(x))
    rstd = torch.rsqrt(xa.pow(2).mean(-1) + eps)
    y = weight * (xa * rstd[..., None]).to(x.dtype)
    return y.contiguous(), rstd


def rms_norm_bwd(dy, x, weight, rstd):
    check_rms(x, weight, "instella::rms_norm_bwd", dy=dy, rstd=rstd)
    acc, n = acc_dtype(x), x.shape[-1]
    xa, g, r = x.to(acc), dy.to(acc), rstd.to(acc).reshape(x.shape[:-1])[..., None]
    dn = g * weight.to(acc)
    dot = (dn * xa).sum(-1, keepdim=True)
    dx = (r * dn - r.pow(3) * xa * dot / n).to(x.dtype)
    dw = (g * (xa * r).to(x.dtype).to(acc)).reshape(-1, n).sum(0).to(weight.dtype)
    return dx.contiguous(), dw


# ---- full-width QK-norm + RoPE ---------------------------------------------------------------------
def _cos_sin(freqs, x):
    f = freqs.to(acc_dtype(x)).reshape(x.shape[0], 1, 1, x.shape[3])
    return torch.cos(f), torch.sin(f)


def _rotate_half(t):
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat((-t2, t1), dim=-1)


def _qk_forward(x, weight, freqs, ss, full_width, eps):
    s, b, h, d = x.shape
    xa = x.to(acc_dtype(x)).reshape(s, b, h * d)
    if ss is None:
        ss = xa.pow(2).sum(-1)
    rstd = torch.rsqrt(ss.reshape(s, b) / full_width + eps)
    y = (weight * (xa * rstd[..., None]).to(x.dtype)).to(xa.dtype).reshape(s, b, h, d)
    cos, sin = _cos_sin(freqs, x)
    return (y * cos + _rotate_half(y) * sin).to(x.dtype).contiguous(), rstd


def qk_sumsq(x):
    check_qk(x, None, None, "instella::qk_sumsq")
    return x.to(acc_dtype(x)).pow(2).sum((2, 3))


def qk_norm_rope_fwd(x, weight, freqs, eps):
    check_qk(x, weight, freqs, "instella::qk_norm_rope_fwd")
    return _qk_forward(x, weight, freqs, None, x.shape[2] * x.shape[3], eps)


def qk_norm_rope_apply(x, weight, freqs, ss, full_width, eps):
    check_qk(x, weight, freqs, "instella::qk_norm_rope_apply", ss=ss, full_width=full_width)
    return _qk_forward(x, weight, freqs, ss, full_width, eps)


def qk_norm_rope_bwd(dy, x, weight, freqs, rstd, full_width, split):
    check_qk(x, weight, freqs, "instella::qk_norm_rope_bwd", dy=dy, rstd=rstd, full_width=full_width)
    s, b, h, d = x.shape
    acc = acc_dtype(x)
    cos, sin = _cos_sin(freqs, x)
    g = dy.to(acc)
    gs1, gs2 = (g * sin).chunk(2, dim=-1)
    u = (g * cos + torch.cat((gs2, -gs1), dim=-1)).reshape(s, b, h * d)  # RoPE^T dy
    xa, r = x.to(acc).reshape(s, b, h * d), rstd.to(acc).reshape(s, b, 1)
    dw = (u * (xa * r).to(x.dtype).to(acc)).sum((0, 1)).to(weight.dtype)
    dn = u * weight.to(acc)
    c = r.pow(3) * (dn * xa).sum(-1, keepdim=True) / full_width
    if split:
        dx, dss = r * dn, (-0.5 * c).reshape(s, b)
    else:
        dx, dss = r * dn - c * xa, x.new_empty((0, 0), dtype=acc)
    return dx.to(x.dtype).reshape(s, b, h, d).contiguous(), dw, dss


# ---- SwiGLU ----------------------------------------------------------------------------------------
def swiglu_fwd(x):
    check_swiglu(x, "instella::swiglu_fwd")
    g, u = x.to(acc_dtype(x)).chunk(2, dim=-1)
    return (F.silu(g) * u).to(x.dtype).contiguous()


def swiglu_bwd(dy, x):
    check_swiglu(x, "instella::swiglu_bwd", dy=dy)
    g, u = x.to(acc_dtype(x)).chunk(2, dim=-1)
    sig, gy = torch.sigmoid(g), dy.to(g.dtype)
    dg = gy * u * sig * (1 + g * (1 - sig))
    return torch.cat((dg, gy * g * sig), dim=-1).to(x.dtype).contiguous()

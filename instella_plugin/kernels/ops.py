"""The ``torch.ops.instella`` operators: schemas, fake implementations, autograd, backends.

Every op is defined here once. Native kernels register themselves for the CPU (``_cpu``, from
csrc/cpu) and CUDA/ROCm (``_gpu``, from csrc/cuda) dispatch keys when their extension imports; the
PyTorch implementation in ``fallback.py`` is registered as the CompositeExplicitAutograd kernel, so
it serves every device without a native kernel (and says so once per device in the log). Fake
implementations let ``torch.compile`` trace the ops; autograd is registered on the forward ops.

Ops (``Acc`` = float64 for float64 inputs, float32 otherwise):
- ``rms_norm_fwd(x, weight, eps) -> (y, rstd[Acc])``, ``rms_norm_bwd(dy, x, weight, rstd) -> (dx, dw)``
- ``qk_norm_rope_fwd(x, weight, freqs, eps) -> (y, rstd)``: full-width RMSNorm of q or k
  ``[s, b, heads, head_dim]`` then rotate-half RoPE with angles ``freqs [s, 1, 1, head_dim]``;
- ``qk_sumsq(x) -> ss[Acc, s x b]`` and ``qk_norm_rope_apply(x, weight, freqs, ss, full_width, eps)``:
  the tensor-parallel split (the caller all-reduces ``ss`` in between, autograd-aware);
- ``qk_norm_rope_bwd(dy, x, weight, freqs, rstd, full_width, split) -> (dx, dw, dss)``;
- ``swiglu_fwd(x[..., 2F]) -> y[..., F]`` (x = [gate | up]), ``swiglu_bwd(dy, x) -> dx``.
"""
import importlib
import os

import torch

from instella_plugin.kernels import fallback

SCHEMAS = {
    "rms_norm_fwd": "(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
    "rms_norm_bwd": "(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)",
    "qk_sumsq": "(Tensor x) -> Tensor",
    "qk_norm_rope_fwd": "(Tensor x, Tensor weight, Tensor freqs, float eps) -> (Tensor, Tensor)",
    "qk_norm_rope_apply": "(Tensor x, Tensor weight, Tensor freqs, Tensor ss, int full_width, float eps)"
                          " -> (Tensor, Tensor)",
    "qk_norm_rope_bwd": "(Tensor dy, Tensor x, Tensor weight, Tensor freqs, Tensor rstd, int full_width,"
                        " bool split) -> (Tensor, Tensor, Tensor)",
    "swiglu_fwd": "(Tensor x) -> Tensor",
    "swiglu_bwd": "(Tensor dy, Tensor x) -> Tensor",
}



def _announcing(fn):
    def run(*args):
        fallback.announce(args[0])
        return fn(*args)
    run.__name__ = fn.__name__
    return run


_lib = torch.library.Library("instella", "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, _announcing(getattr(fallback, _name)), "CompositeExplicitAutograd")

ops = torch.ops.instella


# ---- fake (meta) implementations: same checks and output metadata as the kernels -----------------
@torch.library.register_fake("instella::rms_norm_fwd")
def _(x, weight, eps):
    fallback.check_rms(x, weight, "instella::rms_norm_fwd")
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        x.new_empty(x.shape[:-1], dtype=fallback.acc_dtype(x))


@torch.library.register_fake("instella::rms_norm_bwd")
def _(dy, x, weight, rstd):
    fallback.check_rms(x, weight, "instella::rms_norm_bwd", dy=dy, rstd=rstd)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


@torch.library.register_fake("instella::qk_sumsq")
def _(x):
    fallback.check_qk(x, None, None, "instella::qk_sumsq")
    return x.new_empty(x.shape[:2], dtype=fallback.acc_dtype(x))


def _qk_outputs(x):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:2], dtype=fallback.acc_dtype(x)))


@torch.library.register_fake("instella::qk_norm_rope_fwd")
def _(x, weight, freqs, eps):
    fallback.check_qk(x, weight, freqs, "instella::qk_norm_rope_fwd")
    return _qk_outputs(x)


@torch.library.register_fake("instella::qk_norm_rope_apply")
def _(x, weight, freqs, ss, full_width, eps):
    fallback.check_qk(x, weight, freqs, "instella::qk_norm_rope_apply", ss=ss, full_width=full_width)
    return _qk_outputs(x)


@torch.library.register_fake("instella::qk_norm_rope_bwd")
def _(dy, x, weight, freqs, rstd, full_width, split):
    fallback.check_qk(x, weight, freqs, "instella::qk_norm_rope_bwd", dy=dy, rstd=rstd, full_width=full_width)
    n = x.shape[:2] if split else (0, 0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            x.new_empty(n, dtype=fallback.acc_dtype(x)))


@torch.library.register_fake("instella::swiglu_fwd")
def _(x):
    fallback.check_swiglu(x, "instella::swiglu_fwd")
    return x.new_empty(x.shape[:-1] + (x.shape[-1] // 2,))


@torch.library.register_fake("instella::swiglu_bwd")
def _(dy, x):
    fallback.check_swiglu(x, "instella::swiglu_bwd", dy=dy)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- autograd --------------------------------------------------------------------------------------
def _save_all(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)],
                          *[t for t in (output if isinstance(output, tuple) else (output,))][1:])
    ctx.scalars = [a for a in inputs if not isinstance(a, torch.Tensor)]
    if isinstance(output, tuple):
        ctx.mark_non_differentiable(*output[1:])


def _rms_bwd(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = ops.rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


def _qk_bwd(ctx, dy, _drstd):
    x, weight, freqs, rstd = ctx.saved_tensors
    dx, dw, _ = ops.qk_norm_rope_bwd(dy, x, weight, freqs, rstd, x.shape[2] * x.shape[3], False)
    return dx, dw, None, None


def _qk_apply_bwd(ctx, dy, _drstd):
    x, weight, freqs, _ss, rstd = ctx.saved_tensors
    full_width = ctx.scalars[0]
    dx, dw, dss = ops.qk_norm_rope_bwd(dy, x, weight, freqs, rstd, full_width, True)
    return dx, dw, None, dss, None, None


def _sumsq_bwd(ctx, dss):
    (x,) = ctx.saved_tensors
    return (2 * x.to(dss.dtype) * dss[:, :, None, None]).to(x.dtype)


def _swiglu_bwd(ctx, dy):
    (x,) = ctx.saved_tensors
    return ops.swiglu_bwd(dy, x)


torch.library.register_autograd("instella::rms_norm_fwd", _rms_bwd, setup_context=_save_all)
torch.library.register_autograd("instella::qk_norm_rope_fwd", _qk_bwd, setup_context=_save_all)
torch.library.register_autograd("instella::qk_norm_rope_apply", _qk_apply_bwd, setup_context=_save_all)
torch.library.register_autograd("instella::qk_sumsq", _sumsq_bwd, setup_context=_save_all)
torch.library.register_autograd("instella::swiglu_fwd", _swiglu_bwd, setup_context=_save_all)


# ---- native extensions -----------------------------------------------------------------------------
def _load(name: str):
    """Import a native extension (its import registers its kernels); None when absent."""
    if os.environ.get("INSTELLA_KERNELS", "all").strip().lower() == "none":
        fallback.note_missing(name, "INSTELLA_KERNELS=none")
        return None
    try:
        return importlib.import_module(f"instella_plugin.kernels.{name}")
    except ImportError as e:
        fallback.note_missing(name, str(e))
        return None


_CPU = _load("_cpu")
NATIVE = {"cpu": _CPU is not None}
NATIVE["cuda"] = torch.cuda.is_available() and _load("_gpu") is not None
KERNELS = ("rms_norm", "qk_norm_rope", "swiglu")


def native_devices() -> list:
    """Device types served by a native kernel in this process."""
    return sorted(d for d, ok in NATIVE.items() if ok)


def dispatched_isa() -> dict:
    """``{kernel: variant}`` that the next CPU call of each kernel runs: the x86 level of the native
    kernel (``"avx512"`` = x86-64-v4's vector set, ``"avx2"`` = x86-64-v3's, ``"baseline"`` = SSE2),
    as the C++ dispatch picks it at that call (the best this CPU runs, or ``INSTELLA_CPU_ISA``), or
    ``"fallback"`` without the native CPU kernel. Raises ValueError when ``INSTELLA_CPU_ISA`` names
    an unknown level or one this CPU does not run."""
    if _CPU is None:
        return dict.fromkeys(KERNELS, "fallback")
    return _CPU.dispatched_isa()


def output_cache() -> dict:
    """``{"held": bytes, "cap": bytes}`` of the native CPU ops' cache of freed outputs
    (csrc/cpu/output_cache.h; ``INSTELLA_CPU_OUTPUT_CACHE_MB`` sets the cap, 0 turns it off);
    zeros without the native CPU kernel."""
    return {"held": 0, "cap": 0} if _CPU is None else _CPU.output_cache()


def supported_isas() -> list:
    """The levels ``INSTELLA_CPU_ISA`` may name on this CPU, best first (``[]`` without the native
    CPU kernel)."""
    return [] if _CPU is None else _CPU.supported_isas()

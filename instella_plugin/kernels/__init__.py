"""Fused kernels for Instella: RMSNorm, full-width QK-norm + RoPE, SwiGLU.

Each is a ``torch.ops.instella`` operator (see ``ops.py``) with forward and backward, native where
the csrc/ extension is built (CPU: C++/OpenMP; GPU: CUDA, or HIP on ROCm) and PyTorch elsewhere.
These functions are the public entry points; ``modules.py`` wraps them as Megatron spec modules.
On the CPU each kernel is compiled for several x86 levels and dispatched per call; ``dispatched_isa()``
says which runs (``INSTELLA_CPU_ISA=avx512|avx2|baseline`` forces one, e.g. to time or test it).
The CPU ops take their large outputs from a cache of their own freed blocks (``output_cache()``;
up to ``INSTELLA_CPU_OUTPUT_CACHE_MB``, default 512, 0 turns it off), so a training step's outputs
land in memory the previous step already faulted in instead of fresh pages the OS must zero.
"""
from typing import Callable, Optional

import torch

from instella_plugin.kernels.ops import dispatched_isa, native_devices, ops, output_cache, supported_isas

__all__ = ["rms_norm", "qk_norm_rope", "qk_norm_rope_tp", "swiglu", "native_devices", "dispatched_isa",
           "supported_isas", "output_cache", "backend", "describe_backend"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Instella RMSNorm over the last dim: ``weight * cast(x * rsqrt(mean(x^2) + eps))``."""
    return ops.rms_norm_fwd(x, weight, eps)[0]


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Full-width RMSNorm of q or k ``[s, b, heads, head_dim]`` over heads*head_dim, then RoPE.

    ``freqs`` are Megatron's rotary angles ``[s, 1, 1, head_dim]`` (non-interleaved, full rotary dim).
    """
    return ops.qk_norm_rope_fwd(x, weight, freqs, eps)[0]


def qk_norm_rope_tp(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, full_width: int,
                    all_reduce: Callable[[torch.Tensor], torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """``qk_norm_rope`` for a tensor-parallel shard: ``x`` holds this rank's heads, ``weight`` its
    shard, ``full_width`` the unsplit width. ``all_reduce`` sums a tensor over the TP group with an
    autograd-aware mapping (forward and backward all-reduce), e.g. megatron's
    ``reduce_from_tensor_model_parallel_region(copy_to_tensor_model_parallel_region(t))``.
    """
    ss = all_reduce(ops.qk_sumsq(x))
    return ops.qk_norm_rope_apply(x, weight, freqs, ss, full_width, eps)[0]


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` on the last dim (Megatron's fc1 layout)."""
    return ops.swiglu_fwd(x)


def backend(device: Optional[str] = "cpu") -> str:
    """"native" when a compiled kernel serves ``device``, else "fallback"."""
    return "native" if device in native_devices() else "fallback"


def describe_backend(device: Optional[str] = "cpu") -> str:
    """``backend(device)`` plus, for the native CPU kernels, the x86 level each runs, e.g.
    ``"native (avx512: rms_norm, qk_norm_rope, swiglu)"``: what a log line should name."""
    name = backend(device)
    if name != "native" or device != "cpu":
        return name
    by_level = {}
    for kernel, level in dispatched_isa().items():
        by_level.setdefault(level, []).append(kernel)
    return f"{name} ({'; '.join(f'{lvl}: ' + ', '.join(ks) for lvl, ks in by_level.items())})"

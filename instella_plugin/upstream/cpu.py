"""The CPU mode extended to the ``megatron.training`` calls that Megatron-LM's own loop makes.

``instella_plugin.cpu_mode`` makes megatron-core run on CPU (gloo, no CUDA). Megatron-LM's training
loop adds a few calls of its own; each is handled here, only in the CPU mode of the upstream host
(``PluginHost`` with ``--device cpu``, or ``auto`` without a GPU), and listed in ``patches/README.md``:

1. ``before_import()`` (before ``pretrain_gpt.py`` imports ``megatron.training``): when ``triton`` does
   not import (CPU builds of torch ship without it), a stand-in for
   ``megatron.core.transformer.custom_layers.batch_invariant_kernels``, which ``megatron.training.
   initialize`` imports at module level only for ``--batch-invariant-mode`` (triton GPU kernels). Its
   ``enable_batch_invariant_mode`` raises, naming the reason, so that mode fails loudly.
2. ``cpu_allow_no_cuda``: ``pretrain`` calls ``initialize_megatron`` without ``allow_no_cuda``, which
   asserts ``torch.cuda.is_available()``; the wrapper passes ``allow_no_cuda=True``.
3. ``cpu_skip_jit_warmup``: ``_warmup_jit_function`` runs the bias-SwiGLU/GeLU and bias-dropout-add
   fusions on random "cuda" tensors to compile them; in the CPU mode those fusions are off, and
   compiling them through torch.compile for the CPU costs a minute on a laptop. Skipped.
4. ``cpu_device_arch``: ``validate_args`` asks ``get_device_arch_version()`` (the CUDA compute
   capability) whenever TP or CP > 1; on the CPU it answers 0 (pre-Blackwell rules), and
   ``before_import`` sets ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (unless set), which those rules require and
   which means nothing on the CPU.
5. ``cpu_no_fused_kernels``: ``_compile_dependencies`` calls ``megatron.legacy.fused_kernels.load``,
   which runs ``$CUDA_HOME/bin/nvcc -V`` (and then builds nothing); without CUDA it is skipped.
6. Settings (``cpu_safe_args``): ``--distributed-backend gloo`` and the CUDA fusions off, the same
   list as ``cpu_mode.cpu_safe_config_overrides`` under Megatron-LM's flag names.

Everything else Megatron-LM's loop does on the device (``device='cuda'`` tensors for flags and
timestamps, ``.cuda()`` on batches and modules, ``torch.cuda.synchronize``/``Event`` in timers,
memory reports, ``device_count``/``set_device`` in distributed init, RNG seeding) is already covered
by ``cpu_mode``.
"""
import importlib.util
import os
import sys
import types

from instella_plugin.upstream.registry import register_patch

_BIK = "megatron.core.transformer.custom_layers.batch_invariant_kernels"


def cpu_safe_args() -> dict:
    """Megatron-LM flags (dest names) that the CPU mode needs."""
    return dict(distributed_backend="gloo", masked_softmax_fusion=False, bias_gelu_fusion=False,
                bias_swiglu_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                gradient_accumulation_fusion=False, no_persist_layer_norm=True, cross_entropy_loss_fusion=False,
                use_cpu_initialization=True)


def _no_triton(*_a, **_k):
    raise RuntimeError("--batch-invariant-mode needs triton (GPU kernels), which does not import here; "
                       "the CPU mode of the plugin host replaced megatron's batch-invariant kernels module")


def before_import() -> bool:
    """Install the batch-invariant stand-in when triton is missing; returns whether it did (idempotent)."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if _BIK in sys.modules or importlib.util.find_spec("triton") is not None:
        return False
    stub = types.ModuleType(_BIK)
    stub.__doc__ = "Stand-in (instella_plugin.upstream.cpu): triton is not installed."
    stub.enable_batch_invariant_mode = _no_triton
    stub.set_batch_invariant_mode = _no_triton
    stub.disable_batch_invariant_mode = lambda: None
    stub.is_batch_invariant_mode_enabled = lambda: False
    stub._instella_stand_in = True
    sys.modules[_BIK] = stub
    return True


@register_patch("cpu_allow_no_cuda", "megatron.training.training", "initialize_megatron", phase="cpu",
                reason="pretrain() asserts torch.cuda.is_available(); the CPU mode initializes without CUDA")
def _allow_no_cuda(original):
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)
    return initialize_megatron


@register_patch("cpu_skip_jit_warmup", "megatron.training.initialize", "_warmup_jit_function", phase="cpu",
                reason="compiles CUDA fusions on random 'cuda' tensors; the fusions are off in the CPU mode")
def _skip_jit_warmup(original):
    def _warmup_jit_function():
        return None
    return _warmup_jit_function


@register_patch("cpu_device_arch", "megatron.training.arguments", "get_device_arch_version", phase="cpu",
                reason="validate_args reads the CUDA compute capability when TP/CP > 1; the CPU has none (0)")
def _device_arch(original):
    def get_device_arch_version():
        return 0
    return get_device_arch_version


@register_patch("cpu_no_fused_kernels", "megatron.legacy.fused_kernels", "load", phase="cpu",
                reason="runs $CUDA_HOME/bin/nvcc -V for legacy CUDA kernels it no longer builds")
def _no_fused_kernels(original):
    def load(args):
        return None
    return load

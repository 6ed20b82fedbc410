"""CPU mode: run megatron-core (model, schedules, DDP, distributed optimizer, dist checkpointing) on CPU.

megatron-core assumes CUDA in a handful of places. This module is the one list of what changes,
each at run time, only while the mode is on, and only when ``enable()`` is called (explicitly, or
by ``enable_if_no_gpu()`` when torch sees no GPU). With a GPU present ``enable_if_no_gpu()`` does
nothing, and ``enable()`` refuses unless forced, so GPU runs are never altered.

What is patched, and why:

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``, ``device_count`` -> 1, ``set_device`` ->
   no-op: megatron places buffers with ``device=torch.cuda.current_device()``, also inside autograd
   backward functions, where the function mode of (5) is not active.
2. ``torch.cuda.synchronize``, ``current_stream``/``default_stream``/``Stream``/``stream``/``Event``,
   ``empty_cache``, ``memory_stats``/``max_memory_allocated``/``memory_allocated`` and ``nvtx``
   ranges -> no-op stand-ins: the schedules, DDP buckets and timers call them unconditionally.
3. ``torch.cuda.{get,set}_rng_state``, ``manual_seed``/``manual_seed_all`` and megatron's
   ``tensor_parallel.random._{get,set}_cuda_rng_state`` -> the CPU default generator: megatron's RNG
   tracker forks "CUDA" states for tensor-parallel regions and activation recompute.
4. ``Tensor.type()`` answers ``torch.cuda.FloatTensor`` (etc.) for CPU tensors *only when called from
   megatron.core.optimizer*: the optimizer, distributed optimizer and gradient clipping assert
   ``param.type() == 'torch.cuda.FloatTensor'`` to pick fp32 params.
5. A global ``TorchFunctionMode`` rewrites ``device="cuda"`` (or ``cuda:N``, an int index, a
   ``torch.device('cuda')``) in factory calls, and ``.cuda()`` / ``.to("cuda")``, to the CPU: megatron
   hard-codes ``device="cuda"`` in token counting, p2p shape exchange, grad buffers and clipping.
   The same mode drops ``pin_memory=True`` (a CPU-only torch rejects it; megatron asks for it when
   slicing RoPE tables for context parallelism).
6. megatron's ``get_default_causal_mask`` / ``get_sliding_window_causal_mask`` (in
   ``transformer.utils`` and as imported by ``fusions.fused_softmax``) -> CPU versions: they
   hard-code ``device="cuda"`` and run inside autograd functions (activation recompute replays the
   forward during backward), where (5) is not active.
7. ``torch.distributed`` collectives accept a ``device_ids`` argument in ``barrier`` that gloo rejects:
   ``barrier(device_ids=...)`` drops it.

Tensor-core fusions (``bias_dropout_fusion``, ``apply_rope_fusion``, ``masked_softmax_fusion``,
``gradient_accumulation_fusion``, ``persist_layer_norm``, ``bias_activation_fusion``) must be off in
the TransformerConfig, and so must ``batch_p2p_comm``: gloo matches point-to-point messages between
two ranks by posting order and tag (always 0), so a batch that sends and receives both ways between
the same pair (PP=2, interleaved schedule) can swap equally shaped tensors; megatron's unbatched
path orders the operations by rank parity. ``cpu_safe_config_overrides()`` lists these settings.
"""
import contextlib
import functools
import logging
import sys

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ENABLED = False
_MODE = None
_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def is_enabled() -> bool:
    return _ENABLED


def gpu_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def cpu_safe_config_overrides() -> dict:
    """TransformerConfig fields that must take these values in CPU mode (fusions are CUDA kernels)."""
    return dict(
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        cross_entropy_loss_fusion=False,
        batch_p2p_comm=False,
    )


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, int):  # megatron passes torch.cuda.current_device() (an int)
        return True
    return False


_TENSOR_TYPE = torch.Tensor.type
_TENSOR_CUDA = torch.Tensor.cuda
_TENSOR_TO = torch.Tensor.to


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests in torch calls to the CPU (item 5 of the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TENSOR_CUDA:
            return args[0]
        if func is _TENSOR_TO:
            args = tuple(_CPU if (i > 0 and _is_cuda_device(a) and not isinstance(a, bool)) else a
                         for i, a in enumerate(args))
            if _is_cuda_device(kwargs.get("device")):
                kwargs = dict(kwargs, device=_CPU)
        elif func is _TENSOR_TYPE and len(args) == 1 and not kwargs:
            name = func(*args)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.core.optimizer"):
                return _CUDA_TYPE_NAMES.get(name, name)
            return name
        else:
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = dict(kwargs, device=_CPU)
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent(_NullStream):
    def record(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0


def _cpu_get_rng_state(device="cuda"):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    torch.default_generator.manual_seed(int(seed))


def _megatron_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_stats = lambda *a, **k: {}
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    cuda.manual_seed_all = _cpu_manual_seed
    cuda.random.manual_seed = _cpu_manual_seed
    cuda.random.manual_seed_all = _cpu_manual_seed


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _cpu_sliding_window_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
    return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])


def _patch_megatron():
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    mrandom._get_cuda_rng_state = _megatron_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    for module in (tutils, fused_softmax):
        module.get_default_causal_mask = _cpu_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_mask


def _patch_distributed():
    import torch.distributed as dist

    original = dist.barrier
    if getattr(original, "_instella_cpu", False):
        return

    def barrier(group=None, async_op=False, device_ids=None):
        return original(group=group, async_op=async_op)

    barrier._instella_cpu = True
    dist.barrier = barrier


def enable(force: bool = False) -> None:
    """Switch the CPU mode on for this process (idempotent). Refuses when a GPU exists unless forced."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if gpu_available() and not force:
        raise RuntimeError("CPU mode asked for on a machine with a GPU; pass --device cpu explicitly "
                           "(force=True) to run on the CPU anyway.")
    _patch_torch_cuda()
    _patch_megatron()
    _patch_distributed()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    log.info("CPU mode on: megatron-core runs on the CPU with gloo (see instella_plugin.cpu_mode)")


def enable_if_no_gpu() -> bool:
    """Turn the CPU mode on when torch sees no GPU. Returns whether it is on. Changes nothing on a GPU."""
    if not gpu_available():
        enable()
    return _ENABLED

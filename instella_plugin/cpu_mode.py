"""CPU mode: run megatron-core (model, schedules, DDP, distributed optimizer, dist checkpointing) on CPU.

megatron-core assumes CUDA in a handful of places. This module is the one list of what changes,
each at run time, only while the mode is on, and only when ``enable()`` is called (explicitly, or
by ``enable_if_no_gpu()`` when torch sees no GPU). With a GPU present ``enable_if_no_gpu()`` does
nothing, and ``enable()`` refuses unless forced, so GPU runs are never altered.

What changes, and why (``describe()`` prints the list from the code):

1. Attributes of ``torch.cuda``, ``torch.distributed`` and megatron-core, replaced by CPU stand-ins:
   the patches of ``PATCHES`` (the package's registry, ``instella_plugin.patching``), each with its
   target, the version it was written for and its reason. A target that is missing or whose
   signature moved (another torch or megatron-core) fails ``enable()`` naming both versions, and
   nothing is changed.
2. A global ``TorchFunctionMode`` (``_FUNCTION_MODE`` says what it rewrites and why): CUDA devices
   in factory calls, ``.cuda()``/``.to("cuda")``, ``pin_memory``, and ``Tensor.type()`` seen from
   megatron's optimizer.

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

from instella_plugin.patching import PatchRegistry

log = logging.getLogger(__name__)

_ENABLED = False
_MODE = None
_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


_FUNCTION_MODE = (
    "function mode: device='cuda' (or 'cuda:N', an int index, torch.device('cuda')) in factory calls, and "
    ".cuda()/.to('cuda'), go to the CPU: megatron hard-codes device='cuda' in token counting, p2p shape "
    "exchange, grad buffers and clipping; pin_memory=True is dropped (a CPU-only torch rejects it; megatron "
    "asks for it when slicing RoPE tables for context parallelism); Tensor.type() answers "
    "torch.cuda.FloatTensor (etc.) for CPU tensors only when called from megatron.core.optimizer, whose "
    "optimizer, distributed optimizer and gradient clipping assert it to pick fp32 params")


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
    """Rewrites CUDA device requests in torch calls to the CPU (``_FUNCTION_MODE``)."""

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


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _cpu_sliding_window_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
    return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])


# ---- what the CPU mode changes, as data (``describe()`` prints it) ------------------------------------
PATCHES = PatchRegistry("cpu_mode", package="megatron-core", version="0.16.1",
                        hint="update instella_plugin/cpu_mode.py for the new code")
_TORCH = dict(package="torch", version="2.13.0")

_WHY_DEVICE = ("megatron places buffers with device=torch.cuda.current_device(), also inside autograd backward "
               "functions, where the CPU mode's function mode is not active")
_WHY_STAND_IN = "the schedules, DDP buckets and timers call it unconditionally; a no-op stand-in on the CPU"
_WHY_RNG = ("megatron's RNG tracker forks 'CUDA' states for tensor-parallel regions and activation recompute; "
            "the CPU default generator stands in")
_WHY_MASK = ("hard-codes device='cuda' and runs inside autograd functions (activation recompute replays the "
             "forward during backward), where the function mode is not active")

_RNG = dict(get_rng_state=_cpu_get_rng_state, set_rng_state=_cpu_set_rng_state, manual_seed=_cpu_manual_seed,
            manual_seed_all=_cpu_manual_seed)
for _module, _why, _stand_ins in (
        ("torch.cuda", _WHY_DEVICE, dict(current_device=lambda: _CPU, device_count=lambda: 1,
                                         set_device=lambda *a, **k: None)),
        ("torch.cuda", _WHY_STAND_IN, dict(
            synchronize=lambda *a, **k: None, current_stream=lambda *a, **k: _NullStream(),
            default_stream=lambda *a, **k: _NullStream(), Stream=_NullStream, Event=_NullEvent,
            stream=lambda *a, **k: contextlib.nullcontext(), empty_cache=lambda: None,
            memory_stats=lambda *a, **k: {}, memory_allocated=lambda *a, **k: 0,
            max_memory_allocated=lambda *a, **k: 0, memory_reserved=lambda *a, **k: 0,
            max_memory_reserved=lambda *a, **k: 0, reset_peak_memory_stats=lambda *a, **k: None)),
        ("torch.cuda.nvtx", _WHY_STAND_IN, dict(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)),
        ("torch.cuda", _WHY_RNG, _RNG),
        ("torch.cuda.random", _WHY_RNG, _RNG)):
    for _attribute, _value in _stand_ins.items():
        PATCHES.replace(f"{_module[len('torch.'):]}.{_attribute}", _module, _attribute, _value, reason=_why,
                        **_TORCH)

_RANDOM = "megatron.core.tensor_parallel.random"
PATCHES.replace("megatron_get_cuda_rng_state", _RANDOM, "_get_cuda_rng_state", _megatron_get_rng_state,
                signature=("device", "clone", "graph_safe"), reason=_WHY_RNG)
PATCHES.replace("megatron_set_cuda_rng_state", _RANDOM, "_set_cuda_rng_state", _cpu_set_rng_state,
                signature=("new_state", "device", "graph_safe"), reason=_WHY_RNG)
for _module in ("megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax"):
    _where = _module.rsplit(".", 1)[-1]
    PATCHES.replace(f"causal_mask_in_{_where}", _module, "get_default_causal_mask", _cpu_causal_mask,
                    signature=("sq",), reason=_WHY_MASK)
    PATCHES.replace(f"sliding_window_mask_in_{_where}", _module, "get_sliding_window_causal_mask",
                    _cpu_sliding_window_mask, signature=("sq", "skv", "window_size"), reason=_WHY_MASK)


def _tensor_present(tensor):
    assert tensor is not None


PATCHES.replace("inference_tensor_check", "megatron.core.inference.communication_utils", "_is_cuda", _tensor_present,
                signature=("tensor",),
                reason="megatron's inference asserts tensor.is_cuda before broadcasting logits from the last "
                       "pipeline stage and before pipeline sends; on the CPU only the not-None half applies")


@PATCHES.register("gloo_barrier", "torch.distributed", "barrier", wraps=False,
                  signature=("group", "async_op", "device_ids", "timeout"),
                  reason="megatron passes barrier(device_ids=...), which gloo rejects; dropped", **_TORCH)
def _barrier_without_device_ids(original):
    def barrier(group=None, async_op=False, device_ids=None, timeout=None):
        return original(group=group, async_op=async_op, timeout=timeout)
    return barrier


def describe() -> str:
    """Every change the CPU mode makes: the registry's patches, then the function mode."""
    return PATCHES.describe() + "\n" + _FUNCTION_MODE


def enable(force: bool = False) -> None:
    """Switch the CPU mode on for this process (idempotent). Refuses when a GPU exists unless forced."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if gpu_available() and not force:
        raise RuntimeError("CPU mode asked for on a machine with a GPU; pass --device cpu explicitly "
                           "(force=True) to run on the CPU anyway.")
    PATCHES.apply()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    log.info("CPU mode on: megatron-core runs on the CPU with gloo (see instella_plugin.cpu_mode)")


@contextlib.contextmanager
def function_mode_suspended():
    """Run a block without the function mode (the registry's patches stay): for hot loops known to make no
    CUDA device requests, such as a generator's forward steps, where the mode's Python hook on every torch
    call costs a few microseconds each. A no-op when the mode is off or another mode sits above it."""
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack() if _ENABLED else []
    if not stack or stack[-1] is not _MODE:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()


def enable_if_no_gpu() -> bool:
    """Turn the CPU mode on when torch sees no GPU. Returns whether it is on. Changes nothing on a GPU."""
    if not gpu_available():
        enable()
    return _ENABLED

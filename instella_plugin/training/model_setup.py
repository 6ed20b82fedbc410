"""Wrap model chunks in megatron's DistributedDataParallel and wire the config hooks the schedules use."""
from typing import List

import torch

from instella_plugin import kernels


def wrap_ddp(chunks: List[torch.nn.Module], *, use_distributed_optimizer: bool = False,
             overlap_grad_reduce: bool = False, overlap_param_gather: bool = False,
             grad_reduce_in_fp32: bool = True, bucket_size=None) -> List[torch.nn.Module]:
    """DDP-wrap every chunk and set ``finalize_model_grads`` / ``no_sync`` on the shared config."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    config = chunks[0].config
    # Per-token loss: DDP must sum (not average) grads; finalize_model_grads divides by the token count.
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather, use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=bucket_size)
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    for m in wrapped:
        m.broadcast_params()
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [m.no_sync for m in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if overlap_grad_reduce:
        syncs = [m.start_grad_sync for m in wrapped]
        config.grad_sync_func = syncs[0] if len(syncs) == 1 else syncs
    if overlap_param_gather and use_distributed_optimizer:
        gathers = [m.start_param_sync for m in wrapped]
        config.param_sync_func = gathers[0] if len(gathers) == 1 else gathers
    return wrapped


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def describe(chunks: List[torch.nn.Module], device_type: str = "cpu") -> str:
    """One line: this rank's parameter count and the classes a transformer layer is built from (so a
    log shows which spec really ran), plus the kernel backend when the layers use the fused kernels."""
    chunks = [unwrap(c) for c in chunks]
    params = sum(p.numel() for c in chunks for p in c.parameters())
    text = f"model: {len(chunks)} chunk(s), {params:,} parameters on this rank"
    if getattr(chunks[-1], "post_process", False):
        describe_output = getattr(chunks[-1], "output_description", None)
        text += f"; output {describe_output() if describe_output else 'megatron linear + vocab-parallel cross-entropy'}"
    layers = [layer for c in chunks for layer in getattr(getattr(c, "decoder", None), "layers", [])]
    if not layers:
        return text
    layer = layers[0]
    att, mlp = getattr(layer, "self_attention", None), getattr(layer, "mlp", None)
    parts = [f"norm {type(layer.input_layernorm).__name__}"]
    if att is not None:
        parts.append(f"attention {type(att).__name__} ({type(att.core_attention).__name__})")
        if type(getattr(att, "q_layernorm", None)).__name__ not in ("NoneType", "IdentityOp"):
            parts.append(f"qk-norm {type(att.q_layernorm).__name__}")
    if mlp is not None:
        parts.append(f"mlp {type(mlp).__name__}")
    text += "; layer: " + ", ".join(parts)
    modules = (layer.input_layernorm, att, mlp, getattr(att, "q_layernorm", None))
    if any(type(m).__module__.startswith("instella_plugin.kernels") for m in modules if m is not None):
        text += f"; fused kernels: {kernels.describe_backend(device_type)}"
    return text

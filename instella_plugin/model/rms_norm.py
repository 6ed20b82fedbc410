"""Instella's RMSNorm: normalise in fp32, cast back to the input dtype, *then* scale by the weight.

That rounding order is Instella's (and transformers' ``OlmoeRMSNorm``); fused RMSNorms of apex and
Transformer Engine scale before casting and differ in the last bf16 bit. The weight is replicated
over tensor parallelism; under Megatron sequence parallelism it is marked ``sequence_parallel`` so
``finalize_model_grads`` all-reduces its gradient over the TP group.
"""
import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class InstellaRMSNorm(torch.nn.Module):
    """Megatron-spec norm: built as ``build_module(spec, config=..., hidden_size=..., eps=...)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.config = config
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Replicated weight whose grad must be summed over TP when activations are sequence-sharded.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"

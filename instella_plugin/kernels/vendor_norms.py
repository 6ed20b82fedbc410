"""apex's and Transformer Engine's fused RMSNorms as spec norms, for ``instella-fused-apex`` and
``instella-fused-te`` (ROCm and NGC containers ship both libraries).

Both multiply by the weight *before* casting to the input dtype; Instella casts first. In fp32 the two
orders agree to rounding; in bf16 some outputs differ in the last bit, so these specs are a speed
option within bf16 tolerance of the model, not its exact numerics (the GPU script checks the logits).
Parameter names, sequence-parallel marking and checkpoints are those of ``InstellaRMSNorm``, so a
checkpoint moves freely between ``instella``, ``instella-fused`` and these specs.
"""
import torch

from instella_plugin.model.rms_norm import InstellaRMSNorm


def apex_rms_norm_fn():
    """apex's ``fused_rms_norm_affine``; a clear error when apex or its CUDA extension is missing."""
    try:
        import fused_layer_norm_cuda  # noqa: F401  (apex's compiled extension: the Python part alone won't run)
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError as e:
        raise RuntimeError(f"layer spec 'instella-fused-apex' needs NVIDIA apex built with its CUDA extensions "
                           f"(--cpp_ext --cuda_ext), which does not import here ({e}); use --spec instella-fused "
                           "(our kernels) instead") from e
    return fused_rms_norm_affine


def te_rms_norm_class():
    """Transformer Engine's ``RMSNorm`` module class; a clear error when TE is missing."""
    try:
        from transformer_engine.pytorch import RMSNorm
    except ImportError as e:
        raise RuntimeError(f"layer spec 'instella-fused-te' needs Transformer Engine, which does not import here "
                           f"({e}); use --spec instella-fused (our kernels) instead") from e
    return RMSNorm


class ApexRMSNorm(InstellaRMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps)
        self._fn = apex_rms_norm_fn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x, self.weight, (x.shape[-1],), self.eps)


class TERMSNorm(InstellaRMSNorm):
    """Runs a Transformer Engine ``RMSNorm`` whose weight *is* this module's parameter. The TE module
    is kept outside the module tree (built on the first call, on the input's device and dtype), so
    the state dict holds only ``weight``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps)
        self._te_class = te_rms_norm_class()
        self._te = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._te:
            mod = self._te_class(self.weight.shape[0], eps=self.eps, params_dtype=self.weight.dtype, device=x.device)
            del mod.weight
            self._te[key] = mod
        mod = self._te[key]
        mod.weight = self.weight  # the same Parameter: gradients land here
        return mod(x)

"""RoPE context-extension methods (``--rope-scaling``): inverse frequencies and attention factor.

Four ways to run a model trained at ``original_context`` tokens on ``original_context x factor``:

- ``base-law`` (Instella-Long): plain RoPE, only the base changes, to the scaling-law value
  (``scaling.rope_base_for_context``); the recipe's ``rotary_base`` carries it.
- ``linear`` (position interpolation, Chen et al. 2023): every frequency divided by ``factor``.
- ``ntk`` (NTK-aware scaling, bloc97 2023): the base raised to ``theta * factor ** (d / (d - 2))``, so
  the lowest frequency is interpolated by ``factor`` and the highest kept.
- ``yarn`` (Peng et al. 2023, "YaRN"): per dimension, a ramp between interpolated (``/ factor``) and
  original frequencies over the dimensions whose wavelength at the original context makes between
  ``beta_slow`` and ``beta_fast`` rotations; and an attention factor ``0.1 ln(factor) + 1`` that
  multiplies cos and sin (so q.k by its square).

All frequencies are computed in fp32 the way megatron's ``RotaryEmbedding`` computes plain RoPE.
What the model runs: the method's ``inv_freq`` replaces the RotaryEmbedding's (``rope.apply``), and
YaRN's attention factor enters as the softmax scale ``attention_factor ** 2 / sqrt(head_dim)``: the
same logits as scaling cos/sin after the (pre-RoPE) QK-norm, with the same RoPE tables for every layer
spec and for the fused QK-norm+RoPE kernel, which only ever sees angles.
``hf_rope_parameters`` gives the transformers ``rope_parameters`` that compute the same tables.
megatron-core's own ``YarnRotaryEmbedding`` is the test's second reference rather than the module the
model runs: it moves its tables to the GPU inside ``get_emb`` (no CPU mode) and its attention factor is
read from ``yarn_*`` attributes that only MLA's TransformerConfig declares; the frequencies are the same.
"""
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from instella_plugin.rope.scaling import rope_base_for_context

METHODS = ("base-law", "linear", "ntk", "yarn")
# Layer specs whose RoPE comes from GPTModel's RotaryEmbedding (angles from ``inv_freq``) and whose core
# attention honours the TransformerConfig softmax scale: the fused QK-norm+RoPE kernel takes the angles.
SPECS_THAT_RUN_METHODS = ("instella", "instella-te", "instella-fused", "instella-fused-apex", "instella-fused-te")


class RopeScalingError(ValueError):
    """A RoPE method's parameters that cannot run; the message names the problem and the fix."""


def plain_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    """megatron's ``1 / theta ** (arange(0, dim, 2) / dim)`` in fp32 (rotary_percent 1.0)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def _yarn_correction_dim(rotations: float, dim: int, theta: float, context: int) -> float:
    """The (fractional) dimension index whose wavelength fits ``rotations`` times into ``context``."""
    return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE method and its parameters. ``factor``: target context / ``original_context``."""
    method: str = "base-law"
    factor: float = 1.0
    original_context: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise RopeScalingError(f"unknown --rope-scaling {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor >= 1.0):
            raise RopeScalingError(f"--rope-scaling-factor must be a finite number >= 1, got {self.factor!r}")
        if not (isinstance(self.original_context, int) and self.original_context > 2 * math.pi):
            raise RopeScalingError(f"--rope-original-context must be an integer context length > 6, "
                                   f"got {self.original_context!r}")
        if self.method == "yarn" and not (0 < self.beta_slow < self.beta_fast):
            raise RopeScalingError(f"YaRN needs 0 < --yarn-beta-slow < --yarn-beta-fast, got beta_slow "
                                   f"{self.beta_slow} and beta_fast {self.beta_fast} (YaRN's defaults: 1 and 32)")

    @classmethod
    def for_context(cls, method: str, seq_length: int, original_context: int = 4096,
                    factor: Optional[float] = None, **kw) -> "RopeScaling":
        """The method for a run at ``seq_length``; the factor defaults to seq_length / original_context."""
        return cls(method, float(factor) if factor else max(seq_length / original_context, 1.0),
                   int(original_context), **kw)

    @property
    def scales(self) -> bool:
        """Whether the frequencies differ from plain RoPE at the same theta."""
        return self.method != "base-law" and self.factor > 1.0

    def check_context(self, seq_length: int) -> None:
        """Refuse a run longer than the method extends to (original_context x factor)."""
        if self.method == "base-law":
            return
        if self.factor == 1.0:
            raise RopeScalingError(
                f"--rope-scaling {self.method} with factor 1 changes nothing: --seq-length {seq_length} is not "
                f"longer than --rope-original-context {self.original_context}; give the context the model was "
                "trained at (--rope-original-context) or --rope-scaling-factor")
        covered = self.original_context * self.factor
        if seq_length > covered + 1e-6:
            raise RopeScalingError(
                f"--rope-scaling {self.method} with factor {self.factor:g} extends the original context "
                f"{self.original_context} to {covered:,.0f} tokens, shorter than --seq-length {seq_length}; "
                f"use --rope-scaling-factor {seq_length / self.original_context:g} (or more)")

    def check_spec(self, spec: str) -> None:
        """Refuse a scaling method on a layer spec not known to take its frequencies and softmax scale."""
        if self.scales and spec not in SPECS_THAT_RUN_METHODS:
            raise RopeScalingError(
                f"--rope-scaling {self.method} replaces the RoPE frequencies of megatron's RotaryEmbedding"
                f"{' and the softmax scale' if self.method == 'yarn' else ''}; layer spec {spec!r} is not known "
                f"to use them (the specs that do: {', '.join(SPECS_THAT_RUN_METHODS)}); pick one of those, "
                "or --rope-scaling base-law")

    def same_as(self, meta: Optional[dict]) -> bool:
        """Whether a checkpoint's recorded method (``to_meta``; None: plain RoPE) is this one."""
        other = RopeScaling.from_meta(meta)
        return (not other.scales and not self.scales) or other == self

    def theta(self, base_theta: float, target: Optional[int] = None) -> float:
        """The base the run uses: for ``base-law`` and a ``target``, the scaling-law base; for ``ntk``
        the NTK-aware base; otherwise ``base_theta``."""
        if self.method == "base-law" and target:
            return rope_base_for_context(target, self.original_context, base_theta)
        return base_theta

    def inv_freq(self, theta: float, dim: int, device=None) -> torch.Tensor:
        """[dim / 2] fp32 inverse frequencies of this method at base ``theta``."""
        if dim % 2 or dim < 4:
            raise RopeScalingError(f"rotary dimension must be even and >= 4, got {dim}")
        plain = plain_inv_freq(theta, dim, device)
        if not self.scales:
            return plain
        if self.method == "linear":
            return plain / self.factor
        if self.method == "ntk":
            return plain_inv_freq(self.ntk_theta(theta, dim), dim, device)
        low = max(math.floor(_yarn_correction_dim(self.beta_fast, dim, theta, self.original_context)), 0)
        high = min(math.ceil(_yarn_correction_dim(self.beta_slow, dim, theta, self.original_context)), dim - 1)
        span = (high - low) if high != low else 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / span).clamp(0, 1)
        # ramp 0: high-frequency dimensions keep their frequency; 1: low ones are interpolated
        return plain * (1 - ramp) + (plain / self.factor) * ramp

    def ntk_theta(self, theta: float, dim: int) -> float:
        """NTK-aware base: ``theta * factor ** (dim / (dim - 2))``."""
        return theta * self.factor ** (dim / (dim - 2))

    @property
    def attention_factor(self) -> float:
        """The factor YaRN multiplies cos and sin by (1 for the other methods)."""
        if self.method == "yarn" and self.factor > 1.0:
            return 0.1 * math.log(self.factor) + 1.0
        return 1.0

    def softmax_scale(self, head_dim: int) -> Optional[float]:
        """The softmax scale that carries the attention factor (None: megatron's 1/sqrt(head_dim))."""
        af = self.attention_factor
        return None if af == 1.0 else af * af / math.sqrt(head_dim)

    def hf_rope_parameters(self, theta: float, head_dim: int) -> dict:
        """transformers ``rope_parameters`` computing the same tables (``ntk`` exports its static base as
        rope_type default: transformers' ``dynamic`` rescales with each input's length, which the
        trained model never saw)."""
        if not self.scales:
            return {"rope_type": "default", "rope_theta": float(theta)}
        if self.method == "linear":
            return {"rope_type": "linear", "rope_theta": float(theta), "factor": float(self.factor)}
        if self.method == "ntk":
            return {"rope_type": "default", "rope_theta": float(self.ntk_theta(theta, head_dim))}
        return {"rope_type": "yarn", "rope_theta": float(theta), "factor": float(self.factor),
                "original_max_position_embeddings": int(self.original_context),
                "beta_fast": float(self.beta_fast), "beta_slow": float(self.beta_slow), "truncate": True}

    def to_meta(self) -> dict:
        """What checkpoints record (``rope_scaling`` in the metadata)."""
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: Optional[dict]) -> "RopeScaling":
        """The method a checkpoint recorded (plain ``base-law`` for checkpoints that record none)."""
        return cls(**meta) if meta else cls()

    def describe(self) -> str:
        if not self.scales:
            return self.method
        extra = f", original {self.original_context}" if self.method in ("yarn",) else ""
        return f"{self.method} x{self.factor:g}{extra}"

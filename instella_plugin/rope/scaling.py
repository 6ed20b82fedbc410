"""The RoPE extrapolation scaling law Instella-Long uses to pick theta for a longer context.

For a model trained at context ``T`` with base ``theta``, the base for a target context ``T'`` is

    theta' = theta ** (ln(T' / 2pi) / ln(T / 2pi))

(Liu et al., "Scaling Laws of RoPE-based Extrapolation", 2023: keep the critical dimension's period
covering the context). Instella trained at T = 4096 with theta = 10,000, which gives 514,640.3 for
64K and 3,691,949.2 for 256K (the official phase-2 config rounds the latter to 3,691,950).
"""
import math


def _check_positive(name: str, value: float, minimum: float = 0.0) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value <= minimum:
        raise ValueError(f"{name} must be a finite number > {minimum:g}, got {value!r}")


def rope_base_for_context(target: float, train_context: float = 4096, base: float = 10000.0) -> float:
    """The RoPE base for a ``target`` context, for a model trained at ``train_context`` with ``base``.

    Contexts are in tokens and must exceed 2*pi (the law takes ln(T / 2pi)); ``base`` must exceed 1.
    ``target == train_context`` returns ``base``; a shorter target returns a smaller base.
    """
    two_pi = 2 * math.pi
    _check_positive("train context", train_context, two_pi)
    _check_positive("target context", target, two_pi)
    _check_positive("RoPE base", base, 1.0)
    exponent = math.log(target / two_pi) / math.log(train_context / two_pi)
    return base ** exponent

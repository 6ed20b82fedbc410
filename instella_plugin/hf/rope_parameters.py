"""A checkpoint's RoPE method (``rope.methods.RopeScaling``) <-> config.json ``rope_parameters``.

Export: ``RopeScaling.hf_rope_parameters`` gives the transformers 5.24 ``rope_parameters`` computing
the same tables (linear -> rope_type ``linear``; ntk -> rope_type ``default`` at the NTK-aware base;
yarn -> rope_type ``yarn``). NTK-aware scaling leaves no trace in a ``default`` entry, so a scaled
export also writes the method itself under ``RECORD_KEY`` (``to_meta()`` plus the base theta); the
import reads it back and checks that it still gives the ``rope_parameters`` beside it.

Import: without that record (a config.json written elsewhere) the method is read off
``rope_parameters``; only the rope types the megatron model can run convert (``default``, ``linear``,
``yarn`` with YaRN's own attention factor and truncated ramp), anything else is refused by name.
"""
import math
from typing import Optional, Tuple

from instella_plugin.rope.methods import RopeScaling, RopeScalingError

RECORD_KEY = "instella_rope_scaling"
CONVERTIBLE = ("default", "linear", "yarn")


class RopeParametersError(ValueError):
    """config.json RoPE parameters the megatron model cannot run; the message names the key and the fix."""


def export_fields(scaling: RopeScaling, theta: float, head_dim: int) -> dict:
    """The config.json RoPE keys of a model trained at base ``theta`` with ``scaling``: ``rope_parameters``,
    the top-level ``rope_theta`` of older readers (the base the tables use) and, for a scaling method,
    the record of the method."""
    params = scaling.hf_rope_parameters(float(theta), head_dim)
    fields = {"rope_theta": float(params["rope_theta"]), "rope_parameters": params}
    if scaling.scales:
        fields[RECORD_KEY] = {**scaling.to_meta(), "rope_theta": float(theta)}
    return fields


def _same(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(w, (int, float)):
            if not math.isclose(float(v), float(w), rel_tol=1e-9):
                return False
        elif v != w:
            return False
    return True


def _yarn_attention_factor(params: dict, factor: float) -> float:
    """transformers' YaRN attention factor for these parameters (``_compute_yarn_parameters``)."""
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def _from_rope_parameters(params: dict, max_positions: int, where: str) -> Tuple[float, RopeScaling]:
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params["rope_theta"])
    if rope_type not in CONVERTIBLE:
        raise RopeParametersError(
            f"{where}: rope_parameters has rope_type {rope_type!r}, which the Instella megatron model cannot run; "
            f"convertible rope types: {', '.join(CONVERTIBLE)} (the --rope-scaling methods base-law, linear, ntk "
            "and yarn export as these); set rope_parameters to one of them or convert a model that uses one")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise RopeParametersError(f"{where}: rope_parameters has partial_rotary_factor "
                                  f"{params['partial_rotary_factor']}; Instella rotates the whole head (1.0)")
    if rope_type == "default":
        return theta, RopeScaling()
    factor = float(params.get("factor") or 0.0)
    if factor < 1.0:
        raise RopeParametersError(f"{where}: rope_parameters rope_type {rope_type!r} needs a factor >= 1, got "
                                  f"{params.get('factor')!r}")
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor, max(int(round(max_positions / factor)), 7))
    if params.get("truncate", True) is not True:
        raise RopeParametersError(f"{where}: rope_parameters yarn with truncate false (an unrounded ramp) is not "
                                  "what --rope-scaling yarn runs; remove truncate or set it to true")
    scaling = RopeScaling("yarn", factor, int(params.get("original_max_position_embeddings") or max_positions),
                          beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1))
    given = _yarn_attention_factor(params, factor)
    if not math.isclose(given, scaling.attention_factor, rel_tol=1e-6):
        raise RopeParametersError(
            f"{where}: rope_parameters yarn gives attention factor {given:g}; --rope-scaling yarn runs YaRN's "
            f"0.1 ln(factor) + 1 = {scaling.attention_factor:g}; remove attention_factor / mscale / mscale_all_dim")
    return theta, scaling


def rope_from_config(config: dict, head_dim: int, where: str) -> Tuple[float, RopeScaling]:
    """(base theta, method) a config.json dict describes; raises RopeParametersError for what cannot run."""
    params = dict(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", float(config.get("rope_theta", 10000.0)))
    max_positions = int(config.get("max_position_embeddings", 4096))
    record: Optional[dict] = config.get(RECORD_KEY)
    try:
        if not record:
            return _from_rope_parameters(params, max_positions, where)
        record = dict(record)
        theta = float(record.pop("rope_theta"))
        scaling = RopeScaling.from_meta(record)
    except RopeParametersError:
        raise
    except RopeScalingError as e:
        raise RopeParametersError(f"{where}: config.json RoPE settings: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise RopeParametersError(f"{where}: config.json {RECORD_KEY} is malformed ({e!r}); it holds the RoPE "
                                  "method's fields (method, factor, original_context, beta_fast, beta_slow) and "
                                  "rope_theta") from e
    want = scaling.hf_rope_parameters(theta, head_dim)
    params.setdefault("rope_type", "default")
    if not _same(want, params):
        raise RopeParametersError(
            f"{where}: config.json {RECORD_KEY} ({scaling.describe()} at theta {theta:g}) gives rope_parameters "
            f"{want}, but rope_parameters is {params}; remove {RECORD_KEY} if rope_parameters is what the model "
            "should run, or restore rope_parameters")
    return theta, scaling

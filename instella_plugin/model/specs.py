"""Named layer specs: megatron ``ModuleSpec`` trees for the Instella layer, one per backend.

Built in:
- ``instella``: megatron's local PyTorch modules (runs everywhere, CPU included);
- ``instella-te``: Transformer Engine linears and attention (selected only when TE imports); the
  norms stay Instella's own so the rounding order, and so the weights' names, are the same;
- ``instella-fused``: the local spec with this package's fused kernels (``instella_plugin.kernels``).
Other distributions add specs through the ``instella_layer_specs`` entry-point group; an entry
point names either a spec object (a ``ModuleSpec`` or ``TransformerBlockSubmodules``) or a factory
``f(config, vp_stage=None)`` returning one. ``register_spec`` does the same from code.
"""
import functools
from importlib.metadata import entry_points
from typing import Callable, Dict, Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from instella_plugin.model.full_width_qk_norm import FullWidthQKNorm
from instella_plugin.model.rms_norm import InstellaRMSNorm

ENTRY_POINT_GROUP = "instella_layer_specs"


def instella_layer_spec(*, column_linear, row_linear, core_attention, norm=InstellaRMSNorm,
                        qk_norm=FullWidthQKNorm, mlp_module=MLP) -> ModuleSpec:
    """The Instella pre-norm layer with the given backend modules (the one place its shape is written)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                    q_layernorm=ModuleSpec(module=qk_norm, params={"which": "q"}),
                    k_layernorm=ModuleSpec(module=qk_norm, params={"which": "k"}),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=mlp_module,
                           submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(layer: ModuleSpec, config, vp_stage: Optional[int] = None,
               final_norm=InstellaRMSNorm) -> TransformerBlockSubmodules:
    """A block of this stage's layers with Instella's final RMSNorm."""
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)


def instella_local_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from instella_plugin.model.packed_attention import InstellaDotProductAttention as DotProductAttention

    layer = instella_layer_spec(column_linear=ColumnParallelLinear, row_linear=RowParallelLinear,
                                core_attention=DotProductAttention)
    return block_spec(layer, config, vp_stage)


def instella_te_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TERowParallelLinear,
        )
    except ImportError as e:
        raise RuntimeError("layer spec 'instella-te' needs Transformer Engine, which does not import here "
                           f"({e}); use --spec instella (local backend) instead") from e
    layer = instella_layer_spec(column_linear=TEColumnParallelLinear, row_linear=TERowParallelLinear,
                                core_attention=TEDotProductAttention)
    return block_spec(layer, config, vp_stage)


_REGISTRY: Dict[str, Callable] = {
    "instella": instella_local_spec,
    "instella-te": instella_te_spec,
    "instella-fused": "instella_plugin.kernels.fused_spec:instella_fused_spec",  # imported on first use
    "instella-fused-apex": "instella_plugin.kernels.fused_spec:instella_fused_apex_spec",
    "instella-fused-te": "instella_plugin.kernels.fused_spec:instella_fused_te_spec",
}


def register_spec(name: str, spec_or_factory) -> None:
    """Add a named spec (object or factory); re-registering a name replaces it."""
    _REGISTRY[name] = spec_or_factory


@functools.lru_cache(maxsize=1)
def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep  # resolved on first use, so a broken plugin breaks only its own name


def known_specs() -> list:
    _load_entry_points()
    return sorted(_REGISTRY)


def check_spec_name(name: str) -> None:
    """Fail early (before any model is built) on an unknown spec name."""
    if name not in known_specs():
        raise ValueError(f"unknown layer spec {name!r}; known specs: {', '.join(known_specs())} "
                         f"(other packages add specs through the {ENTRY_POINT_GROUP!r} entry-point group)")


def get_spec(name: str, config, vp_stage: Optional[int] = None):
    """The spec named ``name`` for this config and virtual stage."""
    check_spec_name(name)
    item = _REGISTRY[name]
    if hasattr(item, "load") and hasattr(item, "group"):  # an unresolved entry point
        item = _REGISTRY[name] = item.load()
    elif isinstance(item, str):  # "module:attribute" of a built-in with heavier imports
        import importlib

        module, attr = item.split(":")
        item = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    if isinstance(item, (ModuleSpec, TransformerBlockSubmodules)):
        return item
    return item(config, vp_stage=vp_stage)

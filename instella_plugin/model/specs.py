"""Named layer specs: Instella's layer layout filled in by a megatron-core backend provider.

A spec is a provider plus the layout. The layout (``instella_layer_spec``, written once) is the
pre-norm layer: RMSNorm, fused QKV, full-width QK-norm before RoPE, causal attention, SwiGLU MLP;
the block ends in a final RMSNorm. A provider is megatron-core's ``BackendSpecProvider``
(``megatron/core/models/backends.py``): it names the module for each place. ``InstellaProvider``
adds Instella's choices to it: the norms (``layer_norm``: the RMSNorm, or with ``for_qk`` the
full-width QK-norm) and the self-attention and MLP classes, which megatron's providers leave fixed.
The layout takes no fused layernorm-linear (``fuse_layernorm_and_linear``): the norms stay modules
of their own, so every spec has the same parameter names and checkpoints.

Built in:
- ``instella``: ``InstellaLocalProvider``, megatron's local modules (runs everywhere, CPU included);
- ``instella-te``: ``InstellaTEProvider``, Transformer Engine linears and attention; the norms stay
  Instella's, so the rounding order is the same;
- ``instella-fused``, ``instella-fused-apex``, ``instella-fused-te``: the fused kernels
  (``instella_plugin.kernels.fused_spec``).
Other distributions add specs through the ``instella_layer_specs`` entry-point group: an entry point
names an ``InstellaProvider`` subclass (or instance). ``register_spec`` does the same from code.
"""
import functools
import importlib
import logging
import sys
from importlib.metadata import entry_points
from typing import Dict, Optional, Union

from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from instella_plugin.model.full_width_qk_norm import FullWidthQKNorm
from instella_plugin.model.packed_attention import InstellaDotProductAttention
from instella_plugin.model.rms_norm import InstellaRMSNorm

ENTRY_POINT_GROUP = "instella_layer_specs"


class InstellaProvider:
    """Instella's part of a backend provider; combine it with one of megatron's (it comes first)."""

    def layer_norm(self, rms_norm: bool = True, for_qk: bool = False) -> type:
        """The pre-norm and final RMSNorm, or (``for_qk``) the QK-norm; megatron builds both with
        ``(config, hidden_size, eps)``, the QK-norm with ``hidden_size=head_dim``."""
        return FullWidthQKNorm if for_qk else InstellaRMSNorm

    def self_attention(self) -> type:
        return SelfAttention

    def mlp(self) -> type:
        return MLP


class InstellaLocalProvider(InstellaProvider, LocalSpecProvider):
    """megatron's local linears; attention that also takes packed documents and context parallelism."""

    def core_attention(self) -> type:
        return InstellaDotProductAttention


class InstellaTEProvider(InstellaProvider, TESpecProvider):
    """Transformer Engine's linears and attention with Instella's norms."""

    def __init__(self):
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:
            raise RuntimeError("layer spec 'instella-te' needs Transformer Engine, which does not import here "
                               f"({e}); use --spec instella (local backend) instead") from e


def _qk_norm(module, which: str):
    """A full-width QK-norm is told whether it scales q or k (their widths differ under GQA); a
    per-head one (megatron's) is built as it is."""
    if isinstance(module, type) and issubclass(module, FullWidthQKNorm):
        return ModuleSpec(module=module, params={"which": which})
    return module


def instella_layer_spec(backend: InstellaProvider) -> ModuleSpec:
    """The Instella layer with the modules ``backend`` names (the one place its shape is written)."""
    norm, qk_norm = backend.layer_norm(rms_norm=True), backend.layer_norm(rms_norm=True, for_qk=True)
    column, row = backend.column_parallel_linear(), backend.row_parallel_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=backend.self_attention(),
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=backend.core_attention(),
                    linear_proj=row,
                    q_layernorm=_qk_norm(qk_norm, "q"),
                    k_layernorm=_qk_norm(qk_norm, "k"),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=backend.mlp(), submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def instella_block_spec(backend: InstellaProvider, config,
                        vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """This stage's layers and the final norm, all from ``backend``."""
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[instella_layer_spec(backend)] * n,
                                      layer_norm=backend.layer_norm(rms_norm=True))


_REGISTRY: Dict[str, object] = {
    "instella": InstellaLocalProvider,
    "instella-te": InstellaTEProvider,
    "instella-fused": "instella_plugin.kernels.fused_spec:FusedProvider",  # imported on first use
    "instella-fused-apex": "instella_plugin.kernels.fused_spec:FusedApexProvider",
    "instella-fused-te": "instella_plugin.kernels.fused_spec:FusedTEProvider",
}


def register_spec(name: str, provider: Union[type, InstellaProvider]) -> None:
    """Add a named spec (a provider class or instance); re-registering a name replaces it."""
    _REGISTRY[name] = provider


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


def get_provider(name: str) -> InstellaProvider:
    """The provider of spec ``name``; made here, so a provider whose library is missing fails now."""
    check_spec_name(name)
    item = _REGISTRY[name]
    if hasattr(item, "load") and hasattr(item, "group"):  # an unresolved entry point
        item = _REGISTRY[name] = item.load()
    elif isinstance(item, str):  # "module:attribute" of a built-in with heavier imports
        module, attr = item.split(":")
        item = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    provider = item() if isinstance(item, type) else item
    if not isinstance(provider, InstellaProvider):
        raise TypeError(f"layer spec {name!r} is a {type(provider).__name__}, not a backend provider: register a "
                        "subclass of instella_plugin.model.specs.InstellaLocalProvider (or of another "
                        "InstellaProvider) in the entry-point group " + repr(ENTRY_POINT_GROUP))
    return provider


def get_spec(name: str, config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """The block spec named ``name`` for this config and virtual stage."""
    return instella_block_spec(get_provider(name), config, vp_stage)


class _MLPSubclassNotice(logging.Filter):
    """megatron's TransformerLayer hands its TP group only to exactly ``MLP`` and warns "Unknown MLP
    type ... default kwargs" for anything else, once per layer. For a subclass of ``MLP`` (what a
    provider's ``mlp()`` may name, e.g. ``FusedSwiGLUMLP``) the default is the group ``MLP`` would get
    anyway, so that one warning is dropped; for any other MLP type it still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Unknown MLP type"):
            return True
        frame = sys._getframe()
        while frame is not None:  # the TransformerLayer.__init__ that is logging: its submodules.mlp
            sub = frame.f_locals.get("submodules") if frame.f_code.co_name == "__init__" else None
            if sub is not None and hasattr(sub, "mlp"):
                module = getattr(sub.mlp, "module", None)
                return not (isinstance(module, type) and issubclass(module, MLP))
            frame = frame.f_back
        return True


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_MLPSubclassNotice())

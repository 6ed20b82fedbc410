"""Layer specs are megatron backend providers filling in Instella's layer layout (model/specs.py).

The built models themselves are checked elsewhere: parity with the reference (test_model_parity.py),
the fused spec against ``instella`` (test_kernels_tp.py), a provider from another distribution in a
training run (test_trainer_runs.py). Here: which module each provider puts in each place, the
README's example, and the errors.
"""
import os
import re

import pytest
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from instella_plugin.kernels import modules as fused
from instella_plugin.model import specs
from instella_plugin.model.full_width_qk_norm import FullWidthQKNorm
from instella_plugin.model.packed_attention import InstellaDotProductAttention
from instella_plugin.model.rms_norm import InstellaRMSNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def places(layer: ModuleSpec) -> dict:
    """The module class in each place of a layer spec (QK-norms with their parameters)."""
    sub = layer.submodules
    att = sub.self_attention.submodules

    def qk(spec):
        return (spec.module, spec.params) if isinstance(spec, ModuleSpec) else spec

    return dict(norm=sub.input_layernorm, pre_mlp_norm=sub.pre_mlp_layernorm, attention=sub.self_attention.module,
                attn_mask=sub.self_attention.params["attn_mask_type"].name, qkv=att.linear_qkv,
                core_attention=att.core_attention, proj=att.linear_proj, q_norm=qk(att.q_layernorm),
                k_norm=qk(att.k_layernorm), mlp=sub.mlp.module, fc1=sub.mlp.submodules.linear_fc1,
                fc2=sub.mlp.submodules.linear_fc2)


LOCAL = dict(norm=InstellaRMSNorm, pre_mlp_norm=InstellaRMSNorm, attention=SelfAttention, attn_mask="causal",
             qkv=ColumnParallelLinear, core_attention=InstellaDotProductAttention, proj=RowParallelLinear,
             q_norm=(FullWidthQKNorm, {"which": "q"}), k_norm=(FullWidthQKNorm, {"which": "k"}), mlp=MLP,
             fc1=ColumnParallelLinear, fc2=RowParallelLinear)
FUSED = dict(LOCAL, norm=fused.FusedRMSNorm, pre_mlp_norm=fused.FusedRMSNorm, attention=fused.FusedRopeSelfAttention,
             q_norm=(fused.FusedQKNormRope, {"which": "q"}), k_norm=(fused.FusedQKNormRope, {"which": "k"}),
             mlp=fused.FusedSwiGLUMLP)


@pytest.mark.parametrize("name,expected", [("instella", LOCAL), ("instella-fused", FUSED)])
def test_builtin_specs_are_their_provider_in_instellas_layout(name, expected):
    provider = specs.get_provider(name)
    assert isinstance(provider, LocalSpecProvider)  # megatron's local backend underneath
    assert places(specs.instella_layer_spec(provider)) == expected
    assert provider.layer_norm(rms_norm=True) is expected["norm"]  # the block's final norm


def test_readme_example_puts_the_users_norm_in_every_rmsnorm_place(monkeypatch):
    monkeypatch.setattr(specs, "_REGISTRY", dict(specs._REGISTRY))
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    example = re.search(r"## Extending\n.*?```python\n(.*?)```", readme, re.S).group(1)
    scope = {}
    exec(compile("\n".join(line[2:] for line in example.splitlines()), "README.md", "exec"), scope)
    got = places(specs.instella_layer_spec(specs.get_provider("clamped")))
    assert got == dict(LOCAL, norm=scope["ClampedRMSNorm"], pre_mlp_norm=scope["ClampedRMSNorm"])
    assert "clamped" in specs.known_specs()


def test_a_per_head_qk_norm_from_megatron_is_placed_as_megatron_builds_it(monkeypatch):
    """megatron's own QK-norm (``qk_layernorm=True`` of its local spec) takes no ``which``."""

    class PerHead(specs.InstellaLocalProvider):
        def layer_norm(self, rms_norm=True, for_qk=False):
            return LocalSpecProvider().layer_norm(rms_norm=True, for_qk=True) if for_qk else InstellaRMSNorm

    monkeypatch.setitem(specs._REGISTRY, "per-head", PerHead())  # an instance registers too
    got = places(specs.instella_layer_spec(specs.get_provider("per-head")))
    assert got["q_norm"] is got["k_norm"] is LocalSpecProvider().layer_norm(rms_norm=True, for_qk=True)
    assert got["q_norm"] is not FullWidthQKNorm and got["core_attention"] is InstellaDotProductAttention


def test_a_spec_that_is_not_a_provider_fails_naming_the_fix(monkeypatch):
    monkeypatch.setitem(specs._REGISTRY, "old-style", lambda config, vp_stage=None: None)
    with pytest.raises(TypeError, match=r"'old-style' is a function, not a backend provider: register a subclass "
                                        r"of instella_plugin.model.specs.InstellaLocalProvider"):
        specs.get_spec("old-style", config=None)
    monkeypatch.setitem(specs._REGISTRY, "megatron-local", LocalSpecProvider)  # no Instella layout choices
    with pytest.raises(TypeError, match="'megatron-local' is a LocalSpecProvider, not a backend provider"):
        specs.get_provider("megatron-local")


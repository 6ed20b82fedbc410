"""Model presets, parameter count, layout validation, the bf16 rounding order and the spec registry."""
import pytest
import torch

from instella_plugin.model.config import InstellaConfig, get_preset, instella_3b
from instella_plugin.model.rms_norm import rms_norm_reference


def test_instella_3b_parameter_count_from_config():
    cfg = instella_3b()
    assert cfg.num_parameters() == 3_112_675_840
    assert (cfg.head_dim, cfg.padded_vocab_size, cfg.ffn_hidden_size) == (80, 50304, 6912)


def test_presets_keep_the_odd_head_dim():
    assert get_preset("instella-tiny").head_dim == 80
    assert get_preset("instella-test").head_dim == 80


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vocab_padded_to_50304_at_every_tp(tp):
    cfg = instella_3b()
    cfg.validate(tensor_parallel=tp)
    assert cfg.padded_vocab_size == 50304


@pytest.mark.parametrize("overrides,tp,match", [
    (dict(num_attention_heads=5, num_query_groups=5, hidden_size=400), 2, "attention heads \\(5\\)"),
    (dict(ffn_hidden_size=433), 2, "FFN hidden size \\(433\\)"),
    (dict(hidden_size=330), 1, "not divisible by 4 heads"),
])
def test_bad_layouts_fail_before_building(overrides, tp, match):
    cfg = get_preset("instella-test", **overrides)
    with pytest.raises(ValueError, match=match):
        cfg.transformer_config(tensor_parallel=tp)


def test_unknown_preset_and_spec_names_list_known_ones():
    with pytest.raises(ValueError, match="known presets: instella-3b"):
        get_preset("instella-7b")
    from instella_plugin.model.specs import check_spec_name
    with pytest.raises(ValueError, match="known specs: .*instella.*instella-te"):
        check_spec_name("instella-typo")


def test_config_round_trips_through_dict():
    cfg = get_preset("instella-tiny", rotary_base=514640.0)
    assert InstellaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown Instella config keys"):
        InstellaConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_rms_norm_bf16_bitwise_equals_olmoe():
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 3, 2560, generator=g) * 3).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(2560, generator=g)).to(torch.bfloat16)
    ref = OlmoeRMSNorm(2560, eps=1e-5).to(torch.bfloat16)
    ref.weight.data.copy_(w)
    ours = rms_norm_reference(x, w, 1e-5)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, ref(x))
    # The other rounding order (scale, then cast) is not bitwise equal: the test can tell them apart.
    other = (w.float() * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5))).to(x.dtype)
    assert not torch.equal(other, ref(x))

